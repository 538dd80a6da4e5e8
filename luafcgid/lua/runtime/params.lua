-- FastCGI name-value pairs (spec 3.4), read and checked in one walk. The daemon's threads
-- read the two params a request is routed by with it (luafcgid/request/params.py); every
-- state decodes its env with it (runtime.lua).
--
-- decode(raw[, only]): a table of name -> value (a later name wins); with `only`, a set of
-- names and of their lengths, just those names (a pair whose name has none of the lengths is
-- passed over unsliced). nil and what is wrong when the bytes are not name-value pairs.

local byte, sub = string.byte, string.sub
local TRUNCATED = "name-value pair truncated"

-- the length at pos, one byte or four with the top bit set, and where what follows starts;
-- nil when the stream ends first. Only a pair with a long length comes here (two one-byte
-- lengths are read inline below); decoding nginx's 21 params with one took 1.63 us in
-- LuaJIT, as when this was written out for the name and for the value (1.63; with every
-- length long 1.78 and 1.78: python3 -m bench.params_decode).
local function length(raw, pos, n)
  local a = byte(raw, pos)
  if a == nil then return nil end
  if a < 128 then return a, pos + 1 end
  if pos + 3 > n then return nil end
  local b, c, d = byte(raw, pos + 1, pos + 3)
  return ((a - 128) * 256 + b) * 65536 + c * 256 + d, pos + 4
end

return function(raw, only)
  local params, pos, n = {}, 1, #raw
  while pos <= n do
    local name_len, value_len = byte(raw, pos, pos + 1)
    if value_len == nil then return nil, TRUNCATED end
    if name_len < 128 and value_len < 128 then   -- the common case: two one-byte lengths
      pos = pos + 2
    else
      name_len, pos = length(raw, pos, n)
      if name_len == nil then return nil, TRUNCATED end
      value_len, pos = length(raw, pos, n)
      if value_len == nil then return nil, TRUNCATED end
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
