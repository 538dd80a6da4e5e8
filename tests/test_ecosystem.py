"""Lua C and pure-Lua modules from Debian packages, in every Lua VM luafcgid offers, end to
end through nginx; the guestbook example; Lua finalizers when states are closed."""

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, wait_for
from ecosystem import VMS, require_debian_modules, start_stack

EXAMPLES = os.path.join(ROOT, "examples")

LIBRARIES_PAGE = """
local cjson = require("cjson")
local lpeg = require("lpeg")
local socket = require("socket")
local lfs = require("lfs")
local stringx = require("pl.stringx")
local List = require("pl.List")
local luasql = require("luasql.sqlite3")

-- one in-memory database per state, opened when the state loads
local db = assert(assert(luasql.sqlite3()):connect(":memory:"))
assert(db:execute("CREATE TABLE hits (note TEXT)"))

local date = lpeg.C(lpeg.R("09")^4) * "-" * lpeg.C(lpeg.R("09")^2)

function main(env, con)
  local input = cjson.decode(con:gets())
  assert(db:execute(("INSERT INTO hits VALUES ('%s')"):format(db:escape(input.note))))
  local cursor = db:execute("SELECT COUNT(*), MAX(note) FROM hits")
  local count, note = cursor:fetch()
  cursor:close()
  con:header("Content-Type", "application/json")
  con:puts(cjson.encode({
    version = _VERSION,
    jit = jit and jit.version or cjson.null,
    lpeg = {lpeg.match(date, input.date)},
    gettime = type(socket.gettime()),
    hostname = socket.dns.gethostname(),
    mode = lfs.attributes(env.SCRIPT_FILENAME, "mode"),
    split = stringx.split(input.csv, ","),
    sorted = List(input.numbers):sort():slice(1, 3),
    hits = tonumber(count),
    note = note,
  }))
end
"""


@pytest.fixture(scope="module", params=VMS)
def vm_stack(request, tmp_path_factory):
    """One daemon per Lua VM, behind nginx."""
    vm = request.param
    require_debian_modules(vm)
    s = start_stack(tmp_path_factory.mktemp(f"vm-{vm}"), lua=vm)
    yield vm, s
    s.stop()


def post_json(stack, path, value):
    status, headers, body = stack.get(path, method="POST", body=json.dumps(value).encode(),
                                      headers={"Content-Type": "application/json"})
    assert status == 200, body
    return json.loads(body)


def test_debian_libraries_load_in_every_state(vm_stack):
    vm, s = vm_stack
    # two scripts: two states, each loading the C modules itself
    for name in ("libs_a.lua", "libs_b.lua"):
        s.write(name, LIBRARIES_PAGE)
    request = {"note": "it's", "date": "2024-05", "csv": "a,b,c", "numbers": [5, 3, 9, 1]}
    for name in ("libs_a.lua", "libs_b.lua"):
        first = post_json(s, f"/{name}", request)
        second = post_json(s, f"/{name}", request)
        expected_version = "Lua 5.1" if vm == "luajit" else f"Lua {vm}"
        assert first["version"] == expected_version
        assert (first["jit"] or "").startswith("LuaJIT") == (vm == "luajit")
        assert first["lpeg"] == ["2024", "05"]
        assert first["gettime"] == "number"
        assert first["hostname"] == socket.gethostname()
        assert first["mode"] == "file"
        assert first["split"] == ["a", "b", "c"]
        assert first["sorted"] == [1, 3, 5]
        assert first["note"] == "it's"
        # the database opened at load time persists across the state's requests
        assert (first["hits"], second["hits"]) == (1, 2)


