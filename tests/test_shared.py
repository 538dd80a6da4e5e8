"""Shared dictionaries (setting `shared`, issue 21): one store for every state, worker and
process, through a real daemon of 2 processes of 2 workers behind nginx, on every Lua VM:
LuaJIT works on the shared memory through its FFI, Lua 5.1 and 5.4 through Python."""

import json
import os
import re
import signal
import time

import pytest

from conftest import InThread, Stack, skip_unless, wait_for
from luafcgid import config
from luafcgid.shared import layout, mutex
from luafcgid.shared.dictionaries import Dictionaries
from luafcgid.states import vm
from luafcgid.states.deadline import Watcher
from luafcgid.states.searchpath import search_paths
from luafcgid.states.state import LuaState
from luafcgid.states.worker import Workers

VMS = ("luajit", "5.4", "5.1")

# Each page reports the process that answered, so that a test can see every one answer.
PID = 'local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")\n'

PAGES = {
    "incr.lua": """
        local d = require("luafcgid").shared.t
        function main(env, con) con:puts((assert(d:incr(env.QUERY_STRING, 1, 0)))) end
    """,
    "get.lua": PID + """
        local d = require("luafcgid").shared.t
        function main(env, con)
          local v = d:get(env.QUERY_STRING)
          con:puts(pid, " ", type(v), " ", ("%q"):format(tostring(v)))
        end
    """,
    # a value of each type, then what every process reads of them
    "types.lua": PID + """
        local d = require("luafcgid").shared.t
        function main(env, con)
          if env.QUERY_STRING == "set" then
            assert(d:set("s", "a\\0b\\0" .. ("\\255"):rep(100)))
            assert(d:set("i", 42))
            assert(d:set("f", -1.5))
            assert(d:set("yes", true))
            assert(d:set("no", false))
            return con:puts(pid)
          end
          os.execute("sleep 0.05")   -- long enough that 8 clients need both processes
          local out = {pid}
          for _, k in ipairs({"s", "i", "f", "yes", "no"}) do
            local v = d:get(k)
            out[#out + 1] = type(v) .. ":" .. (type(v) == "string" and (#v .. ":" ..
              v:byte(2) .. v:byte(-1)) or tostring(v))
          end
          con:puts(table.concat(out, " "))
        end
    """,
    "ttl.lua": """
        local d = require("luafcgid").shared.t
        function main(env, con)
          if env.QUERY_STRING == "set" then assert(d:set("brief", "here", 1)) end
          con:puts(tostring(d:get("brief")), " ", tostring(d:get_stale("brief")))
        end
    """,
    # fills the 64K dictionary with safe_set, uses the first key, then sets one more
    "full.lua": """
        local d = require("luafcgid").shared.small
        function main(env, con)
          d:flush_all()
          d:flush_expired()
          local n, ok, err = 0
          repeat
            n = n + 1
            ok, err = d:safe_set("k" .. n, ("v"):rep(100))
          until not ok
          local filled = n - 1
          assert(d:get("k1"))   -- now the most recently used: k2 is the least
          local set_ok, set_err, forcible = d:set("new", ("w"):rep(100))
          con:puts(table.concat({tostring(err), filled, tostring(set_ok), tostring(set_err),
            tostring(forcible), tostring(d:get("k1") ~= nil), tostring(d:get("k2") ~= nil),
            tostring(d:get("k3") ~= nil), tostring(d:get("new") ~= nil)}, "|"))
        end
    """,
    "errors.lua": """
        local d = require("luafcgid").shared.t
        local small = require("luafcgid").shared.small
        function main(env, con)
          local out = {}
          local function say(...) out[#out + 1] = table.concat({tostring(select(1, ...)),
            tostring(select(2, ...))}, " ") end
          say(d:get(nil))
          say(d:get(""))
          say(d:get(("x"):rep(65536)))
          say(d:set("table", {}))
          d:set("here", "x")
          say(d:add("here", "y"))
          say(d:replace("absent", "y"))
          say(d:incr("absent", 1))
          say(d:incr("here", 1))
          say(small:safe_set("huge", ("x"):rep(100000)))
          say(pcall(d.get, "here"))
          say(pcall(d.set, d, "k", "v", -1))
          con:puts(table.concat(out, "\\n"))
        end
    """,
}

SETTINGS = {"processes": 2, "workers": 2, "states": 4, "status_path": "/status.lua",
            "shared": {"t": "1M", "small": "64K"}}


