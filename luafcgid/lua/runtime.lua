-- Run once in every new Lua state, before its script: makes relative file names resolve
-- against the script's directory (where the working directory cannot do it), keeps scripts
-- from what they may not reach, builds the request object (`con`), runs the prelude, loads
-- the script and returns the functions the Python side calls per request. Everything here
-- is local, so a script sees only the standard libraries and its own globals.
--
-- The parts lie in runtime/, in the order they run here; the daemon hands them over compiled
-- (opts.parts: no file is read or compiled per state), and each gets what it uses and returns
-- what later parts use.

local script, dir, config, send, log, opts = ...

local setmetatable, error, tostring, type, find =
  setmetatable, error, tostring, type, string.find
local loadstring = loadstring or load
local loadfile_absolute, io_open = loadfile, io.open   -- before any part rewrites them

local function part(name, ...)
  return assert(loadstring(opts.parts[name]))(...)
end

python = nil
package.loaded.python = nil

-- The kinds of error a call ends in, as the daemon names them (luafcgid/states/errors.py):
-- KIND.runtime, KIND.memory, ... A name the daemon does not know is an error here, not a
-- kind it would misread.
local KIND = setmetatable(opts.kinds, {__index = function(_, name)
  error("luafcgid: no error kind " .. tostring(name), 2)
end})

local function is_memory_error(message)
  return type(message) == "string" and find(message, "not enough memory", 1, true) ~= nil
end

part("paths", dir, opts)

-- Shared dictionaries (setting `shared`), for require("luafcgid").shared: LuaJIT's ffi is
-- taken here, before the script, which is not handed it (confine.lua). release_shared(...)
-- lets go of a dictionary's mutex that an operation raising an error left held, and returns
-- `...`.
local release_shared
if opts.shared then
  package.loaded["luafcgid.shared"], release_shared = assert(loadfile_absolute(
    opts.libdir .. "/shared.lua"))(opts.shared, opts.shared.ffi and require("ffi") or nil,
    opts.shared_call)
end

part("confine", config)
local load_file = part("source", opts, loadfile_absolute, io_open)
local call, request_thread, flag = part("thread", opts.timeout, KIND, is_memory_error,
  release_shared)
local Con, head, drain = part("con", config, opts, script, send, log)
local load_state, serve, finish, forget = part("run", script, dir, log, opts, KIND,
  is_memory_error, load_file, loadfile_absolute, io_open, call, Con, head, drain,
  part("params"))
local close = part("close", forget, flag)

return true, load_state, serve, finish, close, tostring(request_thread), flag and tostring(flag)
