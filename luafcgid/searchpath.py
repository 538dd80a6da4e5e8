"""package.path and package.cpath for a script's state.

The script's own directory comes first (like the original, which ran scripts from their
directory), then luafcgid's Lua module, then where the system and LuaRocks install modules
for the selected VM's Lua version.
"""

import sysconfig

from .state import LUA_DIR


def lua_version(choice):
    return "5.1" if choice == "luajit" else choice


def search_paths(script_dir, choice):
    version = lua_version(choice)
    triplet = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    lua_dirs = [script_dir, LUA_DIR, f"/usr/local/share/lua/{version}", f"/usr/share/lua/{version}"]
    if choice == "luajit":
        lua_dirs[2:2] = ["/usr/local/share/luajit-2.1", "/usr/share/luajit-2.1"]
    path = ";".join(f"{d}/?.lua;{d}/?/init.lua" for d in lua_dirs)
    c_dirs = [script_dir, f"/usr/local/lib/lua/{version}", f"/usr/lib/{triplet}/lua/{version}",
              f"/usr/lib/lua/{version}"]
    cpath = ";".join(f"{d}/?.so" for d in c_dirs) + f";/usr/local/lib/lua/{version}/loadall.so"
    return path, cpath
