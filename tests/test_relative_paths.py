"""Relative file names resolve against the running script's directory, for Lua's functions
and for C modules (LuaSQL, DBI, lfs) alike: each worker thread has its own working
directory (Linux, unshare(CLONE_FS)), so a script that changes it (lfs.chdir, as CGILua
does) moves no other request's. Where unshare is refused, Lua's file functions are rewritten
instead. Through a real nginx, with Debian's Lua packages."""

import os
import sqlite3
import sys

import pytest

from conftest import ROOT, Fifo, InThread, Stack, skip_unless, wait_for
from ecosystem import require_debian_modules
from unshare_refused import supported as seccomp_supported

HERE = os.path.dirname(os.path.abspath(__file__))
DBI_MODULE = "/usr/share/lua/5.1/DBI.lua"   # lua-dbi-common, for Lua 5.1 and LuaJIT
DAEMON_DIR = os.path.realpath(ROOT)   # the tests start the daemon there

HELLO = 'function main(env, con) con:puts("hello") end'


def table_rows(path, table):
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT * FROM {table}").fetchall()


def thread_directories(pid):
    """The working directory of each of the process's threads."""
    return [os.readlink(f"/proc/{pid}/task/{tid}/cwd") for tid in os.listdir(f"/proc/{pid}/task")]


@pytest.mark.parametrize("vm", ["luajit", "5.1", "5.4"])
def test_luasql_opens_app_db_next_to_the_script(stack, vm):
    require_debian_modules(vm)
    s = stack(lua=vm)
    s.write("app/notes.lua", """
        local lfs = require("lfs")
        local luasql = require("luasql.sqlite3")
        local db = assert(assert(luasql.sqlite3()):connect("app.db"))   -- at load time
        assert(db:execute("CREATE TABLE IF NOT EXISTS notes (note TEXT)"))
        function main(env, con)
          assert(db:execute("INSERT INTO notes VALUES ('" .. env.QUERY_STRING .. "')"))
          local other = assert(assert(luasql.sqlite3()):connect("other.db"))   -- per request
          assert(other:execute("CREATE TABLE IF NOT EXISTS t (x)"))
          other:close()
          local f = assert(io.open("note.txt", "w")); f:write("written"); f:close()
          con:puts(lfs.currentdir())
        end
    """)
    app = os.path.realpath(s.site.file("app"))
    for note in ("one", "two"):
        status, _, body = s.get(f"/app/notes.lua?{note}")
        assert status == 200, body
        assert body.decode() == app
    assert table_rows(os.path.join(app, "app.db"), "notes") == [("one",), ("two",)]
    assert os.path.exists(os.path.join(app, "other.db"))
    assert open(os.path.join(app, "note.txt")).read() == "written"
    # the daemon's own working directory (its main thread's) did not move
    assert os.readlink(f"/proc/{s.daemon.proc.pid}/cwd") == DAEMON_DIR
    assert not os.path.exists(os.path.join(DAEMON_DIR, "app.db"))
    assert "each worker thread changes into the script's directory" in s.daemon.log()


@pytest.mark.parametrize("vm", ["luajit", "5.1"])
def test_dbi_opens_app_db_next_to_the_script(stack, vm):
    require_debian_modules(vm)
    skip_unless(os.path.exists(DBI_MODULE),
                "lua-dbi-sqlite3 is not installed (apt-get install lua-dbi-sqlite3)")
    s = stack(lua=vm)
    s.write("shop/orders.lua", """
        local DBI = require("DBI")
        local db = assert(DBI.Connect("SQLite3", "app.db"))
        assert(DBI.Do(db, "CREATE TABLE IF NOT EXISTS orders (item TEXT)"))
        db:commit()
        function main(env, con)
          local insert = assert(db:prepare("INSERT INTO orders VALUES (?)"))
          assert(insert:execute(env.QUERY_STRING))
          db:commit()
          local query = assert(db:prepare("SELECT COUNT(*) FROM orders"))
          query:execute()
          con:puts(query:fetch(false)[1])
        end
    """)
    shop = os.path.realpath(s.site.file("shop"))
    assert s.get("/shop/orders.lua?tea")[2] == b"1"
    assert s.get("/shop/orders.lua?cake")[2] == b"2"
    assert table_rows(os.path.join(shop, "app.db"), "orders") == [("tea",), ("cake",)]
    assert not os.path.exists(os.path.join(DAEMON_DIR, "app.db"))


CHDIR_PAGE = """
local lfs = require("lfs")
function main(env, con)
  assert(lfs.chdir("{elsewhere}"))
  local f = assert(io.open("{marker}", "w")); f:write(lfs.currentdir()); f:close()
  local fifo = assert(io.open("{fifo}", "r")); fifo:read("*a"); fifo:close()
  con:puts(lfs.currentdir())
end
"""

