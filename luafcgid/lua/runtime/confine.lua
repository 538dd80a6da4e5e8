-- What a script may not reach for: the exit of the whole daemon, and (unless `ffi` is set)
-- LuaJIT's ffi.

local config = ...
local type, error, match, gsub = type, error, string.match, string.gsub

-- os.exit would end the whole daemon, every other request with it.
os.exit = function()
  error("os.exit is not available to luafcgid scripts (it would stop the daemon)", 2)
end

-- LuaJIT's ffi reads and writes any memory of the process (other scripts' states, the
-- daemon's) and calls any C function (ffi.C._exit ends every request at once). Unless
-- `ffi` is set, require("ffi") fails saying so: its preload entry (the registry's _PRELOAD
-- too) is replaced, and package.loadlib and the C searcher, which find luaopen_ffi in
-- lupa's own module, refuse it. Not a sandbox (see the README's Security): a way in
-- through the debug library remains.
if jit and not config.ffi then
  local FFI_OFF = "ffi is off in luafcgid: set ffi: true to let scripts use LuaJIT's FFI"
  local loaded = package.loaded
  loaded.ffi = nil
  package.preload.ffi = function()
    loaded.ffi = nil   -- not require's mark of a failed load: the next require says this again
    error(FFI_OFF, 0)
  end
  local loadlib, searchers = package.loadlib, package.searchers or package.loaders
  package.loadlib = function(path, symbol, ...)
    if symbol == "luaopen_ffi" then return nil, FFI_OFF, "init" end
    return loadlib(path, symbol, ...)
  end
  local search_c = searchers[3]
  searchers[3] = function(name, ...)
    -- the symbol the C searcher looks for: the name after a '-', with dots as '_'
    if type(name) == "string" and gsub(match(name, "%-(.*)") or name, "%.", "_") == "ffi" then
      return "\n\t" .. FFI_OFF
    end
    return search_c(name, ...)
  end
end
