"""LuaJIT's ffi is off unless `ffi: true` (issue 18): with it a page reads any memory of the
process and calls any C function (ffi.C._exit(0) ended the daemon with status 0)."""

import lupa.luajit21

from conftest import Daemon

# Every way to LuaJIT's ffi that needs no debug library: require, package.loaded and the
# preload table (also the registry's _PRELOAD), package.loadlib on lupa's own module (which
# holds luaopen_ffi), and the C searcher pointed at that module, by name and after a '-'.
PROBES = """
local LUPA = %r
local function try(f, ...)
  local ok, value, message = pcall(f, ...)
  if not ok then return "error: " .. (tostring(value):gsub("%%s+", " ")) end
  if value == nil then return "nil: " .. tostring(message) end
  return type(value)
end
local results = {}
results[#results + 1] = "require " .. try(require, "ffi")
results[#results + 1] = "again " .. try(require, "ffi")
results[#results + 1] = "loaded " .. type(package.loaded.ffi)
results[#results + 1] = "registry " .. tostring(debug.getregistry()._PRELOAD.ffi == package.preload.ffi)
results[#results + 1] = "loadlib " .. try(package.loadlib, LUPA, "luaopen_ffi")
package.preload.ffi = nil
package.cpath = LUPA
results[#results + 1] = "cpath " .. try(require, "ffi")
results[#results + 1] = "hyphen " .. try(require, "x-ffi")
function main(env, con) con:puts(table.concat(results, "\\n"), "\\n") end
""" % lupa.luajit21.__file__

OFF = "ffi is off in luafcgid: set ffi: true to let scripts use LuaJIT's FFI"


def test_scripts_cannot_reach_ffi_by_default(stack):
    s = stack()
    s.write("probe.lua", PROBES)
    status, _, body = s.get("/probe.lua")
    assert status == 200, body
    lines = body.decode().splitlines()
    assert lines[0] == f"require error: {OFF}"
    assert lines[1] == f"again error: {OFF}"   # not "loop or previous error"
    assert lines[2] == "loaded nil"
    assert lines[3] == "registry true"         # the registry's _PRELOAD is that table
    assert lines[4] == f"loadlib nil: {OFF}"
    assert lines[5].startswith("cpath error: module 'ffi' not found") and OFF in lines[5]
    assert lines[6].startswith("hyphen error: module 'x-ffi' not found") and OFF in lines[6]


def test_ffi_true_gives_scripts_the_ffi(stack):
    s = stack(ffi=True)
    s.write("pid.lua", """
        local ffi = require("ffi")
        ffi.cdef("int getpid(void);")
        function main(env, con) con:puts(ffi.C.getpid()) end
    """)
    status, _, body = s.get("/pid.lua")
    assert status == 200 and int(body) == s.daemon.proc.pid


def test_ffi_on_another_vm_is_refused(daemon, tmp_path):
    d = Daemon(tmp_path, {"ffi": True, "lua": "5.4"})
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "ffi: only LuaJIT has the ffi library (lua: 5.4)" in d.output()
