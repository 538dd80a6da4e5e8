"""What a shared dictionary's get and incr cost from Lua, beside the stores it was chosen over.

Through a real daemon (2 processes of 2 workers, `shared: {bench: 10M}`), on each path:
LuaJIT works on the shared memory through its FFI (with request_timeout set its JIT compiler
is off, so the FFI runs interpreted); Lua 5.4 and 5.1 call into Python for each operation.
For each, a page runs N operations in a loop:

- ns per operation, one request alone (os.clock around the loop: CPU time);
- operations per second, wall time, of one request alone and of 4 at once (every worker
  busy): the ratio shows how the path scales, whatever else the machine runs.

A Lua table lookup is measured the same way, for scale.

Then, in this process (LuaJIT), the stores considered beside shared memory, each reached by
one call from Lua into Python per operation: LMDB (the `lmdb` package, when installed) and
SQLite in WAL mode on /dev/shm; beside this dictionary through the same kind of call, and
through the FFI.

    python3 -m bench.shared_dict [--ops 200000]

from the checkout (it imports the tests' Daemon and this checkout's luafcgid)
"""

import argparse
import os
import sqlite3
import tempfile
import threading
import time

from luafcgid import config
from luafcgid.request.fastcgi import encode_params
from luafcgid.shared.dictionaries import Dictionaries
from luafcgid.states import vm
from luafcgid.states.searchpath import search_paths
from luafcgid.states.state import LuaState
from tests.conftest import Daemon, RawClient, Site, split_response   # the tests' real daemon

PAGE = """
local d = require("luafcgid").shared.bench
local t = {page = "<p>hello, world</p>"}
d:set("page", "<p>hello, world</p>")
d:add("counter", 0)
function main(env, con)
  local op, n = env.QUERY_STRING:match("^(%a+)&(%d+)$")
  n = tonumber(n)
  local clock, x = os.clock
  local started = clock()
  if op == "table" then
    for _ = 1, n do x = t.page end
  elseif op == "get" then
    for _ = 1, n do x = d:get("page") end
  else
    for _ = 1, n do x = d:incr("counter", 1) end
  end
  con:puts(clock() - started)
end
"""

PATHS = (("LuaJIT, FFI", {"lua": "luajit"}),
         ("LuaJIT, FFI, JIT off (request_timeout)", {"lua": "luajit", "request_timeout": 600}),
         ("Lua 5.4, through Python", {"lua": "5.4"}),
         ("Lua 5.1, through Python", {"lua": "5.1"}))
WORKERS = 4   # 2 processes of 2 workers


def request(address, script, query):
    client = RawClient(address, timeout=600)
    client.request({b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET",
                    b"QUERY_STRING": query.encode()})
    stdout, _, _ = client.response()
    client.close()
    status, _, body = split_response(stdout)
    if not status.startswith("200"):
        raise RuntimeError(f"{query}: {status} {body[:300]!r}")
    return float(body)


