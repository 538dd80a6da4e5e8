-- Run once in every new Lua state, before its script: builds the request object (`con`),
-- makes relative file names resolve against the script's directory (where the working
-- directory cannot do it), runs the prelude, loads
-- the script and returns the functions the Python side calls per request. Everything here
-- is local, so a script sees only the standard libraries and its own globals.

local script, dir, config, send, log, opts = ...

local concat, type, tostring, pcall, setmetatable, error, select =
  table.concat, type, tostring, pcall, setmetatable, error, select
local find, lower, match, sub = string.find, string.lower, string.match, string.sub

python = nil
package.loaded.python = nil

-- Relative names resolve against the script's directory. Where the daemon could give each
-- worker thread its own working directory (Linux) the thread is in that directory while the
-- script runs; elsewhere the process's one is shared, so Lua's file functions are rewritten
-- to put the script's directory in front of a relative name (C modules do not see this).
local loadfile_absolute, io_open = loadfile, io.open
if opts.rewrite_paths then
  local function resolve(name)
    if type(name) == "string" and sub(name, 1, 1) ~= "/" then
      return dir .. "/" .. name
    end
    return name
  end

  local function relative_first(fn)
    return function(name, ...) return fn(resolve(name), ...) end
  end

  local function relative_first_or_none(fn)
    return function(...)
      if select("#", ...) == 0 then return fn() end
      return fn(resolve((...)), select(2, ...))
    end
  end

  local os_rename = os.rename
  io.open = relative_first(io.open)
  io.lines = relative_first_or_none(io.lines)
  io.input = relative_first_or_none(io.input)
  io.output = relative_first_or_none(io.output)
  os.remove = relative_first(os.remove)
  os.rename = function(from, to, ...) return os_rename(resolve(from), resolve(to), ...) end
  dofile = relative_first_or_none(dofile)
  loadfile = relative_first_or_none(loadfile)
end
package.path = opts.path
package.cpath = opts.cpath

-- Shared dictionaries (setting `shared`), for require("luafcgid").shared: LuaJIT's ffi is
-- taken here, before the script, which is not handed it. release_shared(...) lets go of a
-- dictionary's mutex that an operation raising an error left held, and returns `...`.
local release_shared
if opts.shared then
  package.loaded["luafcgid.shared"], release_shared = assert(loadfile_absolute(
    opts.libdir .. "/shared.lua"))(opts.shared, opts.shared.ffi and require("ffi") or nil,
    opts.shared_call)
end

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
  local loadlib, searchers, gsub = package.loadlib, package.searchers or package.loaders,
    string.gsub
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

local function is_memory_error(message)
  return type(message) == "string" and find(message, "not enough memory", 1, true) ~= nil
end

-- Loading source only --------------------------------------------------------------------
-- Lua runs bytecode unchecked: a corrupted precompiled chunk crashed both LuaJIT and Lua 5.4
-- (SIGSEGV, the whole daemon with it). Unless `bytecode` is set, every way a state loads a
-- chunk (the script, the prelude, load, loadstring, loadfile, dofile and require's Lua
-- searcher) takes source text only. Lua 5.2+ and LuaJIT have load modes; Lua 5.1 has none,
-- so there the first byte is looked at (bytecode starts with ESC, after a "#" line in files).

local BINARY = "attempt to load a binary chunk (mode is 't')"
local byte, gsub, gmatch = string.byte, string.gsub, string.gmatch
local modes = _VERSION ~= "Lua 5.1" or jit ~= nil

-- `loader(file[, mode[, env]])` made to load text only: function(file[, env]) -> chunk or nil,
-- message. `open` opens files as `loader` finds them.
local function text_file_loader(loader, open)
  if modes then return function(file, ...) return loader(file, "t", ...) end end
  return function(file)
    local stream = file and open(file, "rb")
    if stream then
      local head = stream:read(1)
      if head == "#" then stream:read("*l") head = stream:read(1) end
      stream:close()
      if head and byte(head) == 27 then return nil, BINARY end
    end
    return loader(file)
  end
end

local load_text_file = text_file_loader(loadfile_absolute, io_open)

