-- Closing. The daemon calls close() before it drops the state: the script's globals and
-- modules are let go of and collected, so that their __gc finalizers (a database
-- connection's close) run here, in a Lua call, without Python's interpreter lock, on the
-- daemon's closer thread. Dropping the state afterwards (lua_close) runs the finalizers still
-- left while holding that lock, and lets every other worker wait: only those of objects the
-- script hid elsewhere (in the registry, in a C module).
--
-- Runs last, so that what it keeps as standard is all the bootstrap made. Returns close().

-- `flag`, the flag thread (thread.lua), is kept referenced until close(): in LuaJIT nothing
-- else refers to it, and the collector freed it while the watcher could still arm a hook at
-- its address (a SIGSEGV).
local forget, flag = ...

local G, loaded, next, rawset, collect, strip = _G, package.loaded, next, rawset,
  collectgarbage, debug.setmetatable
local standard_globals, standard_modules = {}, {}
for name, value in next, G do standard_globals[name] = value end
for name, value in next, loaded do standard_modules[name] = value end

local function close()
  forget()
  flag = nil
  strip(G, nil)   -- a __gc of the globals table itself would run in lua_close
  for name, value in next, G do
    if standard_globals[name] ~= value then rawset(G, name, nil) end
  end
  for name, value in next, loaded do
    if standard_modules[name] ~= value then rawset(loaded, name, nil) end
  end
  collect()
  collect()
end

return close