def _start(tmp_path, lua, **settings):
    skip_unless(vm.available(lua), f"lupa ships no Lua {lua}")
    s = Stack(tmp_path, {**SETTINGS, "lua": lua, **settings})
    for name, code in PAGES.items():
        s.write(name, code)
    return s.start()


@pytest.fixture(scope="module", params=VMS)
def served(request, tmp_path_factory):
    """One daemon per VM for the tests that only read and write."""
    s = _start(tmp_path_factory.mktemp(f"shared-{request.param}"), request.param)
    yield s
    s.stop()


def _get(s, path):
    status, _, body = s.get(path)
    assert status == 200, body
    return body.decode()


def _in_parallel(s, path, clients, each):
    """Every answer of `clients` threads making `each` requests."""
    runs = [InThread(lambda: [_get(s, path) for _ in range(each)]) for _ in range(clients)]
    return [answer for run in runs for answer in run.result(120)]


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as stream:
        return set(int(p) for p in stream.read().split())


def test_concurrent_increments_are_all_counted(served):
    answers = _in_parallel(served, "/incr.lua?hits", clients=8, each=250)
    assert sorted(int(a) for a in answers) == list(range(1, 2001))
    assert _get(served, "/get.lua?hits").split(" ", 1)[1] in ('number "2000"', 'number "2000.0"')


EXPECTED = ("string:104:0255 number:42 number:-1.5 boolean:true boolean:false")


def _read_everywhere(s, parent):
    """What each serving process reads of the values types.lua set."""
    answers = _in_parallel(s, "/types.lua", clients=8, each=4)
    seen = {}
    for answer in answers:
        pid, values = answer.split(" ", 1)
        seen.setdefault(int(pid), set()).add(values)
    assert set(seen) == _children(parent), "every process answered"
    return seen


def test_a_value_set_in_one_process_is_read_in_every_process_with_its_type(served):
    _get(served, "/types.lua?set")
    seen = _read_everywhere(served, served.daemon.proc.pid)
    assert all(values == {EXPECTED} for values in seen.values()), seen


def test_a_key_expires_after_its_ttl(served):
    assert _get(served, "/ttl.lua?set") == "here here"
    time.sleep(1.1)   # the expiry under test, not synchronisation
    assert _get(served, "/ttl.lua") == "nil here"


def test_a_full_dictionary_evicts_the_least_recently_used_on_set(served):
    err, filled, ok, set_err, forcible, k1, k2, k3, new = _get(served, "/full.lua").split("|")
    assert err == "no memory" and int(filled) > 100   # safe_set refused, evicting nothing
    # set evicted k2, the least recently used (k1 was read since): one 2-chunk entry's room
    assert (ok, set_err, forcible) == ("true", "nil", "true")
    assert (k1, k2, k3, new) == ("true", "false", "true", "true")


def test_errors_come_back_as_nil_and_a_message(served):
    lines = _get(served, "/errors.lua").split("\n")
    assert lines[:10] == [
        "nil nil key", "nil empty key", "nil key too long",
        "nil bad value type (table): a shared dictionary holds strings, numbers, booleans and nil",
        "false exists", "false not found", "nil not found", "nil not a number",
        "false no memory",
        'false bad "zone" argument: call the methods with a colon, as dict:get(key)']
    assert re.fullmatch(r"false .*bad exptime arg: seconds \(a number, 0 or more\) expected, "
                        r"got -1", lines[10])


# Frees what nothing refers to, fills the memory again, then has LuaJIT compile operations.
COLLECTED = """
local d = require("luafcgid").shared.t
collectgarbage()
collectgarbage()
for i = 1, 200000 do local t = {i, i} end
function main(env, con)
  local big = ("x"):rep(1000)
  for i = 1, 2000 do
    d:incr("hits", 1, 0)
    d:set("k" .. (i % 50), big)
    d:get("k" .. (i % 37))
  end
  con:puts("ok")
end
"""


NO_FFI = """
local shared = require("luafcgid").shared
function main(env, con)
  con:puts(tostring(package.loaded.ffi), " ", tostring((pcall(require, "ffi"))))
end
"""


def test_the_dictionaries_keep_the_ffi_module_and_hand_scripts_none(stack):
    # With `ffi` off (the default) runtime.lua takes the ffi module out of package.loaded,
    # after LuaJIT's dictionaries took it: scripts can neither require it nor find it loaded.
    # The dictionaries must keep it, or LuaJIT frees the tables its FFI works with and the
    # serving process dies (SIGSEGV: nginx answered 502).
    s = stack(shared={"t": "4M"})
    s.write("no_ffi.lua", NO_FFI)
    s.write("collected.lua", COLLECTED)
    assert _get(s, "/no_ffi.lua") == "nil false"
    for _ in range(5):
        assert _get(s, "/collected.lua") == "ok"
    assert "exited" not in s.daemon.log()