if not opts.bytecode then
  local load_, loadstring_, loadfile_ = load, loadstring, loadfile
  if modes then
    load = function(chunk, name, _, ...) return load_(chunk, name, "t", ...) end
  else
    load = function(reader, name)
      if type(reader) ~= "function" then return load_(reader, name) end   -- its own error
      local first = true
      return load_(function()
        local piece = reader()
        if first and piece ~= nil and piece ~= "" then
          first = false
          if byte(piece) == 27 then error(BINARY, 0) end
        end
        return piece
      end, name)
    end
    loadstring = function(s, name)
      if type(s) == "string" and byte(s) == 27 then return nil, BINARY end
      return loadstring_(s, name)
    end
  end
  if loadstring_ and modes then   -- LuaJIT: loadstring is load
    loadstring = function(s, name) return load_(s, name, "t") end
  end
  local text_loadfile = text_file_loader(loadfile_, io.open)
  loadfile = function(file, _, ...) return text_loadfile(file, ...) end
  dofile = function(file)
    local chunk, message = text_loadfile(file)
    if not chunk then error(message, 0) end
    return chunk()
  end
  -- require's searcher of Lua files, as the built-in one but loading text only
  local searchers = package.searchers or package.loaders
  local searchpath = package.searchpath or function(name, path)
    local tried = {}
    name = gsub(name, "%.", "/")
    for template in gmatch(path, "[^;]+") do
      local file = gsub(template, "%?", name)
      local stream = io_open(file, "r")
      if stream then stream:close() return file end
      tried[#tried + 1] = "\n\tno file '" .. file .. "'"
    end
    return nil, concat(tried)
  end
  searchers[2] = function(name)
    local file, tried = searchpath(name, package.path)
    if not file then return tried end
    local chunk, message = load_text_file(file)
    if not chunk then
      error("error loading module '" .. name .. "' from file '" .. file .. "':\n\t" .. message, 0)
    end
    return chunk, file
  end
end

-- The request thread ----------------------------------------------------------------------
-- Every call from the daemon (the load, each request, each finish handler) runs in this one
-- coroutine, so that the daemon knows which lua_State runs a script (tostring gives its
-- address; Lua 5.1 and LuaJIT give none for the main thread). At a call's deadline a watcher
-- thread arms a hook on it that stops the script at its next instruction (luafcgid/hooks.py);
-- the clock and the hook are the daemon's own, out of the script's reach. What stopped a call
-- is the daemon's to say: here a dead request thread only means "stopped or out of memory".
-- Even an error's message is produced in this thread, so an error object whose __tostring
-- loops is stopped too.

local create, resume, yield, running = coroutine.create, coroutine.resume, coroutine.yield,
  coroutine.running
local timeout = opts.timeout
local DONE = {}

-- the kind and message of an error raised by the script
local function failure(err)
  local ok, message = pcall(tostring, err)
  if not ok then message = "(error object is a " .. type(err) .. " value)" end
  return is_memory_error(message) and "Memory Error" or "Runtime Error", message
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
  -- dead: stopped at its deadline, or out of memory (the daemon discards the state)
  done = type(done) == "string" and done or "the request's coroutine died"
  return false, is_memory_error(done) and "Memory Error" or "Timeout Error", done
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

-- The request object ---------------------------------------------------------------------

local status_default, contenttype_default, handler_name, finish_name, buffering =
  opts.httpstatus, opts.contenttype, opts.handler, opts.finishhandler, opts.buffering
local static_headers = opts.headers   -- every global header line, each ending in \r\n
local default_head = "Status: " .. status_default .. "\r\nContent-Type: " ..
  contenttype_default .. "\r\n" .. static_headers .. "\r\n"

local Con = {}
Con.__index = Con

local function head(c)
  c.sent = true
  if c.status == nil and c.contenttype == nil and c.nheaders == 0 then
    return default_head
  end
  return "Status: " .. (c.status or status_default) .. "\r\nContent-Type: " ..
    (c.contenttype or contenttype_default) .. "\r\n" .. static_headers ..
    concat(c.headers, "", 1, c.nheaders) .. "\r\n"
end

local function text(value, what, level)
  local t = type(value)
  if t == "string" then return value end
  if t == "number" then return tostring(value) end
  error("bad argument to " .. what .. " (string expected, got " .. t .. ")", level + 1)
end

local function not_sent(c, what)
  if c.sent then error(what .. ": the headers were already sent", 3) end
  if c.closed then error(what .. ": the response is already complete", 3) end
end

function Con:header(name, value)
  not_sent(self, "con:header")
  name = text(name, "con:header", 2)
  if value == nil then   -- one raw "Name: value" line, treated like the two-argument form
    local raw_name, raw_value = match(name, "^([^:\r\n]+):[ \t]*([^\r\n]-)[ \t]*$")
    if raw_name == nil then
      error("con:header: expected one 'Name: value' line, got " .. ("%q"):format(name), 2)
    end
    name, value = raw_name, raw_value
  else
    value = text(value, "con:header", 2)
    if find(name, "[\r\n:]") or find(value, "[\r\n]") then
      error("con:header: header names and values must not contain line breaks", 2)
    end
  end
  local key = lower(name)
  if key == "status" then
    -- the web server takes the code from the first three characters
    if not find(value, "^[1-5]%d%d$") and not find(value, "^[1-5]%d%d ") then
      error("con:header: invalid Status " .. ("%q"):format(value) ..
            " (expected a code from 100 to 599, then a reason: \"404 Not Found\")", 2)
    end
    self.status = value
  elseif key == "content-type" then
    self.contenttype = value
  else
    self.nheaders = self.nheaders + 1
    self.headers[self.nheaders] = name .. ": " .. value .. "\r\n"
  end
end

-- Response bytes cross to Python in strings of at most CHUNK bytes, so that no response is
-- ever copied whole outside this state (whose memory memory_limit bounds): three 100 MiB
-- responses took the daemon from 20 MiB to 1.8 GiB when they crossed whole.
local CHUNK = opts.chunk

-- Hands the buffered body to Python, after the head if it has not gone out yet, in strings
-- of at most CHUNK bytes, and returns the last of them instead of sending it.
local function drain(c)
  local body, n = c.body, c.n
  c.body, c.n, c.size = {}, 0, 0
  local group, count, size = {}, 0, 0
  if not c.sent then
    group[1] = head(c)
    count, size = 1, #group[1]
  end
  for i = 1, n do
    local s = body[i]
    body[i] = nil   -- collectable once sent
    local len, at = #s, 1
    while size + len - at + 1 > CHUNK do
      local stop = at + CHUNK - size - 1
      count = count + 1
      group[count] = sub(s, at, stop)
      send(count == 1 and group[1] or concat(group, "", 1, count))
      count, size, at = 0, 0, stop + 1
    end
    if at <= len then
      count = count + 1
      group[count] = at == 1 and s or sub(s, at)
      size = size + len - at + 1
    end
  end
  return concat(group, "", 1, count)
end

function Con:flush()
  if self.closed then return end
  local rest = drain(self)
  if rest ~= "" then send(rest) end
end

local function put(c, s)
  if c.closed then return end
  local n = c.n + 1
  c.body[n] = s
  c.n = n
  c.size = c.size + #s
  if not buffering then Con.flush(c) end
end

function Con:puts(s, ...)
  put(self, text(s, "con:puts", 2))
  for i = 1, select("#", ...) do
    put(self, text((select(i, ...)), "con:puts", 2))
  end
end

function Con:reset()
  self.n = 0
  self.size = 0
  self.body = {}
end

function Con:gets()
  return self.input
end

function Con:config(name)
  return config[name]
end

function Con:log(message)
  log(script, text(message, "con:log", 2))
end

-- Loading and running ----------------------------------------------------------------------

local load_file = opts.bytecode and loadfile_absolute or load_text_file

-- Compiles and runs a Lua file (in the request thread): true and the chunk's first result, or
-- false, an error kind and its message.
local function run_file(file, ...)
  local chunk, message = load_file(file)
  if not chunk then
    if is_memory_error(message) then return false, "Memory Error", message end
    local probe = io_open(file, "rb")
    if not probe then return false, "File Error", message end
    probe:close()
    if not find(message, file, 1, true) then message = file .. ": " .. message end
    return false, "Syntax Error", message
  end
  return true, chunk(...)
end

-- A script that defines no handler is served as a WSAPI application if it is one, found the
-- way WSAPI's own launchers find it (Debian lua-wsapi, wsapi/common.lua: require_file and
-- normalize_app): the chunk runs with its module name (the file name without its extension)
-- as `...`, so that `module(..., package.seeall)` works; the application is what the chunk
-- returns or, when it returns nothing, package.loaded[name] (where module() put it): a
-- function, a table with `run`, or the name of a module to require. Unlike the launchers,
-- package.loaded[name] is not set to true before the chunk runs: a page named like a library
-- it requires (socket.lua requiring "socket") would get `true` from require.
local modname = sub(script, (find(script, "[^/]*$")))
modname = string.match(modname, "^(.+)%.[^.]*$") or modname

