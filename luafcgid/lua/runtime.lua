-- Run once in every new Lua state, before its script: builds the request object (`con`),
-- makes relative file names resolve against the script's directory, runs the prelude, loads
-- the script and returns the functions the Python side calls per request. Everything here
-- is local, so a script sees only the standard libraries and its own globals.

local script, dir, config, send, log, opts = ...

local concat, type, tostring, pcall, setmetatable, error, select =
  table.concat, type, tostring, pcall, setmetatable, error, select
local find, lower, sub = string.find, string.lower, string.sub

python = nil
package.loaded.python = nil

-- Relative names resolve against the script's directory, as if each state had its own
-- working directory: the process's one is shared by every thread and never changed.
local function resolve(name)
  if type(name) == "string" and sub(name, 1, 1) ~= "/" then
    return dir .. "/" .. name
  end
  return name
end

local function relative_first(fn)
  return function(name, ...) return fn(resolve(name), ...) end
end

local function relative_first_or_none(fn)
  return function(...)
    if select("#", ...) == 0 then return fn() end
    return fn(resolve((...)), select(2, ...))
  end
end

local loadfile_absolute, io_open, os_rename = loadfile, io.open, os.rename
io.open = relative_first(io.open)
io.lines = relative_first_or_none(io.lines)
io.input = relative_first_or_none(io.input)
io.output = relative_first_or_none(io.output)
os.remove = relative_first(os.remove)
os.rename = function(from, to, ...) return os_rename(resolve(from), resolve(to), ...) end
dofile = relative_first_or_none(dofile)
loadfile = relative_first_or_none(loadfile)
package.path = opts.path
package.cpath = opts.cpath

-- os.exit would end the whole daemon, every other request with it.
os.exit = function()
  error("os.exit is not available to luafcgid scripts (it would stop the daemon)", 2)
end

local function is_memory_error(message)
  return type(message) == "string" and find(message, "not enough memory", 1, true) ~= nil
end

-- request_timeout ---------------------------------------------------------------------------
-- A count hook looks at the clock every HOOK_EVERY VM instructions while a deadline is set.
-- os.time() has whole seconds, so the deadline is one second past the timeout: a script is
-- never stopped early, at most a second late. Once the deadline passed the hook fires on
-- every instruction, so a script that catches the error with pcall and loops on is stopped
-- at its next instruction outside the pcall. The hook leaves this file's own functions alone
-- (`ours`): they must still report the timeout. PUC Lua keeps a Lua hook per coroutine, so
-- coroutines install it as they start; LuaJIT does not run hooks inside compiled traces, so
-- its JIT compiler is turned off for good.

local timeout = opts.timeout
local deadline, timed_out = nil, false
local ours = {}
local HOOK_EVERY = 100000

if timeout > 0 then
  local time, getinfo, sethook = os.time, debug.getinfo, debug.sethook
  local function hook()
    if deadline == nil or time() < deadline or ours[getinfo(2, "f").func] then return end
    if not timed_out then
      timed_out = true
      sethook(hook, "", 1)
    end
    error("request_timeout (" .. timeout .. " s) exceeded", 2)
  end
  sethook(hook, "", HOOK_EVERY)
  local create, wrap = coroutine.create, coroutine.wrap
  local function hooked(fn)
    return function(...)
      sethook(hook, "", timed_out and 1 or HOOK_EVERY)
      return fn(...)
    end
  end
  coroutine.create = function(fn) return create(hooked(fn)) end
  coroutine.wrap = function(fn) return wrap(hooked(fn)) end
  if jit then
    jit.off()
    jit.flush()
    jit.on = function()
      error("jit.on: luafcgid keeps LuaJIT's JIT compiler off while request_timeout is set", 2)
    end
  end
end

local function arm()
  if timeout > 0 then deadline = os.time() + timeout + 1 end
end

