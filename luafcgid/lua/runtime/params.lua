-- FastCGI name-value pairs (spec 3.4), read and checked in one walk. The daemon's threads
-- read the two params a request is routed by with it (luafcgid/request/params.py); every
-- state decodes its env with it (runtime.lua).
--
-- decode(raw[, only]): a table of name -> value (a later name wins); with `only`, a set of
-- names and of their lengths, just those names (a pair whose name has none of the lengths is
-- passed over unsliced). nil and what is wrong when the bytes are not name-value pairs.

local byte, sub = string.byte, string.sub
local TRUNCATED = "name-value pair truncated"

local function long(raw, pos)   -- a length of four bytes, its top bit set
  local a, b, c, d = byte(raw, pos, pos + 3)
  return ((a - 128) * 256 + b) * 65536 + c * 256 + d
end

return function(raw, only)
  local params, pos, n = {}, 1, #raw
  while pos <= n do
    local name_len, value_len = byte(raw, pos, pos + 1)
    if value_len == nil then return nil, TRUNCATED end
    if name_len < 128 and value_len < 128 then   -- the common case: two one-byte lengths
      pos = pos + 2
    else
      if name_len < 128 then
        pos = pos + 1
      elseif pos + 3 <= n then
        name_len = long(raw, pos)
        pos = pos + 4
      else
        return nil, TRUNCATED
      end
      value_len = byte(raw, pos)
      if value_len == nil then return nil, TRUNCATED end
      if value_len < 128 then
        pos = pos + 1
      elseif pos + 3 <= n then
        value_len = long(raw, pos)
        pos = pos + 4
      else
        return nil, TRUNCATED
      end
    end
    local value_at = pos + name_len
    local stop = value_at + value_len
    if stop > n + 1 then return nil, "name-value pair longer than its stream" end
    if only == nil then
      params[sub(raw, pos, value_at - 1)] = sub(raw, value_at, stop - 1)
    elseif only[name_len] then
      local name = sub(raw, pos, value_at - 1)
      if only[name] then params[name] = sub(raw, value_at, stop - 1) end
    end
    pos = stop
  end
  return params
end
