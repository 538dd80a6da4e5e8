-- Serving a WSAPI application (https://keplerproject.github.io/wsapi/) through `con`.
-- Loaded by runtime.lua when a script is an application instead of defining a handler.
--
-- The application gets wsapi_env: every CGI variable of the request (a missing one reads as
-- ""), plus `input` (input:read(n) over the request body) and `error` (error:write(...) goes
-- to the daemon's log). It returns status, headers and a body iterator; the status may be a
-- number or a status line, a header value a string or a list of strings (one header line
-- each), and every chunk the iterator produces is sent to the web server as it comes.

local type, tostring, tonumber, pairs, ipairs, setmetatable, select, error =
  type, tostring, tonumber, pairs, ipairs, setmetatable, select, error
local concat, find, sub, gsub = table.concat, string.find, string.sub, string.gsub

local M = {}

local reasons = {
  [100] = "Continue", [200] = "OK", [201] = "Created", [202] = "Accepted",
  [204] = "No Content", [206] = "Partial Content", [301] = "Moved Permanently",
  [302] = "Found", [303] = "See Other", [304] = "Not Modified", [307] = "Temporary Redirect",
  [308] = "Permanent Redirect", [400] = "Bad Request", [401] = "Unauthorized",
  [403] = "Forbidden", [404] = "Not Found", [405] = "Method Not Allowed",
  [406] = "Not Acceptable", [409] = "Conflict", [410] = "Gone", [411] = "Length Required",
  [412] = "Precondition Failed", [413] = "Content Too Large", [415] = "Unsupported Media Type",
  [418] = "I'm a teapot", [422] = "Unprocessable Content", [429] = "Too Many Requests",
  [500] = "Internal Server Error", [501] = "Not Implemented", [502] = "Bad Gateway",
  [503] = "Service Unavailable", [504] = "Gateway Timeout",
}

-- 404 -> "404 Not Found"; "404" likewise; a status line is kept as it is.
local function status_line(status)
  if type(status) == "number" or (type(status) == "string" and find(status, "^%d+$")) then
    local code = tonumber(status)
    local reason = reasons[code]
    return reason and (code .. " " .. reason) or tostring(code)
  end
  if type(status) ~= "string" then
    error("WSAPI application returned a " .. type(status) .. " as its status", 0)
  end
  return status
end

-- wsapi_env.input: reads the request body, which luafcgid has already received whole.
local Input = {}
Input.__index = Input

function Input:read(n)
  local data, pos = self.data, self.pos
  if n == nil or n == "*a" or n == "a" then
    if n == nil and pos > #data then return nil end
    self.pos = #data + 1
    return sub(data, pos)
  end
  if n == "*l" or n == "l" or n == "*L" or n == "L" then
    if pos > #data then return nil end
    local stop = find(data, "\n", pos, true) or #data
    self.pos = stop + 1
    local line = sub(data, pos, stop)
    if n == "*l" or n == "l" then line = gsub(line, "\r?\n$", "") end
    return line
  end
  n = tonumber(n)
  if n == nil then error("bad argument to input:read (number or format expected)", 2) end
  if n <= 0 or pos > #data then return nil end
  self.pos = pos + n
  return sub(data, pos, pos + n - 1)
end

local ErrorStream = {}
ErrorStream.__index = ErrorStream

function ErrorStream:write(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  local message = gsub(concat(parts), "[\r\n]+$", "")
  if message ~= "" then self.log(self.script, message) end
  return self
end

function ErrorStream:flush() return self end

local function empty_string() return "" end

-- The handler(env, con) that runs the application's `run` function for one request.
function M.handler(run, script, dir, log)
  local errors = setmetatable({script = script, log = log}, ErrorStream)
  return function(env, con)
    local wsapi_env = setmetatable({}, {__index = empty_string})
    for name, value in pairs(env) do wsapi_env[name] = value end
    if wsapi_env.PATH_INFO == "" then wsapi_env.PATH_INFO = "/" end
    if wsapi_env.APP_PATH == "" then wsapi_env.APP_PATH = dir end
    local input = con:gets()
    wsapi_env.input = setmetatable({data = input, pos = 1, length = #input}, Input)
    wsapi_env.error = errors

    local status, headers, body = run(wsapi_env)
    con:header("Status", status_line(status or 200))
    for name, value in pairs(headers or {}) do
      if type(value) == "table" then
        for _, item in ipairs(value) do con:header(name, tostring(item)) end
      else
        con:header(name, tostring(value))
      end
    end
    if type(body) == "string" then
      con:puts(body)
    elseif type(body) == "table" then
      for _, chunk in ipairs(body) do con:puts(chunk) end
    elseif body ~= nil then
      while true do
        local chunk = body()
        if chunk == nil then break end
        con:puts(chunk)
        con:flush()
      end
    end
  end
end

return M
