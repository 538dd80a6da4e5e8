"""package.path and package.cpath for a script's state.

In order:
1. the script's own directory (like the original, which ran scripts from their directory);
2. the site's own patterns, settings `lua_path` / `lua_cpath`;
3. LUA_PATH_5_x / LUA_PATH (LUA_CPATH_5_x / LUA_CPATH) from the environment the daemon
   started with (whatever clear_env leaves scripts), read the way the `lua` interpreter of
   that version reads them: the versioned variable wins (LuaJIT reads only the plain one),
   and ";;" stands for the default; unset, the default;
4. luafcgid's own Lua modules (`require "luafcgid"`), always found.

The default is what Debian's `lua5.x` / `luajit` interpreter searches, so modules installed by
Debian packages and by LuaRocks' system tree (/usr/local) for the VM's Lua version are found.
"""

import sysconfig
from importlib import resources

from ..environment import inherited

# luafcgid's public Lua modules. The daemon's own Lua files (runtime.lua, ...) lie one
# level up, out of reach of require: require("runtime") re-ran the bootstrap.
MODULE_DIR = str(resources.files("luafcgid") / "lua" / "modules")


def lua_version(choice):
    return "5.1" if choice == "luajit" else choice


def default_paths(choice):
    """The (path, cpath) pattern lists the system's interpreter for `choice` starts with,
    without its "./?.lua" entry (the script's directory takes its place)."""
    version = lua_version(choice)
    triplet = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    lua_dirs = []
    if choice == "luajit":
        lua_dirs += ["/usr/local/share/luajit-2.1", "/usr/share/luajit-2.1"]
    lua_dirs += [f"/usr/local/share/lua/{version}", f"/usr/local/lib/lua/{version}",
                 f"/usr/share/lua/{version}"]
    path = [pattern for d in lua_dirs for pattern in (f"{d}/?.lua", f"{d}/?/init.lua")]
    c_dirs = [f"/usr/local/lib/lua/{version}", f"/usr/lib/{triplet}/lua/{version}",
              f"/usr/lib/lua/{version}"]
    cpath = [f"{d}/?.so" for d in c_dirs] + [f"/usr/local/lib/lua/{version}/loadall.so"]
    return path, cpath


def from_environment(name, choice, default, environ=None):
    """The pattern list the interpreter would build from environment variable `name`
    ("LUA_PATH" or "LUA_CPATH"): `default` when unset, ";;" expanded to `default`."""
    environ = inherited() if environ is None else environ
    value = None
    if choice != "luajit":
        value = environ.get(f"{name}_{choice.replace('.', '_')}")
    if value is None:
        value = environ.get(name)
    if value is None:
        return list(default)
    patterns = []
    parts = value.replace(";;", ";\0;").split(";")
    for part in parts:
        if part == "\0":
            patterns += default
        elif part:
            patterns.append(part)
    return patterns


def _unique(patterns):
    seen = set()
    return [p for p in patterns if not (p in seen or seen.add(p))]


def search_paths(script_dir, choice, lua_path=(), lua_cpath=(), environ=None):
    """(package.path, package.cpath) for a script in `script_dir` running on VM `choice`."""
    default_path, default_cpath = default_paths(choice)
    path = [f"{script_dir}/?.lua", f"{script_dir}/?/init.lua", *lua_path,
            *from_environment("LUA_PATH", choice, default_path, environ),
            f"{MODULE_DIR}/?.lua"]
    cpath = [f"{script_dir}/?.so", *lua_cpath,
             *from_environment("LUA_CPATH", choice, default_cpath, environ)]
    return ";".join(_unique(path)), ";".join(_unique(cpath))
