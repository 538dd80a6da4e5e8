-- Shared dictionaries (setting `shared`): require("luafcgid").shared.NAME, one store for every
-- state, worker and process, with the methods and meanings of OpenResty's ngx.shared.DICT.
-- runtime.lua runs this file in every state before the script, with the dictionaries as
-- Python describes them (luafcgid/shared/dictionaries.py), LuaJIT's ffi module or nil, and the
-- Python callback. With ffi, the operations work on the shared memory itself (the format of
-- luafcgid/shared/layout.py, the operations of luafcgid/shared/dictionary.py written again
-- for the FFI): a get costs a mutex and a few memory reads, and no call into Python, whose
-- interpreter lock every worker of the process shares. Without ffi (PUC Lua) each operation
-- is one call into dictionary.py. ffi stays here: scripts are not handed it.

local spec, ffi, call = ...

local type, tostring, tonumber, error, pcall, setmetatable, floor =
  type, tostring, tonumber, error, pcall, setmetatable, math.floor
local math_type = math.type
local STRING, NUMBER, BOOLEAN, INTEGER = spec.STRING, spec.NUMBER, spec.BOOLEAN, spec.INTEGER
local SAFE = {set = false, safe_set = true, add = false, safe_add = true, replace = false}

-- Through Python: each operation is a call into dictionary.py ---------------------------------