local function application(result)
  if result == nil then result = package.loaded[modname] end
  if type(result) == "string" then result = require(result) end
  if type(result) == "function" then return result end
  if type(result) == "table" and type(result.run) == "function" then return result.run end
  return nil
end

-- The prelude (setting `prelude`) runs first, with the script's path as its argument; then
-- the script.
local app_handler

local function load_script()
  if opts.prelude ~= "" then
    local ok, kind, message = run_file(opts.prelude, script)
    if not ok then return false, kind, message end
  end
  local ok, result, message = run_file(script, modname)
  if not ok then return false, result, message end
  if type(_G[handler_name]) ~= "function" then
    local run = application(result)   -- its errors fail the load like the script's
    if run ~= nil then
      local wsapi = assert(loadfile_absolute(opts.libdir .. "/luafcgid_wsapi.lua"))()
      app_handler = wsapi.handler(run, script, dir, log)
    end
  end
  return true
end

-- Loads the prelude and the script: true, or false, an error kind and its message.
local function load_state()
  return call(load_script)
end

local current

local function run_handler(handler, env, c)
  handler(env, c)
  return true
end

-- FastCGI name-value pairs (spec 3.4) to the env table; Python checked them already.
-- Decoded here from the bytes received rather than converted from Python's dict (lupa's
-- table_from: 1.6 us for nginx's 21 params, holding the interpreter lock); Lua runs without
-- it. Hello world with upstream keep-alive: +9% requests/s, -6% CPU per request (median of
-- six alternating 3 s runs).
local byte, version = string.byte, opts.version