def test_the_status_page_lists_each_dictionary(served):
    _get(served, "/incr.lua?status")
    text = _get(served, "/status.lua")
    assert re.search(r"^shared: small capacity 65536 free \d+ keys \d+$", text, re.M)
    match = re.search(r"^shared: t capacity 1048576 free (\d+) keys (\d+)$", text, re.M)
    assert match and 0 < int(match.group(1)) < 1048576 and int(match.group(2)) >= 1
    data = json.loads(_get(served, "/status.lua?json"))
    t = next(d for d in data["shared"] if d["name"] == "t")
    assert t["capacity"] == 1048576 and t["keys"] >= 1 and 0 < t["free_space"] < 1048576
    metrics = _get(served, "/status.lua?openmetrics")
    assert 'luafcgid_shared_capacity_bytes{dict="t"} 1048576' in metrics
    assert re.search(r'^luafcgid_shared_free_bytes\{dict="t"\} \d+$', metrics, re.M)
    assert re.search(r'^luafcgid_shared_keys\{dict="small"\} \d+$', metrics, re.M)


@pytest.mark.parametrize("lua", ("luajit", "5.4"))
def test_values_survive_sighup_and_a_killed_process(tmp_path, lua):
    s = _start(tmp_path, lua)
    try:
        parent = s.daemon.proc.pid
        wait_for(lambda: len(_children(parent)) == 2, what="two serving processes")
        _get(s, "/types.lua?set")
        s.daemon.signal(signal.SIGHUP)
        wait_for(lambda: s.daemon.log().count("reloaded ") == 2, what="both processes to reload")
        assert all(v == {EXPECTED} for v in _read_everywhere(s, parent).values())
        victim = min(_children(parent))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(_children(parent)) == 2 and victim not in _children(parent),
                 what="the killed process to be replaced")
        seen = _read_everywhere(s, parent)
        assert victim not in seen and all(v == {EXPECTED} for v in seen.values())
    finally:
        s.stop()


def test_the_example_counts_visits_and_limits_the_rate(tmp_path):
    s = Stack(tmp_path, {"processes": 2, "workers": 2, "shared": {"site": "1M"}})
    with open(os.path.join(os.path.dirname(__file__), "..", "examples", "shared.lua")) as f:
        s.write("shared.lua", f.read())
    s.start()
    try:
        bodies = [_get(s, "/shared.lua") for _ in range(10)]
        assert [int(b.split()[2].rstrip(",")) for b in bodies] == list(range(1, 11))
        assert "You used 10 of 10 requests" in bodies[-1]
        status, headers, body = s.get("/shared.lua")
        assert status == 429 and b"Slow down" in body and int(headers["retry-after"]) <= 10
    finally:
        s.stop()


# -- the two implementations and the lock, in this process ----------------------------------

CROSS = """
local d = require("luafcgid").shared.x
function main(env, con)
  local long = ("key"):rep(30)
  local v1, v2, v3, v4 = d:get("s"), d:get(long), d:get("n"), d:get("b")
  assert(d:set("from lua", "\\0lua\\0"))
  assert(d:set(long .. "!", ("\\1\\2"):rep(5000), 0, 9))
  assert(d:incr("n", 0.5))
  con:puts(#v1, v1:sub(1, 4), " ", #v2, " ", v2:sub(-3), " ", v3, " ", tostring(v4))
end
"""


def test_lua_and_python_agree_on_the_same_memory(tmp_path):
    dictionaries = Dictionaries({"x": 1 << 20})
    x = dictionaries.all[0]
    long = b"key" * 30
    assert x.store("set", b"s", 1, b"\0py\0" * 1000, 0, 0)[0]
    assert x.store("set", long, 1, bytes(range(256)) * 40, 0, 0)[0]
    assert x.store("set", b"n", 2, 41.5, 0, 0)[0]
    assert x.store("set", b"b", 3, True, 0, 0)[0]
    script = tmp_path / "cross.lua"
    script.write_text(CROSS)
    cfg = config.defaults()   # luajit: the FFI path
    state = LuaState(str(script), cfg, search_paths(str(tmp_path), cfg.lua), dictionaries)
    try:
        state.load()
        result = state.serve(b"", b"", None)   # no params (encoded)
        assert result.ok, result.message
        assert result.payload == b"4000\0py\0 10240 \xfd\xfe\xff 41.5 true"
    finally:
        state.close()
    assert x.get(b"from lua") == b"\0lua\0"
    assert x.get(long + b"!") == (b"\1\2" * 5000, 9)
    assert x.get(b"n") == 42.0
    assert x.stats()[2] == 6


