-- The request object, `con`, and the response it buffers. Returns Con (its metatable),
-- head(c) (the response's headers, which it marks sent) and drain(c) (hands the buffered body
-- to Python in pieces, see below, and returns the last of them).

local config, opts, script, send, log = ...
local concat, type, tostring, error, select = table.concat, type, tostring, error, select
local find, lower, match, sub = string.find, string.lower, string.match, string.sub

local status_default, contenttype_default, buffering =
  opts.httpstatus, opts.contenttype, opts.buffering
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

return Con, head, drain