def test_guestbook_example_in_every_vm(vm_stack):
    vm, s = vm_stack
    shutil.copy(os.path.join(EXAMPLES, "guestbook.lua"), s.site.file("guestbook.lua"))
    status, headers, _ = s.get("/guestbook.lua", method="POST", body=b"name=Ann&message=hi+%3Cthere%3E",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303 and headers["location"] == "/guestbook.lua"
    status, _, body = s.get("/guestbook.lua")
    assert status == 200
    assert b"<b>Ann</b>: hi &lt;there&gt;" in body


# -- the guestbook's connections ------------------------------------------------------------

# Counts, from outside the example, the states that load it and the connections they open:
# wraps luasql.sqlite3() so that every connect() appends a line to a file.
COUNTING_PRELUDE = """
local log_file = "{log}"
local function note(what)
  local f = assert(io.open(log_file, "a")); f:write(what, "\\n"); f:close()
end
note("state")
local luasql = require("luasql.sqlite3")
local make_env = luasql.sqlite3
luasql.sqlite3 = function(...)
  local env = assert(make_env(...))
  return setmetatable({{}}, {{__index = function(_, name)
    if name == "connect" then
      return function(_, ...) note("connect"); return env:connect(...) end
    end
    return function(_, ...) return env[name](env, ...) end
  end}})
end
"""


def test_guestbook_opens_one_connection_per_state(tmp_path):
    log = tmp_path / "opened.txt"
    prelude = tmp_path / "count.lua"
    prelude.write_text(COUNTING_PRELUDE.format(log=log))
    s = start_stack(tmp_path / "stack", workers=1, states=1, prelude=str(prelude))
    try:
        shutil.copy(os.path.join(EXAMPLES, "guestbook.lua"), s.site.file("guestbook.lua"))
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for i in range(5):
            status, _, _ = s.get("/guestbook.lua", method="POST",
                                 body=f"name=n{i}&message=m{i}".encode(), headers=form)
            assert status == 303
        status, _, body = s.get("/guestbook.lua")
        assert all(f"<b>n{i}</b>: m{i}".encode() in body for i in range(5))
        assert log.read_text().split() == ["state", "connect"]   # 6 requests, 1 state

        # a second state (the first is evicted: states is 1) opens its own connection
        s.write("other.lua", "function main(env, con) con:puts('other') end")
        assert s.get("/other.lua")[2] == b"other"
        assert s.get("/guestbook.lua")[0] == 200
        assert log.read_text().split() == ["state", "connect", "state", "state", "connect"]
    finally:
        s.stop()
    rows = sqlite3.connect(s.site.file("guestbook.sqlite3")).execute(
        "SELECT name, message FROM entries ORDER BY id").fetchall()
    assert rows == [(f"n{i}", f"m{i}") for i in range(5)]


# -- closing states runs Lua finalizers -------------------------------------------------

FINALIZER_SCRIPT = """
-- {tag}
local function on_gc()
  local f = io.open("{marker}", "a"); f:write("{tag}\\n"); f:close()
end
if newproxy then   -- Lua 5.1 and LuaJIT: only userdata have __gc
  sentinel = newproxy(true); getmetatable(sentinel).__gc = on_gc
else
  sentinel = setmetatable({{}}, {{__gc = on_gc}})
end
function main(env, con) con:puts("{tag}") end
"""


def finalizers_run(marker):
    return marker.read_text().split() if marker.exists() else []


@pytest.mark.parametrize("vm", ["luajit", "5.4"])
def test_finalizers_run_when_a_changed_script_is_flushed(tmp_path, vm):
    marker = tmp_path / "gc.txt"
    s = start_stack(tmp_path / "stack", lua=vm)
    try:
        s.write("fin.lua", FINALIZER_SCRIPT.format(tag="one", marker=marker))
        assert s.get("/fin.lua")[2] == b"one"
        assert finalizers_run(marker) == []
        s.write("fin.lua", FINALIZER_SCRIPT.format(tag="two!", marker=marker))
        wait_for(lambda: s.get("/fin.lua")[2] == b"two!", what="the changed script to load")
        wait_for(lambda: finalizers_run(marker) == ["one"], what="the old state's finalizer")
    finally:
        s.stop()


def test_finalizers_run_on_eviction_and_shutdown(tmp_path):
    marker = tmp_path / "gc.txt"
    s = start_stack(tmp_path / "stack", workers=1, states=1)
    s.write("a.lua", FINALIZER_SCRIPT.format(tag="a", marker=marker))
    s.write("b.lua", FINALIZER_SCRIPT.format(tag="b", marker=marker))
    try:
        assert s.get("/a.lua")[2] == b"a"
        assert s.get("/b.lua")[2] == b"b"   # evicts a's state
        # closed on the closer's thread (states/closer.py), maybe after b's answer
        wait_for(lambda: finalizers_run(marker) == ["a"], what="a's finalizer")
    finally:
        assert s.stop() == 0
    assert finalizers_run(marker) == ["a", "b"]


def test_close_runs_finalizers_at_once_without_the_cycle_collector(tmp_path):
    """LuaState.close() collects the script's objects and drops the last reference to the
    runtime, so lupa calls lua_close() right there: no reference cycle leaves the state (and
    its DB connections) open until Python's cycle collector happens to run."""
    marker = tmp_path / "gc.txt"
    script = tmp_path / "fin.lua"
    script.write_text(FINALIZER_SCRIPT.format(tag="closed", marker=marker))
    program = textwrap.dedent(f"""
        import gc, os
        gc.disable()
        from luafcgid import config
        from luafcgid.request.fastcgi import encode_params
        from luafcgid.states.searchpath import search_paths
        from luafcgid.states.state import LuaState

        class Out:
            def write(self, data): pass

        cfg = config.defaults()
        for _ in range(3):
            state = LuaState({str(script)!r}, cfg, search_paths({str(tmp_path)!r}, cfg.lua))
            state.load()
            assert state.serve(encode_params({{b"REQUEST_METHOD": b"GET"}}), b"", Out())[0]
            before = os.path.exists({str(marker)!r})
            state.close()
            print(before, open({str(marker)!r}).read().split())
    """)
    out = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[:3] == ["False ['closed']", "True ['closed', 'closed']",
                       "True ['closed', 'closed', 'closed']"]


def test_the_example_index_links_each_example_once(stack):
    s = stack()
    shutil.copy(os.path.join(EXAMPLES, "index.lua"), s.site.file("index.lua"))
    status, _, body = s.get("/index.lua")
    assert status == 200
    pages = [href.split("?")[0] for href in re.findall(r'href="([^"]+)"', body.decode())]
    assert len(pages) == len(set(pages)) >= 5, pages
    assert all(os.path.exists(os.path.join(EXAMPLES, page)) for page in pages), pages