def at_once(address, script, query, clients):
    """Requests per second (wall time) of `clients` making the request at once."""
    started = time.perf_counter()
    runs = [threading.Thread(target=request, args=(address, script, query))
            for _ in range(clients)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    return clients / (time.perf_counter() - started)


def through_the_daemon(ops, workdir):
    rows = []
    site = Site(os.path.join(workdir, "www"))
    script = site.write("bench.lua", PAGE)
    for name, settings in PATHS:
        if not vm.available(settings["lua"]):
            print(f"  {name}: lupa ships no Lua {settings['lua']}; skipped")
            continue
        daemon = Daemon(os.path.join(workdir, name.replace(" ", "_").replace(",", "")),
                        {"processes": 2, "workers": 2, "states": 4, "shared": {"bench": "10M"},
                         **settings}).start()
        try:
            for op, n in (("table", ops * 20), ("get", ops), ("incr", ops)):
                query = f"{op}&{n}"
                request(daemon.address, script, f"{op}&{n // 10}")   # load and warm up
                alone = min(request(daemon.address, script, query) for _ in range(3)) / n
                rows.append((name, op, alone * 1e9,
                             *(at_once(daemon.address, script, query, clients) * n
                               for clients in (1, WORKERS))))
        finally:
            daemon.stop()
    return rows


def from_lua_into_python(ops):
    """ns per call of get/incr from a LuaJIT loop into each store's Python function."""
    module = vm.load("luajit")
    loop = module.LuaRuntime(encoding=None).eval(
        "function(f, key, n) local clock = os.clock local t = clock() "
        "for _ = 1, n do f(key) end return clock() - t end")
    rows = []
    for name, get, incr in stores():
        for op, function in (("get", get), ("incr", incr)):
            function(b"page" if op == "get" else b"counter")
            seconds = min(loop(function, b"page" if op == "get" else b"counter", ops // 10)
                          for _ in range(3))
            rows.append((name, op, seconds / (ops // 10) * 1e9))
    return rows


def stores():
    dictionary = Dictionaries({"bench": 10 << 20}).all[0]
    dictionary.store("set", b"page", 1, b"<p>hello, world</p>", 0, 0)
    dictionary.store("set", b"counter", 2, 0.0, 0, 0)
    yield ("this dictionary, through Python", dictionary.get,
           lambda key: dictionary.incr(key, 1, False, None, False, 0))
    directory = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        import lmdb
    except ImportError:
        print("  LMDB: the lmdb package is not installed; skipped (pip install lmdb)")
    else:
        env = lmdb.open(os.path.join(directory, "lmdb"), map_size=10 << 20, sync=False)
        with env.begin(write=True) as txn:
            txn.put(b"page", b"<p>hello, world</p>")
            txn.put(b"counter", b"0")

        def lmdb_get(key):
            with env.begin() as txn:
                return txn.get(key)

        def lmdb_incr(key):
            with env.begin(write=True) as txn:
                value = int(txn.get(key)) + 1
                txn.put(key, str(value).encode())
                return value
        yield "LMDB on /dev/shm, through Python", lmdb_get, lmdb_incr
    db = sqlite3.connect(os.path.join(directory, "sqlite.db"), isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE kv (k BLOB PRIMARY KEY, v)")
    db.executemany("INSERT INTO kv VALUES (?, ?)",
                   ((b"page", b"<p>hello, world</p>"), (b"counter", 0)))
    yield ("SQLite WAL on /dev/shm, through Python",
           lambda key: db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()[0],
           lambda key: db.execute("UPDATE kv SET v = v + 1 WHERE k = ? RETURNING v",
                                  (key,)).fetchone()[0])


def ffi_in_this_process(ops, workdir):
    """ns per get and incr of this dictionary through LuaJIT's FFI, in a state of this
    process (the daemon's figures, without a daemon)."""
    script = Site(os.path.join(workdir, "local")).write("bench.lua", PAGE)
    cfg = config.defaults()
    state = LuaState(script, cfg, search_paths(os.path.dirname(script), cfg.lua),
                     Dictionaries({"bench": 10 << 20}))
    state.load()
    rows = []
    for op in ("get", "incr"):
        params = encode_params({b"QUERY_STRING": f"{op}&{ops}".encode()})
        seconds = min(float(state.serve(params, b"", None).payload) for _ in range(3))
        rows.append(("this dictionary, LuaJIT FFI", op, seconds / ops * 1e9))
    state.close()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200000, help="operations per request")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        print(f"## Through the daemon (2 processes of 2 workers), {args.ops} operations per "
              f"request\n")
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n")
        print("| path | operation | ns per operation | operations/s, 1 request | "
              "operations/s, 4 at once |")
        print("| --- | --- | ---: | ---: | ---: |")
        for name, op, alone, one, busy in through_the_daemon(args.ops, workdir):
            print(f"| {name} | {op if op != 'table' else 'Lua table lookup'} | {alone:,.0f} | "
                  f"{one:,.0f} | {busy:,.0f} |")
        print("\n## The stores considered, from a LuaJIT loop in one process\n")
        print("| store | operation | ns per operation |")
        print("| --- | --- | ---: |")
        for name, op, ns in ffi_in_this_process(args.ops, workdir) + from_lua_into_python(args.ops):
            print(f"| {name} | {op} | {ns:,.0f} |")


if __name__ == "__main__":
    main()
