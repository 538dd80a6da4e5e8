-- The request thread. Every call from the daemon (the load, each request, each finish
-- handler) runs in this one coroutine, so that the daemon knows which lua_State runs a script
-- (tostring gives its address; Lua 5.1 and LuaJIT give none for the main thread). At a call's
-- deadline a watcher thread arms a hook on it that stops the script at its next instruction
-- (luafcgid/states/hooks.py); the clock and the hook are the daemon's own, out of the
-- script's reach. What stopped a call is the daemon's to say: here a dead request thread only
-- means "stopped or out of memory". Even an error's message is produced in this thread, so an
-- error object whose __tostring loops is stopped too. Then coroutine nesting, and the hooks a
-- request_timeout needs.
--
-- Returns call(fn, ...), the request thread and the flag thread (nil without a timeout).
-- call() hands what a call returns to release_shared, when shared dictionaries are on
-- (runtime.lua).

local timeout, KIND, is_memory_error, release_shared = ...
local type, tostring, pcall, error, select = type, tostring, pcall, error, select

local create, resume, yield, running = coroutine.create, coroutine.resume, coroutine.yield,
  coroutine.running
local DONE = {}

-- the kind and message of an error raised by the script
local function failure(err)
  local ok, message = pcall(tostring, err)
  if not ok then message = "(error object is a " .. type(err) .. " value)" end
  return is_memory_error(message) and KIND.memory or KIND.runtime, message
end

-- Functions run in the request thread return true and a value, or false, an error kind and
-- its message; an error they raise becomes the latter.
local function protected(fn, ...)
  local ok, done, a, b = pcall(fn, ...)
  if ok then return done, a, b end
  return false, failure(done)
end

local function loop(...)
  return loop(yield(DONE, protected(...)))
end
local request_thread = create(loop)

local depth = 0   -- coroutines resumed inside one another (see below)

local function returned(resumed, done, ...)
  if resumed and done == DONE then return ... end
  if resumed then   -- yielded by the script with the real coroutine.yield: that returns nothing
    return returned(resume(request_thread))
  end
  -- dead: out of memory, or stopped at its deadline (the daemon says which: only its clock
  -- knows); either way the state is discarded
  done = type(done) == "string" and done or "the request's coroutine died"
  return false, is_memory_error(done) and KIND.memory or KIND.unknown, done
end

-- Runs fn(...) in the request thread: true and fn's value, or false, an error kind and its
-- message.
local function call(fn, ...)
  depth = 0
  if release_shared then return release_shared(returned(resume(request_thread, fn, ...))) end
  return returned(resume(request_thread, fn, ...))
end

-- To the script the request thread is the main thread: it cannot yield it.
local main_thread, main_is_main = running()
coroutine.yield = function(...)
  if running() == request_thread then
    error("attempt to yield from outside a coroutine", 2)
  end
  return yield(...)
end
coroutine.running = function()
  local co, is_main = running()
  if co == request_thread then return main_thread, main_is_main end
  return co, is_main
end
if coroutine.isyieldable then
  local isyieldable = coroutine.isyieldable
  coroutine.isyieldable = function(...)
    if select("#", ...) == 0 and running() == request_thread then return false end
    return isyieldable(...)
  end
end

-- Coroutine nesting. Each resume inside a resume is a C call; PUC Lua refuses the 200th
-- ("C stack overflow"). LuaJIT has no limit: a coroutine.wrap calling itself ran until the
-- C stack was gone (SIGSEGV, the whole daemon), or with a 64 MiB stack 250,000 levels deep
-- until memory_limit. The limit here is PUC Lua's, on every VM.
local MAX_DEPTH = 200
local close_coroutine, status = coroutine.close, coroutine.status

local function leave(...)
  depth = depth - 1
  return ...
end

local function nested_resume(co, ...)
  if type(co) ~= "thread" then return resume(co, ...) end   -- its own error
  if depth >= MAX_DEPTH then return false, "C stack overflow" end
  depth = depth + 1
  return leave(resume(co, ...))
end
coroutine.resume = nested_resume

local function unwrap(co, ok, ...)
  if ok then return ... end
  if close_coroutine and status(co) == "dead" then close_coroutine(co) end
  error((...), 2)
end

local new_coroutine = create   -- replaced below where coroutines need a hook

coroutine.wrap = function(fn)
  local co = new_coroutine(fn)
  return function(...) return unwrap(co, nested_resume(co, ...)) end
end

local flag   -- a thread that never runs: the watcher arms the stop hook on it too
if timeout > 0 then
  -- PUC Lua keeps hooks per coroutine: a coroutine of the script runs a count hook that
  -- stops it once the flag thread carries the stop hook (checked every COROUTINE_HOOK_EVERY
  -- instructions). LuaJIT keeps one hook for the whole state, and runs none inside compiled
  -- traces: its JIT compiler is turned off for good.
  local COROUTINE_HOOK_EVERY = 100
  local gethook, sethook = debug.gethook, debug.sethook
  flag = create(function() end)
  if not jit then
    local function stopped()
      if gethook(flag) then error("request_timeout exceeded", 2) end
    end
    new_coroutine = function(fn)
      if type(fn) ~= "function" then return create(fn) end   -- its own error
      return create(function(...)
        sethook(stopped, "", COROUTINE_HOOK_EVERY)
        return fn(...)
      end)
    end
    coroutine.create = new_coroutine
  else
    jit.off()
    jit.flush()
    jit.on = function()
      error("jit.on: luafcgid keeps LuaJIT's JIT compiler off while request_timeout is set", 2)
    end
  end
  -- debug.sethook() as the message handler of xpcall would take the stop hook off the
  -- thread it just stopped: a hook set from outside (by the daemon) stays.
  debug.sethook = function(...)
    local co = ...
    local hook, _, count
    if type(co) == "thread" then hook, _, count = gethook(co) else hook, _, count = gethook() end
    if hook == "external hook" and count == 1 then return end
    return sethook(...)
  end
end

return call, request_thread, flag