-- the kind and message of a failed call: a timeout, or what the error says
local function failure(err)
  if timed_out then
    return "Timeout Error", script .. ": request_timeout (" .. timeout .. " s) exceeded"
  end
  return is_memory_error(err) and "Memory Error" or "Runtime Error", tostring(err)
end

-- Calls fn(...) under the request deadline: true and its first result, or false, an error
-- kind and its message.
local function timed(fn, ...)
  arm()
  local ok, result = pcall(fn, ...)
  deadline = nil
  if not ok or timed_out then return false, failure(result) end
  return true, result
end

-- The request object ---------------------------------------------------------------------

local status_default, contenttype_default, handler_name, finish_name, buffering =
  opts.httpstatus, opts.contenttype, opts.handler, opts.finishhandler, opts.buffering
local static_headers = opts.headers   -- every global header line, each ending in \r\n
local default_head = "Status: " .. status_default .. "\r\nContent-Type: " ..
  contenttype_default .. "\r\n" .. static_headers .. "\r\n"

local Con = {}
Con.__index = Con

local function head(c)
  c.sent = true
  if c.status == nil and c.contenttype == nil and c.nheaders == 0 then
    return default_head
  end
  return "Status: " .. (c.status or status_default) .. "\r\nContent-Type: " ..
    (c.contenttype or contenttype_default) .. "\r\n" .. static_headers ..
    concat(c.headers, "", 1, c.nheaders) .. "\r\n"
end

local function text(value, what, level)
  local t = type(value)
  if t == "string" then return value end
  if t == "number" then return tostring(value) end
  error("bad argument to " .. what .. " (string expected, got " .. t .. ")", level + 1)
end

local function not_sent(c, what)
  if c.sent then error(what .. ": the headers were already sent", 3) end
  if c.closed then error(what .. ": the response is already complete", 3) end
end

function Con:header(name, value)
  not_sent(self, "con:header")
  name = text(name, "con:header", 2)
  if value == nil then
    if find(name, "[\r\n]") or not find(name, ":") then
      error("con:header: expected one 'Name: value' line, got " .. ("%q"):format(name), 2)
    end
    self.nheaders = self.nheaders + 1
    self.headers[self.nheaders] = name .. "\r\n"
    return
  end
  value = text(value, "con:header", 2)
  if find(name, "[\r\n:]") or find(value, "[\r\n]") then
    error("con:header: header names and values must not contain line breaks", 2)
  end
  local key = lower(name)
  if key == "status" then
    self.status = value
  elseif key == "content-type" then
    self.contenttype = value
  else
    self.nheaders = self.nheaders + 1
    self.headers[self.nheaders] = name .. ": " .. value .. "\r\n"
  end
end

local function put(c, s)
  if c.closed then return end
  if buffering then
    local n = c.n + 1
    c.body[n] = s
    c.n = n
  elseif c.sent then
    send(s)
  else
    send(head(c) .. s)
  end
end

function Con:puts(s, ...)
  put(self, text(s, "con:puts", 2))
  for i = 1, select("#", ...) do
    put(self, text((select(i, ...)), "con:puts", 2))
  end
end

function Con:flush()
  if self.closed then return end
  local payload = concat(self.body, "", 1, self.n)
  self.n = 0
  self.body = {}
  if not self.sent then
    payload = head(self) .. payload
  end
  if payload ~= "" then send(payload) end
end

function Con:reset()
  self.n = 0
  self.body = {}
end

function Con:gets()
  return self.input
end

function Con:config(name)
  return config[name]
end

function Con:log(message)
  log(script, text(message, "con:log", 2))
end

-- Loading and running ----------------------------------------------------------------------

-- Compiles and runs a Lua file: true and the chunk's first result, or false, an error kind
-- and its message.
local function run_file(file, ...)
  local chunk, message = loadfile_absolute(file)
  if not chunk then
    if is_memory_error(message) then return false, "Memory Error", message end
    local probe = io_open(file, "rb")
    if not probe then return false, "File Error", message end
    probe:close()
    return false, "Syntax Error", message
  end
  return timed(chunk, ...)