def test_a_process_killed_holding_the_lock_leaves_the_dictionary_usable():
    x = Dictionaries({"x": 1 << 16}).all[0]
    assert x.store("set", b"k", 1, b"v", 0, 0)[0]
    pid = os.fork()
    if pid == 0:   # dies holding the mutex, halfway through a change of the structure
        mutex.lock(x._mutex)
        x._w[layout.HEADER_AT["dirty"] // 4] = 1
        os._exit(0)
    os.waitpid(pid, 0)
    assert x.get(b"k") is None   # emptied rather than trusted
    assert x.store("set", b"k", 1, b"again", 0, 0)[0] and x.get(b"k") == b"again"


SPIN = """
local d = require("luafcgid").shared.x
local big = ("x"):rep(500000)
function main(env, con) while true do d:set("big", big) end end
"""


def test_a_call_stopped_inside_an_operation_lets_go_of_the_lock(tmp_path):
    # LuaJIT's operations run Lua code holding the mutex, and request_timeout stops SPIN
    # there (copying 500 KB in 124-byte pieces is nearly all its time). Its worker lets go of
    # the mutex after; otherwise every other thread's and process's operations would wait
    # until that worker's thread happened to run one.
    dictionaries = Dictionaries({"x": 1 << 20})
    script = tmp_path / "spin.lua"
    script.write_text(SPIN)
    cfg = config.defaults(request_timeout=0.2)
    workers = Workers(lambda number: "worker")
    watcher = Watcher(workers, lambda: cfg)
    watcher.start()
    worker = workers.add()
    state = LuaState(str(script), cfg, search_paths(str(tmp_path), cfg.lua), dictionaries)
    try:
        state.load()   # without a deadline: only the request is to be stopped
        assert state.serve(b"", b"", None, worker).kind == "Timeout Error"
    finally:
        watcher.stop()
        state.close()
    # stopped while it changed the structure: emptied rather than trusted
    assert InThread(dictionaries.all[0].stats).result(10)[2] == 0


HUGE = """
local d = require("luafcgid").shared.x
function main(env, con)
  local ok, err = pcall(d.get, d, "huge")   -- more than memory_limit lets the state allocate
  local again = select(2, pcall(d.get, d, "small"))
  con:puts(tostring(ok), "|", tostring(err):match("not enough memory") or err, "|", again)
end
"""


def test_an_operation_failing_inside_lets_go_of_the_lock_when_the_call_ends(tmp_path):
    # LuaJIT's operations run without pcall (it would stop its traces): an error inside one,
    # caught by the script, leaves the mutex held until the request ends, not longer.
    dictionaries = Dictionaries({"x": 4 << 20})
    x = dictionaries.all[0]
    assert x.store("set", b"huge", 1, b"x" * (3 << 20), 0, 0)[0]
    assert x.store("set", b"small", 1, b"s", 0, 0)[0]
    script = tmp_path / "huge.lua"
    script.write_text(HUGE)
    cfg = config.defaults(memory_limit="2M", maxpost=1024)
    state = LuaState(str(script), cfg, search_paths(str(tmp_path), cfg.lua), dictionaries)
    try:
        state.load()
        result = state.serve(b"", b"", None)   # no params (encoded)
    finally:
        state.close()
    ok, err, again = result.payload.decode().split("|")
    assert (ok, err) == ("false", "not enough memory")
    assert "used while one of its operations is unfinished" in again
    assert InThread(x.get, b"small").result(10) == b"s"


def test_the_setting_names_each_dictionary_and_its_capacity():
    assert config.defaults(shared={"a": "64K", "b_2": "10M"}).shared == {
        "a": 65536, "b_2": 10 << 20}
    for value, message in (({"bad-name": "1M"}, "must be a Lua name"),
                           ({"a": "1K"}, "a: a capacity from 64K to 64G"),
                           ({"a": "lots"}, 'a: expected a size like "64M"'),
                           (["a"], "expected a mapping of name: capacity")):
        with pytest.raises(config.ConfigError) as info:
            config.defaults(shared=value)
        assert message in str(info.value)
