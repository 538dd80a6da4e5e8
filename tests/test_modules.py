"""Where states find Lua modules (the script's directory, lua_path/lua_cpath, LUA_PATH and
LUA_CPATH, the system's directories, a LuaRocks tree), the prelude, and the config checks
that go with them."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, Stack, skip_unless, wait_for
from ecosystem import lua_headers_dir

from luafcgid import config
from luafcgid.states import vm
from luafcgid.states.searchpath import default_paths, from_environment, search_paths

TINY_C_MODULE = r"""
#include "lua.h"
#include "lauxlib.h"

static int twice(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_pushlstring(L, s, n);
  lua_pushlstring(L, s, n);
  lua_concat(L, 2);
  return 1;
}

int luaopen_%(name)s(lua_State *L) {
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, twice);
  lua_setfield(L, -2, "twice");
  return 1;
}
"""


def build_c_module(directory, name):
    """Compile a tiny C module `name` into directory/name.so; skip without gcc or headers."""
    headers = lua_headers_dir()
    skip_unless(headers is not None and shutil.which("gcc") is not None,
                "needs gcc and the Lua 5.1 headers (apt-get install gcc liblua5.1-0-dev)")
    os.makedirs(directory, exist_ok=True)
    source = os.path.join(directory, f"{name}.c")
    with open(source, "w") as stream:
        stream.write(TINY_C_MODULE % {"name": name})
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", f"-I{headers}", "-o",
                    os.path.join(directory, f"{name}.so"), source], check=True)




# -- search paths, without a daemon ---------------------------------------------------------

def test_default_paths_are_the_interpreters():
    path, cpath = default_paths("5.3")
    assert "/usr/share/lua/5.3/?.lua" in path and "/usr/local/share/lua/5.3/?/init.lua" in path
    assert any(p.endswith("-linux-gnu/lua/5.3/?.so") for p in cpath)
    path, cpath = default_paths("luajit")
    assert path[0].startswith("/usr/local/share/luajit-2.1")
    assert "/usr/share/lua/5.1/?.lua" in path and "/usr/local/lib/lua/5.1/?.so" in cpath


def test_environment_variables_like_the_lua_interpreter():
    default = ["D1", "D2"]
    assert from_environment("LUA_PATH", "5.4", default, {}) == default
    assert from_environment("LUA_PATH", "5.4", default, {"LUA_PATH": "a/?.lua"}) == ["a/?.lua"]
    assert from_environment("LUA_PATH", "5.4", default,
                            {"LUA_PATH": "a/?.lua;;b/?.lua"}) == ["a/?.lua", "D1", "D2", "b/?.lua"]
    assert from_environment("LUA_PATH", "5.4", default, {"LUA_PATH": ";;"}) == default
    # the versioned variable wins; LuaJIT reads only the plain one
    env = {"LUA_PATH": "plain/?.lua", "LUA_PATH_5_4": "v54/?.lua;;", "LUA_PATH_5_1": "v51/?.lua"}
    assert from_environment("LUA_PATH", "5.4", default, env) == ["v54/?.lua", "D1", "D2"]
    assert from_environment("LUA_PATH", "5.3", default, env) == ["plain/?.lua"]
    assert from_environment("LUA_PATH", "luajit", default, env) == ["plain/?.lua"]
    assert from_environment("LUA_CPATH", "5.2", default, {"LUA_CPATH_5_2": "c/?.so"}) == ["c/?.so"]


def test_search_order():
    path, cpath = search_paths("/srv/www", "5.1", ("/site/?.lua",), ("/site/?.so",),
                               environ={"LUA_PATH": "/env/?.lua;;", "LUA_CPATH": "/env/?.so"})
    path, cpath = path.split(";"), cpath.split(";")
    assert path[:4] == ["/srv/www/?.lua", "/srv/www/?/init.lua", "/site/?.lua", "/env/?.lua"]
    assert "/usr/share/lua/5.1/?.lua" in path
    assert path[-1].endswith("luafcgid/lua/modules/?.lua")   # require("luafcgid") always works
    assert cpath == ["/srv/www/?.so", "/site/?.so", "/env/?.so"]


# -- settings ---------------------------------------------------------------------------

def test_lua_path_patterns_are_checked_and_resolved(tmp_path):
    conf = config.defaults(base_dir=str(tmp_path), lua_path=["lib/?.lua", "/abs/?/init.lua"],
                           lua_cpath=["clib/?.so"])
    assert conf.lua_path == (f"{tmp_path}/lib/?.lua", "/abs/?/init.lua")
    assert conf.lua_cpath == (f"{tmp_path}/clib/?.so",)
    for bad, message in ((["lib"], "needs a '?'"), ("lib/?.lua", "expected a list"),
                         (["a/?.lua;b/?.lua"], "one pattern per list item")):
        with pytest.raises(config.ConfigError) as info:
            config.defaults(lua_path=bad)
        assert message in str(info.value) and "lua_path" in str(info.value)


def test_check_refuses_a_missing_prelude_and_a_vm_lupa_lacks(tmp_path, monkeypatch):
    with pytest.raises(config.ConfigError) as info:
        config.defaults(base_dir=str(tmp_path), prelude="missing.lua")
    assert f"prelude: no such file: {tmp_path}/missing.lua" in str(info.value)
    monkeypatch.setattr(vm, "available", lambda choice: choice != "5.3")
    with pytest.raises(config.ConfigError) as info:
        config.defaults(lua="5.3")
    assert "lua: the installed lupa does not ship Lua 5.3 (no module lupa.lua53)" in str(info.value)


def test_check_refuses_c_modules_for_another_lua_version():
    config.defaults(lua="luajit", lua_cpath=["/t/lib/lua/5.1/?.so"])
    config.defaults(lua="5.4", lua_cpath=["/t/lib/lua/5.4/?.so", "/t/clib/?.so"])
    with pytest.raises(config.ConfigError) as info:
        config.defaults(lua="5.4", lua_cpath=["/t/lib/lua/5.1/?.so"])
    assert ("lua_cpath: /t/lib/lua/5.1/?.so holds C modules for Lua 5.1, but the states run "
            "Lua 5.4") in str(info.value)


def test_check_command_names_the_problems(tmp_path):
    conf = tmp_path / "luafcgid.yaml"
    conf.write_text("prelude: nowhere.lua\nlua_path: [lib]\n")
    result = subprocess.run([sys.executable, "-m", "luafcgid", "-c", str(conf), "--check"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "lua_path: a pattern needs a '?'" in result.stderr
    conf.write_text("prelude: nowhere.lua\nlua_path:\n  - lib/?.lua\n")
    result = subprocess.run([sys.executable, "-m", "luafcgid", "-c", str(conf), "--check"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"prelude: no such file: {tmp_path}/nowhere.lua" in result.stderr


def test_settings_reference_documents_the_module_settings():
    out = subprocess.run([sys.executable, "-m", "luafcgid", "settings"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "## Lua modules" in out and "`lua_path`" in out and "`prelude`" in out


# -- through nginx ------------------------------------------------------------------------

@pytest.fixture
def stack_with_files(tmp_path):
    """Factory: files(dict relative to the config dir) and settings -> started stack."""
    stacks = []

    def make(files=None, env=None, **settings):
        s = Stack(tmp_path / f"stack{len(stacks)}", settings)
        for name, text in (files or {}).items():
            target = os.path.join(s.daemon.workdir, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as stream:
                stream.write(textwrap.dedent(text))
        stacks.append(s)
        return s.start()

    yield make
    for s in stacks:
        s.stop()


def test_lua_path_finds_the_sites_library_after_the_script_directory(stack_with_files):
    s = stack_with_files({"lib/sitelib.lua": "return {name = 'from lib'}",
                          "lib/shadowed.lua": "return {name = 'from lib'}",
                          "lib/pkg/init.lua": "return {name = 'pkg from lib'}"},
                         lua_path=["lib/?.lua", "lib/?/init.lua"])
    s.write("shadowed.lua", "return {name = 'from the script directory'}")
    s.write("page.lua", """
        local sitelib, shadowed, pkg = require("sitelib"), require("shadowed"), require("pkg")
        local cjson = require("cjson")   -- the system's directories are still searched
        function main(env, con) con:puts(sitelib.name, "|", shadowed.name, "|", pkg.name) end
    """)
    status, _, body = s.get("/page.lua")
    assert (status, body) == (200, b"from lib|from the script directory|pkg from lib")


@pytest.mark.parametrize("vm_choice", ["luajit", "5.1"])
def test_lua_cpath_loads_the_sites_c_module(stack_with_files, tmp_path, vm_choice):
    build_c_module(str(tmp_path / "clib"), "tiny")
    s = stack_with_files(lua=vm_choice, lua_cpath=[str(tmp_path / "clib" / "?.so")])
    s.write("page.lua", """
        local tiny = require("tiny")
        function main(env, con) con:puts(tiny.twice("ab")) end
    """)
    assert s.get("/page.lua")[2] == b"abab"


def test_lua_path_environment_variable(stack_with_files, tmp_path, monkeypatch):
    envlib = tmp_path / "envlib"
    envlib.mkdir()
    (envlib / "fromenv.lua").write_text("return 'from LUA_PATH'")
    monkeypatch.setenv("LUA_PATH", f"{envlib}/?.lua;;")   # the daemon inherits it
    monkeypatch.delenv("LUA_PATH_5_4", raising=False)
    s = stack_with_files(lua="5.4")
    s.write("page.lua", """
        local fromenv, lpeg = require("fromenv"), require("lpeg")   -- ";;" kept the defaults
        function main(env, con) con:puts(fromenv, "|", type(lpeg.match)) end
    """)
    assert s.get("/page.lua")[2] == b"from LUA_PATH|function"


# -- prelude ----------------------------------------------------------------------------

def test_prelude_runs_in_every_new_state_before_the_script(stack_with_files):
    s = stack_with_files({"prelude.lua": """
        local script = ...
        preludes = (preludes or 0) + 1
        function greet(who) return "hello " .. who end
        loaded_for = script:match("[^/]+$")
    """}, prelude="prelude.lua")   # relative to the config file
    s.write("a.lua", """
        local greeting = greet("a")   -- defined before the script runs
        function main(env, con) con:puts(greeting, "|", loaded_for, "|", preludes) end
    """)
    s.write("b.lua", "function main(env, con) con:puts(greet('b'), '|', loaded_for) end")
    assert s.get("/a.lua")[2] == b"hello a|a.lua|1"
    assert s.get("/a.lua")[2] == b"hello a|a.lua|1"   # not run again for the same state
    assert s.get("/b.lua")[2] == b"hello b|b.lua"


def test_a_changed_prelude_reloads_the_states(stack_with_files):
    s = stack_with_files({"prelude.lua": "version = 'one'"}, prelude="prelude.lua")
    s.write("page.lua", "function main(env, con) con:puts(version) end")
    assert s.get("/page.lua")[2] == b"one"
    with open(os.path.join(s.daemon.workdir, "prelude.lua"), "w") as stream:
        stream.write("version = 'two!'")
    wait_for(lambda: s.get("/page.lua")[2] == b"two!", what="the changed prelude to apply")


@pytest.mark.parametrize("code, kind, message", [
    ("local x = = 1", "Syntax Error", "prelude.lua:1:"),
    ("error('the prelude failed')", "Runtime Error", "the prelude failed"),
])
def test_prelude_errors_are_reported_like_script_load_errors(stack_with_files, code, kind,
                                                             message):
    s = stack_with_files({"prelude.lua": code}, prelude="prelude.lua", showerrors=True)
    s.write("page.lua", "function main(env, con) con:puts('never') end")
    status, _, body = s.get("/page.lua")
    assert status == 500
    assert f"<h2>{kind}</h2>".encode() in body and message.encode() in body
    log = s.daemon.log()
    assert kind in log and message in log


def test_prelude_deleted_after_start_is_a_file_error(stack_with_files):
    s = stack_with_files({"prelude.lua": "x = 1"}, prelude="prelude.lua", showerrors=True)
    os.remove(os.path.join(s.daemon.workdir, "prelude.lua"))
    s.write("page.lua", "function main(env, con) con:puts('never') end")
    status, _, body = s.get("/page.lua")
    assert status == 500 and b"File Error" in body and b"prelude.lua" in body


# -- a LuaRocks tree --------------------------------------------------------------------

ROCKSPEC = """
package = "greet"
version = "1.0-1"
source = { url = "file:///dev/null" }
description = { summary = "A test rock: one Lua module, one C module", license = "MIT" }
dependencies = { "lua >= 5.1" }
build = {
  type = "builtin",
  modules = { greet = "greet/init.lua", ["greet.core"] = "greet/core.c" },
}
"""


def test_luarocks_tree(stack_with_files, tmp_path):
    """A rock built and installed offline with `luarocks --tree TREE make`, found through
    lua_path/lua_cpath pointing into TREE."""
    skip_unless(shutil.which("luarocks") is not None,
                "luarocks is not installed (apt-get install luarocks)")
    skip_unless(lua_headers_dir() is not None,
                "building the rock's C module needs liblua5.1-0-dev")
    src, tree = tmp_path / "src", tmp_path / "tree"
    (src / "greet").mkdir(parents=True)
    (src / "greet" / "init.lua").write_text(
        "local core = require('greet.core')\n"
        "return {hello = function(who) return 'hello, ' .. core.twice(who) end}\n")
    (src / "greet" / "core.c").write_text(TINY_C_MODULE % {"name": "greet_core"})
    (src / "greet-1.0-1.rockspec").write_text(ROCKSPEC)
    subprocess.run(["luarocks", "--lua-version", "5.1", "--tree", str(tree), "make",
                    "greet-1.0-1.rockspec"], cwd=src, check=True, capture_output=True,
                   env={**os.environ, "HOME": str(tmp_path)})
    assert (tree / "share/lua/5.1/greet/init.lua").exists()
    assert (tree / "lib/lua/5.1/greet/core.so").exists()
    s = stack_with_files(lua_path=[f"{tree}/share/lua/5.1/?.lua",
                                   f"{tree}/share/lua/5.1/?/init.lua"],
                         lua_cpath=[f"{tree}/lib/lua/5.1/?.so"])
    s.write("page.lua", """
        local greet = require("greet")
        function main(env, con) con:puts(greet.hello("rock")) end
    """)
    assert s.get("/page.lua")[2] == b"hello, rockrock"


def test_the_daemons_own_lua_files_are_out_of_reach_of_require(shared_stack):
    """require("runtime") found the bootstrap on package.path and ran it again, which broke
    relative io.open in that state."""
    shared_stack.write("own_files/data.txt", "beside the script")
    shared_stack.write("own_files/reach.lua", """
        local found = {}
        for _, name in ipairs({"runtime", "luafcgid_wsapi"}) do
          local ok, err = pcall(require, name)
          found[#found + 1] = name .. "=" .. tostring(ok)
        end
        local module = require("luafcgid")
        function main(env, con)
          con:puts(table.concat(found, " "), " ", type(module.urlencode), " ",
                   io.open("data.txt"):read("*a"))
        end
    """)
    status, _, body = shared_stack.get("/own_files/reach.lua")
    assert (status, body) == (200, b"runtime=false luafcgid_wsapi=false function "
                                   b"beside the script")
