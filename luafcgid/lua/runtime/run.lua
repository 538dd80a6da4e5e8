-- Loading and running: the prelude and the script, then each request's handler and finish
-- handler, in the request thread. Returns load_state(), serve(params, input), finish() and
-- forget() (lets go of the request and the application, before the state closes).

local script, dir, log, opts, KIND, is_memory_error, load_file, loadfile_absolute, io_open,
  call, Con, head, drain, decode_params = ...
local concat, type, tostring, setmetatable = table.concat, type, tostring, setmetatable
local find, match, sub = string.find, string.match, string.sub
local handler_name, finish_name, CHUNK, version =
  opts.handler, opts.finishhandler, opts.chunk, opts.version

-- Compiles and runs a Lua file (in the request thread): true and the chunk's first result, or
-- false, an error kind and its message.
local function run_file(file, ...)
  local chunk, message = load_file(file)
  if not chunk then
    if is_memory_error(message) then return false, KIND.memory, message end
    local probe = io_open(file, "rb")
    if not probe then return false, KIND.file, message end
    probe:close()
    if not find(message, file, 1, true) then message = file .. ": " .. message end
    return false, KIND.syntax, message
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
modname = match(modname, "^(.+)%.[^.]*$") or modname

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

-- The env table is decoded here from the params as received (params.lua) rather than
-- converted from a Python dict (lupa's table_from: 1.6 us for nginx's 21 params, holding the
-- interpreter lock); Lua runs without it. Hello world with upstream keep-alive: +9%
-- requests/s, -6% CPU per request (median of six alternating 3 s runs).
-- Returns true, the body not yet sent and, when they were not sent either, the headers; or
-- false, an error kind, its message and whether the headers already went out (then a 500
-- page can no longer be sent). Headers and body stay apart: Python joins them with a copy,
-- where Lua would also intern the joined string.
local function serve(raw_params, input)
  local env = assert(decode_params(raw_params))   -- checked as they were read (params.py)
  env.LUAFCGID_VERSION = version
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
      return false, KIND.runtime, handler_name .. "() function not found", false
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

local function forget()
  current, app_handler = nil, nil
end

return load_state, serve, finish, forget
