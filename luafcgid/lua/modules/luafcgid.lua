-- luafcgid: helpers for scripts. local luafcgid = require("luafcgid")
-- Works on Lua 5.1 to 5.5 and LuaJIT.

local M = {}

-- The shared dictionaries of setting `shared`, by name (luafcgid/lua/shared.lua), which the
-- daemon set up in this state before the script ran.
M.shared = package.loaded["luafcgid.shared"] or {}

local byte, char, format, gsub, tonumber, tostring, type, pairs, concat, sort =
  string.byte, string.char, string.format, string.gsub, tonumber, tostring, type, pairs,
  table.concat, table.sort

local function hex_byte(c) return format("%%%02X", byte(c)) end

-- Percent-encodes everything but the unreserved characters of RFC 3986.
function M.urlencode(s)
  return (gsub(tostring(s), "[^%w%-%._~]", hex_byte))
end

local function from_hex(h) return char(tonumber(h, 16)) end

-- "+" is a space, "%XX" a byte (form encoding); malformed escapes are left as they are.
function M.urldecode(s)
  s = gsub(tostring(s), "%+", " ")
  return (gsub(s, "%%(%x%x)", from_hex))
end

local function add(t, name, value)
  local old = t[name]
  if old == nil then
    t[name] = value
  elseif type(old) == "table" then
    old[#old + 1] = value
  else
    t[name] = {old, value}
  end
end

-- An application/x-www-form-urlencoded string (a query string or a POST body) to a table.
-- A name given more than once maps to the list of its values, in order.
function M.parse(s)
  local t = {}
  if s == nil then return t end
  for pair in (tostring(s) .. "&"):gmatch("([^&;]*)[&;]") do
    if pair ~= "" then
      local name, value = pair:match("^([^=]*)=(.*)$")
      if not name then name, value = pair, "" end
      add(t, M.urldecode(name), M.urldecode(value))
    end
  end
  return t
end

-- A Cookie header ("a=1; b=2") to a table; values are not url-decoded (RFC 6265).
function M.parse_cookies(s)
  local t = {}
  if s == nil then return t end
  for pair in (tostring(s) .. ";"):gmatch("([^;]*);") do
    local name, value = pair:match("^%s*([^=]-)%s*=%s*(.-)%s*$")
    if name and name ~= "" and t[name] == nil then
      if value:sub(1, 1) == '"' and value:sub(-1) == '"' and #value >= 2 then
        value = value:sub(2, -2)
      end
      t[name] = value
    end
  end
  return t
end

local html_escapes = {["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                      ["'"] = "&#39;"}

-- Text to put into HTML, in element content or a quoted attribute.
function M.escape_html(s)
  return (gsub(tostring(s), "[&<>\"']", html_escapes))
end

local keywords = {}
for word in ("and break do else elseif end false for function goto if in local nil not or "
             .. "repeat return then true until while"):gmatch("%a+") do
  keywords[word] = true
end

local function is_identifier(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil and not keywords[s]
end

local function serialize(v, seen)
  local t = type(v)
  if t == "string" then
    return format("%q", v)
  elseif t == "number" then
    if v ~= v then return "0/0" end
    if v == math.huge then return "math.huge" end
    if v == -math.huge then return "-math.huge" end
    if math.type and math.type(v) == "integer" then return tostring(v) end
    if v == math.floor(v) and v > -2^53 and v < 2^53 then return format("%d", v) end
    return format("%.17g", v)
  elseif t == "boolean" or t == "nil" then
    return tostring(v)
  elseif t == "table" then
    if seen[v] then error("serialize: cannot serialize a table that contains itself", 0) end
    seen[v] = true
    local out, n = {}, #v
    for i = 1, n do out[#out + 1] = serialize(v[i], seen) end
    local keys = {}
    for k in pairs(v) do
      if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then
        keys[#keys + 1] = k
      end
    end
    sort(keys, function(a, b)
      if type(a) == type(b) and (type(a) == "string" or type(a) == "number") then return a < b end
      return type(a) < type(b)
    end)
    for _, k in ipairs(keys) do
      local key = is_identifier(k) and k or "[" .. serialize(k, seen) .. "]"
      out[#out + 1] = key .. "=" .. serialize(v[k], seen)
    end
    seen[v] = nil
    return "{" .. concat(out, ",") .. "}"
  end
  error("serialize: cannot serialize a " .. t, 0)
end

-- Strings, numbers, booleans, nil and tables of them to Lua source that `load` turns back
-- into an equal value: load("return " .. serialize(v))().
function M.serialize(v)
  return serialize(v, {})
end

return M