local function through_python()
  local code = {}
  for i, name in ipairs(spec.ops) do code[name] = i end
  local byte, sub = string.byte, string.sub
  local backend = {}
  for _, name in ipairs({"incr", "ttl", "expire", "flush_all", "flush_expired", "free_space"}) do
    local op = code[name]
    backend[name] = function(d, ...) return call(op, d.index, ...) end
  end
  function backend.get(d, key, stale)
    return call(stale and code.get_stale or code.get, d.index, key)
  end
  function backend.store(d, mode, ...)
    return call(code[mode], d.index, ...)
  end
  function backend.get_keys(d, limit)   -- one string: each key after its length in 2 bytes
    local blob, keys, at = call(code.get_keys, d.index, limit), {}, 1
    while at <= #blob do
      local high, low = byte(blob, at, at + 1)
      local stop = at + 1 + high * 256 + low
      keys[#keys + 1] = sub(blob, at + 2, stop)
      at = stop + 1
    end
    return keys
  end
  function backend.attach(index)
    return {index = index}
  end
  return backend
end

-- In shared memory, through LuaJIT's FFI ----------------------------------------------------

local function in_shared_memory()
  ffi.cdef(spec.cdef .. [[
    int luafcgid_mutex_lock(void *) __asm__("pthread_mutex_lock");
    int luafcgid_mutex_unlock(void *) __asm__("pthread_mutex_unlock");
    int luafcgid_mutex_consistent(void *) __asm__("pthread_mutex_consistent");
    int luafcgid_memcmp(const void *, const void *, size_t) __asm__("memcmp");
    typedef struct { long sec; long nsec; } luafcgid_timespec;
    int luafcgid_clock_gettime(int, luafcgid_timespec *) __asm__("clock_gettime");
    typedef union { double d; int64_t i; uint8_t b[8]; } luafcgid_number;
  ]])
  local C, cast, copy, fill, fstring, new = ffi.C, ffi.cast, ffi.copy, ffi.fill, ffi.string, ffi.new
  local band, bxor, rshift, bnot = bit.band, bit.bxor, bit.rshift, bit.bnot
  local byte, min, max = string.byte, math.min, math.max
  local FIRST, REST, FLUSHED = spec.FIRST, spec.REST, -1
  local EOWNERDEAD, EDEADLK, CLOCK = spec.EOWNERDEAD, spec.EDEADLK, spec.CLOCK_MONOTONIC
  local bytes_t = "const uint8_t *"
  local ts, num = new("luafcgid_timespec"), new("luafcgid_number")
  local scratch, scratch_size = nil, 0

  local crc = {}   -- CRC-32 (zlib's), which Python computes with zlib.crc32
  for i = 0, 255 do
    local c = i
    for _ = 1, 8 do
      c = band(c, 1) ~= 0 and bxor(rshift(c, 1), 0xEDB88320) or rshift(c, 1)
    end
    crc[i] = c
  end

  local function hash(key)
    local c = -1
    for i = 1, #key do c = bxor(rshift(c, 8), crc[band(bxor(c, byte(key, i)), 255)]) end
    return bnot(c) % 4294967296
  end

  local function now()
    C.luafcgid_clock_gettime(CLOCK, ts)
    return tonumber(ts.sec) + tonumber(ts.nsec) * 1e-9
  end

  local function expired(e, t)
    local expires = e.expires
    return expires ~= 0 and expires <= (t or now())
  end

  local function chunks_for(length)
    if length <= FIRST then return 1 end
    return 1 + floor((length - FIRST + REST - 1) / REST)
  end

  local function available(h)
    return h.nfree + h.nchunks - h.bump
  end

  -- n data bytes of entry i, from byte `at` (key and value are one run of data), copied out
  -- to the pointer `to` (into = false) or in from `to` (into = true)
  local function transfer(d, i, at, n, to, into)
    local chunks, done = d.chunks, 0
    if at < FIRST then
      done = min(FIRST - at, n)
      if into then copy(chunks[i].e.data + at, to, done) else copy(to, chunks[i].e.data + at, done) end
      at = 0
    else
      at = at - FIRST
    end
    i = chunks[i].c.next
    while at >= REST do i, at = chunks[i].c.next, at - REST end
    while done < n do
      local c = chunks[i].c
      local take = min(REST - at, n - done)
      if into then copy(c.data + at, to + done, take) else copy(to + done, c.data + at, take) end
      done, at, i = done + take, 0, c.next
    end
  end

  local function text(d, i, at, n)   -- a Lua string of n data bytes of entry i from `at`
    if at + n <= FIRST then return fstring(d.chunks[i].e.data + at, n) end
    if n > scratch_size then
      scratch_size = max(n, 2 * scratch_size)
      scratch = new("uint8_t[?]", scratch_size)
    end
    transfer(d, i, at, n, scratch, false)
    return fstring(scratch, n)
  end

  local function value_of(d, i)
    local e = d.chunks[i].e
    local vtype, klen = e.vtype, e.klen
    if vtype == STRING then return text(d, i, klen, e.vlen) end
    transfer(d, i, klen, vtype == BOOLEAN and 1 or 8, num.b, false)
    if vtype == NUMBER then return num.d end
    if vtype == BOOLEAN then return num.b[0] ~= 0 end
    return tonumber(num.i)   -- INTEGER, as a Lua 5.3+ state stores it: a number here
  end

  local function find(d, key, h)
    local chunks, n = d.chunks, #key
    local i = d.buckets[band(h, d.mask)]
    while i ~= 0 do
      local e = chunks[i].e
      if e.hash == h and e.klen == n then
        if n <= FIRST then
          if C.luafcgid_memcmp(e.data, key, n) == 0 then return i end
        elseif text(d, i, 0, n) == key then
          return i
        end
      end
      i = e.hnext
    end
    return 0
  end

  local function unlink(d, i)
    local h, chunks = d.h, d.chunks
    local e = chunks[i].e
    local prev, after = e.prev, e.lnext
    if prev ~= 0 then chunks[prev].e.lnext = after else h.head = after end
    if after ~= 0 then chunks[after].e.prev = prev else h.tail = prev end
  end

  local function push(d, i)
    local h, chunks = d.h, d.chunks
    local head = h.head
    local e = chunks[i].e
    e.prev, e.lnext = 0, head
    if head ~= 0 then chunks[head].e.prev = i else h.tail = i end
    h.head = i
  end

  local function touch(d, i)
    local h = d.h
    if h.head ~= i then
      h.dirty = 1
      unlink(d, i)
      push(d, i)
      h.dirty = 0
    end
  end

  local function alloc(d)
    local h, chunks = d.h, d.chunks
    local i = h.free
    if i ~= 0 then
      h.free, h.nfree = chunks[i].c.next, h.nfree - 1
    else
      i = h.bump + 1
      h.bump = i
    end
    chunks[i].c.next = 0
    return i
  end

  local function free_chain(d, i)
    local h, chunks = d.h, d.chunks
    while i ~= 0 do
      local c = chunks[i].c
      local after = c.next
      c.next, h.free, h.nfree = h.free, i, h.nfree + 1
      i = after
    end
  end

  local function nth(d, i, n)
    local chunks = d.chunks
    for _ = 1, n do i = chunks[i].c.next end
    return i
  end

  local function resize(d, i, have, need)
    local chunks = d.chunks
    if need > have then
      local last = nth(d, i, have - 1)
      for _ = 1, need - have do
        local j = alloc(d)
        chunks[last].c.next = j
        last = j
      end
    elseif need < have then
      local cut = chunks[nth(d, i, need - 1)].c
      local rest = cut.next
      cut.next = 0
      free_chain(d, rest)
    end
  end

  local function remove(d, i)   -- the caller set dirty
    local chunks, buckets = d.chunks, d.buckets
    local e = chunks[i].e
    local slot = band(e.hash, d.mask)
    if buckets[slot] == i then
      buckets[slot] = e.hnext
    else
      local j = buckets[slot]
      while chunks[j].e.hnext ~= i do j = chunks[j].e.hnext end
      chunks[j].e.hnext = e.hnext
    end
    unlink(d, i)
    free_chain(d, i)
    d.h.count = d.h.count - 1
  end

  local function expire_tail(d, limit)   -- as dictionary.py's _expire_tail
    local h = d.h
    for _ = 1, limit do
      local tail = h.tail
      if tail == 0 or not expired(d.chunks[tail].e) then return end
      h.dirty = 1
      remove(d, tail)
      h.dirty = 0
    end
  end

  local function evict(d, needed, keep, valid)   -- as dictionary.py's _evict (dirty set)
    local h, forcible, t = d.h, false, now()
    while available(h) < needed do
      local tail = h.tail
      if tail == 0 or tail == keep then break end
      if not expired(d.chunks[tail].e, t) then
        if not valid then break end
        forcible = true
      end
      remove(d, tail)
    end
    return forcible
  end

  local function reset(d)
    local h = d.h
    fill(d.buckets, 4 * (d.mask + 1))
    h.bump, h.free, h.nfree, h.head, h.tail, h.count, h.dirty = 0, 0, 0, 0, 0, 0, 0
  end

  -- A __gc finalizer run by an allocation inside an operation must not start another: the
  -- mutex would let this thread in (EDEADLK) and the first would go on unlocked.
  local busy = false

  local function unlocked(d, ok, ...)
    busy = false
    if not ok and d.h.dirty ~= 0 then reset(d) end
    C.luafcgid_mutex_unlock(d.mutex)
    if not ok then error((...), 0) end
    return ...
  end

  -- op(d, ...) holding d's mutex. Its errors (memory_limit, a stack overflow) let the mutex
  -- go; a call stopped at request_timeout cannot, and Python lets go for it
  -- (Dictionary.release). An operation interrupted while it changed the structure leaves
  -- `dirty`, and the next owner empties the dictionary rather than trust it.
  local function locked(op, d, a, b, c, e, f, g, k)
    if busy then
      error("shared dictionary " .. d.name .. ": used inside one of its own operations " ..
            "(from a __gc finalizer?)", 3)
    end
    local code = C.luafcgid_mutex_lock(d.mutex)
    if code ~= 0 then
      if code ~= EOWNERDEAD and code ~= EDEADLK then
        error("shared dictionary " .. d.name .. ": pthread_mutex_lock failed with error " ..
              code, 3)
      end
      if d.h.dirty ~= 0 then reset(d) end
      if code == EOWNERDEAD then C.luafcgid_mutex_consistent(d.mutex) end
    end
    busy = true
    return unlocked(d, pcall(op, d, a, b, c, e, f, g, k))
  end

  -- the operations, as dictionary.py's ---------------------------------------------------

  local function get(d, key, h, stale)
    local i = find(d, key, h)
    if i == 0 then return nil end
    local e = d.chunks[i].e
    local old = expired(e)
    if old and not stale then return nil end
    touch(d, i)
    local flags = e.flags
    if stale then return value_of(d, i), flags ~= 0 and flags or nil, old end
    if flags ~= 0 then return value_of(d, i), flags end
    return value_of(d, i)
  end

  local function store(d, mode, key, h, vtype, value, exptime, flags)
    local hd, chunks = d.h, d.chunks
    expire_tail(d, 2)
    local i = find(d, key, h)
    local live = i ~= 0 and not expired(chunks[i].e)
    if live and (mode == "add" or mode == "safe_add") then return false, "exists", false end
    if not live and mode == "replace" then return false, "not found", false end
    if vtype == 0 then
      if i ~= 0 then
        hd.dirty = 1
        remove(d, i)
        hd.dirty = 0
      end
      return true, nil, false
    end
    local klen, from, vlen = #key
    if vtype == STRING then
      from, vlen = cast(bytes_t, value), #value
    elseif vtype == BOOLEAN then
      num.b[0] = value and 1 or 0
      from, vlen = num.b, 1
    else   -- NUMBER: LuaJIT has no integers
      num.d = value
      from, vlen = num.b, 8
    end
    local need = chunks_for(klen + vlen)
    if need > hd.nchunks then return false, "no memory", false end
    local have = i ~= 0 and chunks_for(klen + chunks[i].e.vlen) or 0
    hd.dirty = 1
    if i ~= 0 then   -- the most recent now, out of eviction's way
      unlink(d, i)
      push(d, i)
    end
    local forcible = evict(d, need - have, i, not SAFE[mode])
    if need - have > available(hd) then
      hd.dirty = 0
      return false, "no memory", forcible
    end
    if i ~= 0 then
      resize(d, i, have, need)
    else
      i = alloc(d)
      resize(d, i, 1, need)
      local slot = band(h, d.mask)
      chunks[i].e.hnext = d.buckets[slot]
      d.buckets[slot] = i
      push(d, i)
      hd.count = hd.count + 1
    end
    local e = chunks[i].e
    e.hash, e.klen, e.vtype, e.vlen, e.flags = h, klen, vtype, vlen, flags
    e.expires = exptime > 0 and now() + exptime or 0
    transfer(d, i, 0, klen, cast(bytes_t, key), true)
    transfer(d, i, klen, vlen, from, true)
    hd.dirty = 0
    return true, nil, forcible
  end

  local function incr(d, key, h, n, init, init_ttl)
    expire_tail(d, 2)
    local i = find(d, key, h)
    if i == 0 or expired(d.chunks[i].e) then
      if init == nil then return nil, "not found", false end
      local ok, err, forcible = store(d, "set", key, h, NUMBER, init + n, init_ttl, 0)
      if ok then return init + n, nil, forcible end
      return nil, err, forcible
    end
    local e = d.chunks[i].e
    local vtype, klen = e.vtype, e.klen
    if vtype ~= NUMBER and vtype ~= INTEGER then return nil, "not a number", false end
    transfer(d, i, klen, 8, num.b, false)
    local value = (vtype == NUMBER and num.d or tonumber(num.i)) + n
    num.d = value
    e.vtype = NUMBER
    transfer(d, i, klen, 8, num.b, true)
    touch(d, i)
    return value, nil, false
  end

  local function ttl(d, key, h)
    local i = find(d, key, h)
    local t = now()
    if i == 0 or expired(d.chunks[i].e, t) then return nil, "not found" end
    local expires = d.chunks[i].e.expires
    return expires == 0 and 0 or expires - t
  end

  local function expire(d, key, h, exptime)
    local i = find(d, key, h)
    local t = now()
    if i == 0 or expired(d.chunks[i].e, t) then return nil, "not found" end
    d.chunks[i].e.expires = exptime > 0 and t + exptime or 0
    return true
  end

  local function flush_all(d)
    local i, chunks = d.h.head, d.chunks
    while i ~= 0 do
      chunks[i].e.expires = FLUSHED
      i = chunks[i].e.lnext
    end
  end

  local function flush_expired(d, limit)
    local h, chunks, done, t = d.h, d.chunks, 0, now()
    local i = h.tail
    while i ~= 0 and (limit == 0 or done < limit) do
      local prev = chunks[i].e.prev
      if expired(chunks[i].e, t) then
        h.dirty = 1
        remove(d, i)
        h.dirty = 0
        done = done + 1
      end
      i = prev
    end
    return done
  end

  local function get_keys(d, limit)
    local chunks, keys, n, t = d.chunks, {}, 0, now()
    local i = d.h.head
    while i ~= 0 and (limit == 0 or n < limit) do
      local e = chunks[i].e
      if not expired(e, t) then
        n = n + 1
        keys[n] = text(d, i, 0, e.klen)
      end
      i = e.lnext
    end
    return keys
  end

  local function free_space(d)
    return available(d.h) * spec.CHUNK
  end

  return {
    attach = function(_, address)
      local base = cast("uint8_t *", address)
      local h = cast("luafcgid_shared_header *", base)
      return {h = h, mutex = base, buckets = cast("uint32_t *", base + h.buckets_at),
              chunks = cast("luafcgid_shared_chunk *", base + h.chunks_at) - 1,
              mask = h.nbuckets - 1}
    end,
    get = function(d, key, stale) return locked(get, d, key, hash(key), stale) end,
    store = function(d, mode, key, vtype, value, exptime, flags)
      return locked(store, d, mode, key, hash(key), vtype, value, exptime, flags)
    end,
    incr = function(d, key, n, _, init, _, init_ttl)
      return locked(incr, d, key, hash(key), n, init, init_ttl)
    end,
    ttl = function(d, key) return locked(ttl, d, key, hash(key)) end,
    expire = function(d, key, exptime) return locked(expire, d, key, hash(key), exptime) end,
    flush_all = function(d) return locked(flush_all, d) end,
    flush_expired = function(d, limit) return locked(flush_expired, d, limit) end,
    get_keys = function(d, limit) return locked(get_keys, d, limit) end,
    free_space = function(d) return locked(free_space, d) end,
  }
end

local backend = ffi and in_shared_memory() or through_python()

-- The methods: ngx.shared.DICT's arguments and errors ----------------------------------------

local inner = {}   -- dictionary object -> what the backend needs of it

local function dict_of(self)
  local d = inner[self]
  if d == nil then
    error('bad "zone" argument: call the methods with a colon, as dict:get(key)', 3)
  end
  return d
end

local function key_of(key)
  if key == nil then return nil, "nil key" end
  if type(key) ~= "string" then key = tostring(key) end
  if #key == 0 then return nil, "empty key" end
  if #key > spec.MAX_KEY then return nil, "key too long" end
  return key
end

local function is_integer(n)
  return math_type ~= nil and math_type(n) == "integer"
end

local function value_type(value)
  local t = type(value)
  if t == "string" then return STRING end
  if t == "number" then return is_integer(value) and INTEGER or NUMBER end
  if t == "boolean" then return BOOLEAN end
  if t == "nil" then return 0 end
  return nil, "bad value type (" .. t .. "): a shared dictionary holds strings, numbers, " ..
    "booleans and nil"
end

local function seconds(value, name)
  if value == nil then return 0 end
  if type(value) ~= "number" or not (value >= 0) then
    error("bad " .. name .. " arg: seconds (a number, 0 or more) expected, got " ..
          tostring(value), 3)
  end
  return value
end

local function count(value, default, name)
  if value == nil then return default end
  if type(value) ~= "number" or value < 0 or value ~= floor(value) or value >= 2^31 then
    error("bad " .. name .. " arg: a whole number, 0 or more, expected", 3)
  end
  return floor(value)
end

local function number(value, name)
  local n = tonumber(value)
  if n == nil then error("bad " .. name .. " arg: number expected, got " .. type(value), 3) end
  return n
end

local Dict = {__metatable = "luafcgid shared dictionary"}
Dict.__index = Dict

function Dict:get(key)
  local d = dict_of(self)
  local k, err = key_of(key)
  if not k then return nil, err end
  return backend.get(d, k, false)
end

function Dict:get_stale(key)
  local d = dict_of(self)
  local k, err = key_of(key)
  if not k then return nil, err end
  return backend.get(d, k, true)
end

local function storing(mode)
  return function(self, key, value, exptime, flags)
    local d = dict_of(self)
    local k, err = key_of(key)
    if not k then return nil, err end
    local vtype, bad = value_type(value)
    if not vtype then return nil, bad end
    exptime = seconds(exptime, "exptime")
    if flags == nil then
      flags = 0
    elseif type(flags) ~= "number" or flags < 0 or flags >= 2^32 or flags ~= floor(flags) then
      error("bad flags arg: a whole number from 0 to 2^32 - 1 expected", 2)
    end
    return backend.store(d, mode, k, vtype, value, exptime, floor(flags))
  end
end

for mode in pairs(SAFE) do Dict[mode] = storing(mode) end

function Dict:delete(key)
  local d = dict_of(self)
  local k, err = key_of(key)
  if not k then return nil, err end
  return backend.store(d, "set", k, 0, nil, 0, 0)
end

function Dict:incr(key, value, init, init_ttl)
  local d = dict_of(self)
  local k, err = key_of(key)
  if not k then return nil, err end
  local n = number(value, "value")
  if init ~= nil then init = number(init, "init") end
  if init_ttl ~= nil and init == nil then error('must provide "init" when providing "init_ttl"', 2) end
  return backend.incr(d, k, n, is_integer(n), init, init ~= nil and is_integer(init),
                      seconds(init_ttl, "init_ttl"))
end

function Dict:ttl(key)
  local d = dict_of(self)
  local k, err = key_of(key)
  if not k then return nil, err end
  return backend.ttl(d, k)
end

function Dict:expire(key, exptime)
  local d = dict_of(self)
  local k, err = key_of(key)
  if not k then return nil, err end
  if exptime == nil then error("bad exptime arg: seconds (a number, 0 or more) expected", 2) end
  return backend.expire(d, k, seconds(exptime, "exptime"))
end

function Dict:flush_all()
  backend.flush_all(dict_of(self))
end

function Dict:flush_expired(max_count)
  return backend.flush_expired(dict_of(self), count(max_count, 0, "max_count"))
end

function Dict:get_keys(max_count)
  return backend.get_keys(dict_of(self), count(max_count, 1024, "max_count"))
end

function Dict:capacity()
  return dict_of(self).capacity
end

function Dict:free_space()
  return backend.free_space(dict_of(self))
end

local shared = {}
for index, name in ipairs(spec.names) do
  local d = backend.attach(index, spec.addresses[index])
  d.name, d.capacity = name, spec.capacities[index]
  local object = setmetatable({}, Dict)
  inner[object] = d
  shared[name] = object
end
return shared