end

-- The prelude (setting `prelude`) runs first, with the script's path as its argument; then
-- the script. A script that defines no handler but returns a WSAPI application (a function,
-- or a table with a `run` function) is served as that application.
local app_handler

local function load_script()
  if opts.prelude ~= "" then
    local ok, kind, message = run_file(opts.prelude, script)
    if not ok then return false, kind, message end
  end
  local ok, result, message = run_file(script)
  if not ok then return false, result, message end
  if type(result) == "function" or (type(result) == "table" and type(result.run) == "function") then
    local wsapi = assert(loadfile_absolute(opts.libdir .. "/luafcgid_wsapi.lua"))()
    app_handler = wsapi.handler(result, script, dir, log)
  end
  return true
end

local current

-- FastCGI name-value pairs (spec 3.4) to the env table; Python checked them already.
-- Decoded here from the bytes received rather than converted from Python's dict (lupa's
-- table_from: 1.6 us for nginx's 21 params, holding the interpreter lock); Lua runs without
-- it. Hello world with upstream keep-alive: +9% requests/s, -6% CPU per request (median of
-- six alternating 3 s runs).
local byte, version = string.byte, opts.version

local function pair_length(raw, pos)
  local a, b, c, d = byte(raw, pos, pos + 3)
  return ((a - 128) * 256 + b) * 65536 + c * 256 + d
end

local function decode_params(raw)
  local env, pos, n = {}, 1, #raw
  while pos <= n do
    local name_len, value_len = byte(raw, pos, pos + 1)
    if name_len < 128 and value_len < 128 then
      pos = pos + 2
    else
      if name_len < 128 then pos = pos + 1 else name_len = pair_length(raw, pos); pos = pos + 4 end
      value_len = byte(raw, pos)
      if value_len < 128 then pos = pos + 1 else value_len = pair_length(raw, pos); pos = pos + 4 end
    end
    local value_at = pos + name_len
    env[sub(raw, pos, value_at - 1)] = sub(raw, value_at, value_at + value_len - 1)
    pos = value_at + value_len
  end
  env.LUAFCGID_VERSION = version
  return env
end

-- Returns true, the body not yet sent and, when they were not sent either, the headers; or
-- false, an error kind, its message and whether the headers already went out (then a 500
-- page can no longer be sent). Headers and body stay apart: Python joins them with a copy,
-- where Lua would also intern the joined string.
local function serve(raw_params, input)
  local env = decode_params(raw_params)
  local c = setmetatable({env = env, input = input, n = 0, body = {}, nheaders = 0,
                          headers = {}, sent = false, closed = false}, Con)
  current = c
  local handler = _G[handler_name]
  if type(handler) ~= "function" then
    handler = app_handler
    if handler == nil then
      return false, "Runtime Error", handler_name .. "() function not found", false
    end
  end
  local ok, kind, message = timed(handler, env, c)
  if not ok then
    c.closed = true
    return false, kind, message, c.sent
  end
  local payload = c.n == 1 and c.body[1] or concat(c.body, "", 1, c.n)
  c.body = nil
  c.closed = true
  if not c.sent then return true, payload, head(c) end
  return true, payload
end

-- Runs the finish handler for the request just answered: true, or false, an error kind and
-- its message (only logged: the response is already out).
local function finish()
  local c = current
  current = nil
  local fn = _G[finish_name]
  if c == nil or type(fn) ~= "function" then return true end
  local ok, kind, message = timed(fn, c.env, c)
  if not ok then return false, kind, message end
  return true
end

ours[arm], ours[timed], ours[run_file], ours[load_script], ours[serve], ours[finish] =
  true, true, true, true, true, true
ours[debug.getinfo(1, "f").func] = true
local ok, kind, message = load_script()
if not ok then return false, kind, message end
return true, serve, finish