LOADING_PAGE = """
local lfs = require("lfs")
local luasql = require("luasql.sqlite3")
local db = assert(assert(luasql.sqlite3()):connect("app.db"))   -- while the other page waits
assert(db:execute("CREATE TABLE IF NOT EXISTS loads (x)"))
local loaded_in = lfs.currentdir()
function main(env, con) con:puts(loaded_in) end
"""


@pytest.mark.parametrize("vm", ["luajit", "5.4"])
def test_lfs_chdir_on_one_worker_moves_no_other_requests_files(stack, tmp_path, vm):
    require_debian_modules(vm)
    s = stack(lua=vm, workers=2, shutdown_timeout=5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere = elsewhere.resolve()
    marker, fifo = tmp_path / "changed", Fifo(tmp_path / "fifo")
    s.write("a/chdir.lua", CHDIR_PAGE.format(elsewhere=elsewhere, marker=marker, fifo=fifo.path))
    s.write("b/load.lua", LOADING_PAGE)
    s.write("hello.lua", HELLO)
    b = os.path.realpath(s.site.file("b"))
    held = InThread(s.get, "/a/chdir.lua")
    try:
        wait_for(lambda: marker.exists() or held.done(), what="the page to change directory")
        assert marker.exists(), f"the page ended early: {held.result()}"
        # worker 1 now sits in `elsewhere`; script b loads on worker 2
        status, _, body = s.get("/b/load.lua")
        assert (status, body.decode()) == (200, b)
        neighbours = [s.get("/hello.lua")[0] for _ in range(20)]
        assert neighbours == [200] * 20
    finally:
        released = fifo.release()
    status, _, body = held.result()
    assert released and (status, body.decode()) == (200, str(elsewhere))
    assert os.path.exists(os.path.join(b, "app.db"))
    assert not os.path.exists(elsewhere / "app.db")
    assert s.daemon.proc.poll() is None and s.get("/hello.lua")[0] == 200


def test_a_request_starts_in_its_scripts_directory_after_a_chdir(stack):
    require_debian_modules("luajit")
    s = stack(workers=1)
    s.write("site/sub/.keep", "")
    s.write("site/move.lua", """
        local lfs = require("lfs")
        function main(env, con) assert(lfs.chdir("sub")); con:puts(lfs.currentdir()) end
    """)
    s.write("site/where.lua", """
        local lfs = require("lfs")
        function main(env, con) con:puts(lfs.currentdir()) end
    """)
    site = os.path.realpath(s.site.file("site"))
    assert s.get("/site/move.lua")[2].decode() == os.path.join(site, "sub")
    # the same worker (workers: 1), the same directory: it must not stay in sub/
    assert s.get("/site/where.lua")[2].decode() == site
    assert s.get("/site/move.lua")[2].decode() == os.path.join(site, "sub")


def test_worker_threads_have_their_own_working_directory(stack):
    s = stack(workers=2, states=4)
    s.write("x/page.lua", HELLO)
    s.write("y/page.lua", HELLO)
    for _ in range(4):
        assert s.get("/x/page.lua")[0] == 200 and s.get("/y/page.lua")[0] == 200
    directories = thread_directories(s.daemon.proc.pid)
    scripts = {os.path.realpath(s.site.file(d)) for d in ("x", "y")}
    # the workers are in the scripts' directories (and so are the file watcher's threads a
    # worker started, which share its working directory and use absolute paths); the
    # process's own working directory, the main thread's, has not moved
    assert scripts & set(directories)
    assert set(directories) <= scripts | {DAEMON_DIR}
    assert os.readlink(f"/proc/{s.daemon.proc.pid}/cwd") == DAEMON_DIR


@pytest.mark.skipif(not seccomp_supported(), reason="the seccomp filter knows x86_64 and "
                    "aarch64 only")
def test_where_unshare_is_refused_lua_file_functions_are_rewritten(tmp_path):
    require_debian_modules("luajit")
    s = Stack(tmp_path)
    s.daemon.launcher = (sys.executable, os.path.join(HERE, "unshare_refused.py"))
    s.start()
    try:
        s.write("app/data.txt", "beside the script")
        s.write("app/read.lua", """
            local lfs = require("lfs")
            function main(env, con)
              local f = assert(io.open("data.txt")); con:puts(f:read("*a"), "|"); f:close()
              con:puts(lfs.currentdir())
            end
        """)
        status, _, body = s.get("/app/read.lua")
        # Lua's io.open finds the file beside the script; C modules see the daemon's directory
        assert (status, body.decode()) == (200, f"beside the script|{DAEMON_DIR}")
        assert "C modules see the process's working directory" in s.daemon.log()
        assert "Operation not permitted" in s.daemon.log()
    finally:
        s.stop()