local function pair_length(raw, pos)
  local a, b, c, d = byte(raw, pos, pos + 3)
  return ((a - 128) * 256 + b) * 65536 + c * 256 + d
end

local function decode_params(raw)
  local env, pos, n = {}, 1, #raw
  while pos <= n do
    local name_len, value_len = byte(raw, pos, pos + 1)
    if name_len < 128 and value_len < 128 then
      pos = pos + 2
    else
      if name_len < 128 then pos = pos + 1 else name_len = pair_length(raw, pos); pos = pos + 4 end
      value_len = byte(raw, pos)
      if value_len < 128 then pos = pos + 1 else value_len = pair_length(raw, pos); pos = pos + 4 end
    end
    local value_at = pos + name_len
    env[sub(raw, pos, value_at - 1)] = sub(raw, value_at, value_at + value_len - 1)
    pos = value_at + value_len
  end
  env.LUAFCGID_VERSION = version
  return env
end

-- Returns true, the body not yet sent and, when they were not sent either, the headers; or
-- false, an error kind, its message and whether the headers already went out (then a 500
-- page can no longer be sent). Headers and body stay apart: Python joins them with a copy,
-- where Lua would also intern the joined string.
local function serve(raw_params, input)
  local env = decode_params(raw_params)
  -- The body's true length, as received: for a chunked request body Caddy sends -1 and
  -- Apache none, and readers that trust CONTENT_LENGTH (wsapi.request) would see an empty
  -- form.
  if input ~= "" then env.CONTENT_LENGTH = tostring(#input) end
  local c = setmetatable({env = env, input = input, n = 0, size = 0, body = {}, nheaders = 0,
                          headers = {}, sent = false, closed = false}, Con)
  current = c
  local handler = _G[handler_name]
  if type(handler) ~= "function" then
    handler = app_handler
    if handler == nil then
      return false, "Runtime Error", handler_name .. "() function not found", false
    end
  end
  local ok, kind, message = call(run_handler, handler, env, c)
  if not ok then
    c.closed = true
    return false, kind, message, c.sent
  end
  local payload
  if c.size <= CHUNK then   -- the common case: one string, one crossing
    payload = c.n == 1 and c.body[1] or concat(c.body, "", 1, c.n)
  else
    local sent = c.size
    payload = drain(c)
    -- Sending left at least the response's size in garbage, which an idle state would keep
    -- until its next requests. A collection costs in proportion to the heap: collect when
    -- the response was at least a quarter of it.
    if sent * 4 >= collectgarbage("count") * 1024 then collectgarbage() end
  end
  c.body = nil
  c.closed = true
  if not c.sent then return true, payload, head(c) end
  return true, payload
end

-- Runs the finish handler for the request just answered: true, or false, an error kind and
-- its message (only logged: the response is already out).
local function finish()
  local c = current
  current = nil
  local fn = _G[finish_name]
  if c == nil or type(fn) ~= "function" then return true end
  local ok, kind, message = call(run_handler, fn, c.env, c)
  if not ok then return false, kind, message end
  return true
end

-- Closing ----------------------------------------------------------------------------------
-- The daemon calls close() before it drops the state: the script's globals and modules are
-- let go of and collected, so that their __gc finalizers (a database connection's close) run
-- here, in a Lua call, without Python's interpreter lock, on the daemon's closer thread.
-- Dropping the state afterwards (lua_close) runs the finalizers still left while holding that
-- lock, and lets every other worker wait: only those of objects the script hid elsewhere
-- (in the registry, in a C module).

local G, loaded, next, rawset, collect, strip = _G, package.loaded, next, rawset,
  collectgarbage, debug.setmetatable
local standard_globals, standard_modules = {}, {}
for name, value in next, G do standard_globals[name] = value end
for name, value in next, loaded do standard_modules[name] = value end

local function close()
  -- In LuaJIT nothing else refers to the flag thread: without this reference the collector
  -- freed it while the watcher could still arm a hook at its address (a SIGSEGV).
  current, app_handler, flag = nil, nil, nil
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

return true, load_state, serve, finish, close, tostring(request_thread), flag and tostring(flag)
