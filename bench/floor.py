#!/usr/bin/env python3
"""The floor (issue 16): the least a Python + lupa FastCGI responder does on this machine.

PROCESSES forked processes of one thread each take connections from one Unix socket with a
blocking accept, read records in a recv loop, decode the params in Lua, call the script's
`main(env, con)` (con:header, con:puts, con:gets), frame the answer's records in Python and
send them at once; with FCGI_KEEP_CONN they read the connection's next request. lupa's
LuaJIT with its JIT on, as luafcgid's shipped config runs it. Each script runs in its own
global table of the process's one state. No pool, metrics, deadline, limit or error page:
luafcgid's distance to it is what its request path and guarantees cost.

    python3 bench/floor.py SOCKET PROCESSES
"""

import os
import socket
import struct
import sys

import lupa.luajit21 as lupa

RECORD = struct.Struct(">BBHHBx")   # version, type, request id, content and padding length
BEGIN_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT = 1, 3, 4, 5, 6
KEEP_CONN = 1
MAX_CONTENT = 65535

LUA = r"""
local byte, sub, concat, lower = string.byte, string.sub, table.concat, string.lower

local function long(raw, pos)
  local a, b, c, d = byte(raw, pos, pos + 3)
  return ((a - 128) * 256 + b) * 65536 + c * 256 + d
end

local function decode(raw)   -- FastCGI name-value pairs to the env table
  local env, pos = {}, 1
  while pos <= #raw do
    local name_len = byte(raw, pos)
    if name_len < 128 then pos = pos + 1 else name_len = long(raw, pos); pos = pos + 4 end
    local value_len = byte(raw, pos)
    if value_len < 128 then pos = pos + 1 else value_len = long(raw, pos); pos = pos + 4 end
    env[sub(raw, pos, pos + name_len - 1)] = sub(raw, pos + name_len, pos + name_len + value_len - 1)
    pos = pos + name_len + value_len
  end
  return env
end

local Con = {}
Con.__index = Con
function Con:header(name, value)
  if lower(name) == "content-type" then self.type = value
  else self.head[#self.head + 1] = name .. ": " .. value .. "\r\n" end
end
function Con:puts(...)
  for i = 1, select("#", ...) do self.body[#self.body + 1] = tostring((select(i, ...))) end
end
function Con:gets() return self.input end

local mains = {}
local function main_of(path)
  local main = mains[path]
  if not main then
    local globals = setmetatable({}, {__index = _G})
    setfenv(assert(loadfile(path)), globals)()
    main = globals.main
    mains[path] = main
  end
  return main
end

local function new_con(input)
  return setmetatable({type = "text/html", head = {}, body = {}, input = input}, Con)
end

local function serve(raw, input)   -- the response's head and body
  local env = decode(raw)
  local con = new_con(input)
  main_of(env.SCRIPT_FILENAME)(env, con)
  return "Content-Type: " .. con.type .. "\r\n" .. concat(con.head) .. "\r\n", concat(con.body)
end

local function cost(path, calls)   -- CPU seconds per main() call, in a loop in this state
  local main, env, clock = main_of(path), {}, os.clock
  local started = clock()
  for _ = 1, calls do main(env, new_con("")) end
  return (clock() - started) / calls
end

return serve, cost
"""


def runtime():
    """The floor's (serve, cost) functions in a new LuaJIT state; strings cross as bytes."""
    return lupa.LuaRuntime(encoding=None).execute(LUA)


def records(kind, request_id, data):
    view = memoryview(data)
    for at in range(0, len(data), MAX_CONTENT):
        part = view[at:at + MAX_CONTENT]
        yield RECORD.pack(1, kind, request_id, len(part), 0)
        yield part


def respond(conn, serve, request_id, params, stdin):
    head, body = serve(b"".join(params), b"".join(stdin))
    conn.sendall(b"".join([*records(STDOUT, request_id, head), *records(STDOUT, request_id, body),
                           RECORD.pack(1, STDOUT, request_id, 0, 0),
                           RECORD.pack(1, END_REQUEST, request_id, 8, 0), bytes(8)]))


def connection(conn, serve):
    """Serves the requests on one connection until the web server closes it or a request
    without FCGI_KEEP_CONN is answered."""
    buffer, keep, params, stdin = b"", 0, [], []
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buffer += data
        pos = 0
        while len(buffer) - pos >= RECORD.size:
            _, kind, request_id, length, padding = RECORD.unpack_from(buffer, pos)
            end = pos + RECORD.size + length + padding
            if end > len(buffer):
                break
            content = buffer[pos + RECORD.size:pos + RECORD.size + length]
            pos = end
            if kind == BEGIN_REQUEST:
                keep, params, stdin = content[2] & KEEP_CONN, [], []
            elif kind == PARAMS:
                params.append(content)
            elif kind == STDIN and content:
                stdin.append(content)
            elif kind == STDIN:
                respond(conn, serve, request_id, params, stdin)
                if not keep:
                    return
        buffer = buffer[pos:]


def worker(listener):
    serve, _ = runtime()
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                connection(conn, serve)
            except Exception as e:  # noqa: BLE001 - one failed request closes its connection only
                print("floor: %s: %s" % (type(e).__name__, e), file=sys.stderr, flush=True)


def lua_cost(path, calls):
    """CPU µs per call of the script's main() in one LuaJIT state, after calls / 10 to warm up
    (the JIT compiles the hot loops)."""
    _, cost = runtime()
    path = os.fsencode(path)
    cost(path, max(1, calls // 10))
    return cost(path, calls) * 1e6


def main(argv):
    path, processes = argv[0], int(argv[1])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(1024)
    for _ in range(processes):
        if os.fork() == 0:
            worker(listener)
    for _ in range(processes):   # the benchmark stops the whole session with SIGTERM
        os.wait()


if __name__ == "__main__":
    main(sys.argv[1:])
