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

local type, tostring, tonumber, error, setmetatable, floor =
  type, tostring, tonumber, error, setmetatable, math.floor
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
-- The functions of dictionary.py, written again; like there, an entry is its first word e,
-- and the memory is read through views of words, half-words, bytes and doubles at the
-- positions of layout.INDEX, which give numbers: LuaJIT's interpreter (JIT off, with
-- request_timeout) boxes no cdata for them.

local function in_shared_memory()
  ffi.cdef[[
    int luafcgid_mutex_lock(void *) __asm__("pthread_mutex_lock");
    int luafcgid_mutex_unlock(void *) __asm__("pthread_mutex_unlock");
    int luafcgid_mutex_consistent(void *) __asm__("pthread_mutex_consistent");
    int luafcgid_memcmp(const void *, const void *, size_t) __asm__("memcmp");
    unsigned long luafcgid_crc32(unsigned long, const void *, unsigned int) __asm__("crc32");
    typedef struct { long sec; long nsec; } luafcgid_timespec;
    int luafcgid_clock_gettime(int, luafcgid_timespec *) __asm__("clock_gettime");
    typedef union { double d; int64_t i; uint8_t b[8]; } luafcgid_number;
  ]]
  local C, cast, copy, fill, fstring, new = ffi.C, ffi.cast, ffi.copy, ffi.fill, ffi.string, ffi.new
  local band = bit.band
  local min, max = math.min, math.max
  -- keys are hashed with zlib's CRC-32, Python's zlib.crc32: the same C function, and no
  -- loop over the key's bytes in Lua (see find)
  local zlib = ffi.load(spec.zlib)
  local FIRST, REST, FLUSHED = spec.FIRST, spec.REST, -1
  local EOWNERDEAD, EDEADLK, CLOCK = spec.EOWNERDEAD, spec.EDEADLK, spec.CLOCK_MONOTONIC
  local I = spec.index
  local NCHUNKS, BUMP, FREE, NFREE, HEAD, TAIL, COUNT, DIRTY =
    I.NCHUNKS, I.BUMP, I.FREE, I.NFREE, I.HEAD, I.TAIL, I.COUNT, I.DIRTY
  local NEXT, HNEXT, PREV, LNEXT, HASH, VLEN, FLAGS, KLEN, VTYPE, EXPIRES, DATA, WORDS =
    I.NEXT, I.HNEXT, I.PREV, I.LNEXT, I.HASH, I.VLEN, I.FLAGS, I.KLEN, I.VTYPE, I.EXPIRES,
    I.DATA, I.WORDS
  local bytes_t = "const uint8_t *"
  local ts, num = new("luafcgid_timespec"), new("luafcgid_number")
  local scratch, scratch_size = nil, 0

  local function hash(key)
    return tonumber(zlib.luafcgid_crc32(0, key, #key))
  end

  local function now()
    C.luafcgid_clock_gettime(CLOCK, ts)
    return tonumber(ts.sec) + tonumber(ts.nsec) * 1e-9
  end

  local function chunks_for(length)   -- layout.chunks_for
    if length <= FIRST then return 1 end
    return 1 + floor((length - FIRST + REST - 1) / REST)
  end

  local function available(d)
    local w = d.w
    return w[NFREE] + w[NCHUNKS] - w[BUMP]
  end

  local function expired(d, e, t)
    local expires = d.f64[e / 2 + EXPIRES]
    return expires ~= 0 and expires <= (t or now())
  end

  local function alloc(d)
    local w, e0 = d.w, d.e0
    local i = w[FREE]
    if i ~= 0 then
      w[FREE], w[NFREE] = w[e0 + i * WORDS + NEXT], w[NFREE] - 1
    else
      i = w[BUMP] + 1
      w[BUMP] = i
    end
    w[e0 + i * WORDS + NEXT] = 0
    return i
  end

  local function free_chain(d, i)
    local w, e0 = d.w, d.e0
    while i ~= 0 do
      local word = e0 + i * WORDS + NEXT
      i, w[word], w[FREE], w[NFREE] = w[word], w[FREE], i, w[NFREE] + 1
    end
  end

  local function nth(d, i, n)   -- the n-th chunk (from 0) of the chain starting at i
    local w, e0 = d.w, d.e0
    for _ = 1, n do i = w[e0 + i * WORDS + NEXT] end
    return i
  end

  local function resize(d, i, have, need)
    local w, e0 = d.w, d.e0
    if need > have then
      local last = nth(d, i, have - 1)
      for _ = 1, need - have do
        local j = alloc(d)
        w[e0 + last * WORDS + NEXT] = j
        last = j
      end
    elseif need < have then
      local cut = e0 + nth(d, i, need - 1) * WORDS + NEXT
      local rest = w[cut]
      w[cut] = 0
      free_chain(d, rest)
    end
  end

  -- n data bytes of entry e from `at` copied out to the pointer `to`, or (into) in from it:
  -- dictionary.py's _segments with _gather or _scatter
  local function transfer(d, e, at, n, to, into)
    local w, b, e0, done = d.w, d.b, d.e0, 0
    if at < FIRST then
      done = min(FIRST - at, n)
      if into then copy(b + 4 * e + DATA + at, to, done) else copy(to, b + 4 * e + DATA + at, done) end
      at = 0
    else
      at = at - FIRST
    end
    local i = nth(d, w[e + NEXT], floor(at / REST))
    at = at % REST
    while done < n do
      local take, c = min(REST - at, n - done), e0 + i * WORDS
      if into then copy(b + 4 * c + 4 + at, to + done, take) else copy(to + done, b + 4 * c + 4 + at, take) end
      done, at, i = done + take, 0, w[c + NEXT]
    end
  end

  local function gather(d, e, at, n)   -- a Lua string
    if at + n <= FIRST then return fstring(d.b + 4 * e + DATA + at, n) end
    if n > scratch_size then
      scratch_size = max(n, 2 * scratch_size)
      scratch = new("uint8_t[?]", scratch_size)
    end
    transfer(d, e, at, n, scratch, false)
    return fstring(scratch, n)
  end

  local function value_of(d, e)
    local vtype, klen = d.b[4 * e + VTYPE], d.h16[2 * e + KLEN]
    if vtype == STRING then return gather(d, e, klen, d.w[e + VLEN]) end
    transfer(d, e, klen, vtype == BOOLEAN and 1 or 8, num.b, false)
    if vtype == NUMBER then return num.d end
    if vtype == BOOLEAN then return num.b[0] ~= 0 end
    return tonumber(num.i)   -- INTEGER, as a Lua 5.3+ state stores it: a number here
  end

  local function same(d, e, key, h, n)   -- whether entry e holds `key`
    if d.w[e + HASH] ~= h or d.h16[2 * e + KLEN] ~= n then return false end
    local b, memcmp = d.b, C.luafcgid_memcmp
    if n <= FIRST then return memcmp(b + 4 * e + DATA, key, n) == 0 end
    if memcmp(b + 4 * e + DATA, key, FIRST) ~= 0 then return false end
    local w, e0, from, at = d.w, d.e0, cast(bytes_t, key), FIRST
    local i = w[e + NEXT]
    while at < n do   -- the rest of a long key, chunk by chunk
      local c = e0 + i * WORDS
      local take = min(REST, n - at)
      if memcmp(b + 4 * c + 4, from + at, take) ~= 0 then return false end
      at, i = at + take, w[c + NEXT]
    end
    return true
  end

  local function find_after(d, key, h, i)   -- along a bucket's chain from chunk i
    local w, e0, n = d.w, d.e0, #key
    while i ~= 0 do
      local e = e0 + i * WORDS
      if same(d, e, key, h, n) then return e end
      i = w[e + HNEXT]
    end
    return 0
  end

  -- The first word of key's entry, or 0. The bucket's first entry is looked at without a
  -- loop: a loop on the way of every operation made LuaJIT's traces abort ("inner loop in
  -- root trace") and a get cost 1.6 us instead of 70 ns.
  local function find(d, key, h)
    local i = d.w[d.buckets + band(h, d.mask)]
    if i == 0 then return 0 end
    local e = d.e0 + i * WORDS
    if same(d, e, key, h, #key) then return e end
    return find_after(d, key, h, d.w[e + HNEXT])
  end

  local function index_of(d, e)
    return (e - d.e0) / WORDS
  end

  local function unlink(d, e)
    local w, e0 = d.w, d.e0
    local prev, after = w[e + PREV], w[e + LNEXT]
    if prev ~= 0 then w[e0 + prev * WORDS + LNEXT] = after else w[HEAD] = after end
    if after ~= 0 then w[e0 + after * WORDS + PREV] = prev else w[TAIL] = prev end
  end

  local function push(d, e)
    local w, i = d.w, index_of(d, e)
    local head = w[HEAD]
    w[e + PREV], w[e + LNEXT] = 0, head
    if head ~= 0 then w[d.e0 + head * WORDS + PREV] = i else w[TAIL] = i end
    w[HEAD] = i
  end

  local function touch(d, e)
    local w = d.w
    if w[HEAD] ~= index_of(d, e) then
      w[DIRTY] = 1
      unlink(d, e)
      push(d, e)
      w[DIRTY] = 0
    end
  end

  local function remove(d, e)   -- the caller set dirty
    local w, e0, i = d.w, d.e0, index_of(d, e)
    local slot = d.buckets + band(w[e + HASH], d.mask)
    local after = w[e + HNEXT]
    if w[slot] == i then
      w[slot] = after
    else
      local j = w[slot]
      while w[e0 + j * WORDS + HNEXT] ~= i do j = w[e0 + j * WORDS + HNEXT] end
      w[e0 + j * WORDS + HNEXT] = after
    end
    unlink(d, e)
    free_chain(d, i)
    w[COUNT] = w[COUNT] - 1
  end

  local function tail_of(d)
    local tail = d.w[TAIL]
    return tail ~= 0 and d.e0 + tail * WORDS or 0
  end

  local function expire_tail(d, limit)
    local w = d.w
    for _ = 1, limit do
      local tail = tail_of(d)
      if tail == 0 or d.f64[tail / 2 + EXPIRES] == 0 or not expired(d, tail) then return end
      w[DIRTY] = 1
      remove(d, tail)
      w[DIRTY] = 0
    end
  end

  local function evict(d, needed, keep, valid)   -- the caller set dirty
    local forcible, t = false, now()
    while available(d) < needed do
      local tail = tail_of(d)
      if tail == 0 or tail == keep then break end
      if not expired(d, tail, t) then
        if not valid then break end
        forcible = true
      end
      remove(d, tail)
    end
    return forcible
  end

  local function reset(d)
    local w = d.w
    fill(d.b + 4 * d.buckets, 4 * (d.mask + 1))
    w[BUMP], w[FREE], w[NFREE], w[HEAD], w[TAIL], w[COUNT], w[DIRTY] = 0, 0, 0, 0, 0, 0, 0
  end

  -- The dictionary whose mutex this state holds: while an operation runs, and after one
  -- raised an error holding it (memory_limit, a __gc finalizer), until the call into the
  -- state ends and runtime.lua calls release_held. Not pcall around the operations: a
  -- pcall frame stops LuaJIT's side traces ("NYI: return to lower frame"), and a get of
  -- 1 KB cost 1.9 us instead of 0.19, every operation of the state 0.7 us after one such.
  local held = nil

  local function unlocked(d, ...)
    held = nil
    C.luafcgid_mutex_unlock(d.mutex)
    return ...
  end

  local function release_held(...)
    local d = held
    if d ~= nil then
      held = nil
      if d.w[DIRTY] ~= 0 then reset(d) end   -- it raised halfway through a change
      C.luafcgid_mutex_unlock(d.mutex)
    end
    return ...
  end

  -- op(d, ...) holding d's mutex. A call stopped at request_timeout cannot let go of it
  -- (every instruction fails after the stop): Python does (Dictionary.release). An
  -- operation interrupted while it changed the structure leaves `dirty`, and the next
  -- owner empties the dictionary rather than trust it.
  local function locked(op, d, a, b, c, e, f, g, k)
    if held ~= nil then
      error("shared dictionary " .. held.name .. ": used while one of its operations is " ..
            "unfinished (from a __gc finalizer, or after it raised an error)", 3)
    end
    local code = C.luafcgid_mutex_lock(d.mutex)
    if code ~= 0 then
      if code ~= EOWNERDEAD and code ~= EDEADLK then
        error("shared dictionary " .. d.name .. ": pthread_mutex_lock failed with error " ..
              code, 3)
      end
      if d.w[DIRTY] ~= 0 then reset(d) end
      if code == EOWNERDEAD then C.luafcgid_mutex_consistent(d.mutex) end
    end
    held = d
    return unlocked(d, op(d, a, b, c, e, f, g, k))
  end

  -- the operations, as dictionary.py's ---------------------------------------------------

  local function get(d, key, h, stale)
    local e = find(d, key, h)
    if e == 0 then return nil end
    local old = expired(d, e)
    if old and not stale then return nil end
    touch(d, e)
    local flags = d.w[e + FLAGS]
    if stale then return value_of(d, e), flags ~= 0 and flags or nil, old end
    if flags ~= 0 then return value_of(d, e), flags end
    return value_of(d, e)
  end

  local function store(d, mode, key, h, vtype, value, exptime, flags)
    local w = d.w
    expire_tail(d, 2)
    local e = find(d, key, h)
    local live = e ~= 0 and not expired(d, e)
    if live and (mode == "add" or mode == "safe_add") then return false, "exists", false end
    if not live and mode == "replace" then return false, "not found", false end
    if vtype == 0 then
      if e ~= 0 then
        w[DIRTY] = 1
        remove(d, e)
        w[DIRTY] = 0
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
    if need > w[NCHUNKS] then return false, "no memory", false end
    local have = e ~= 0 and chunks_for(klen + w[e + VLEN]) or 0
    w[DIRTY] = 1
    if e ~= 0 then   -- the most recent now, out of eviction's way
      unlink(d, e)
      push(d, e)
    end
    local forcible = evict(d, need - have, e, not SAFE[mode])
    if need - have > available(d) then
      w[DIRTY] = 0
      return false, "no memory", forcible
    end
    if e ~= 0 then
      resize(d, index_of(d, e), have, need)
    else
      local i = alloc(d)
      resize(d, i, 1, need)
      local slot = d.buckets + band(h, d.mask)
      e = d.e0 + i * WORDS
      w[e + HNEXT], w[slot] = w[slot], i
      push(d, e)
      w[COUNT] = w[COUNT] + 1
    end
    w[e + HASH], w[e + VLEN], w[e + FLAGS] = h, vlen, flags
    d.h16[2 * e + KLEN], d.b[4 * e + VTYPE] = klen, vtype
    d.f64[e / 2 + EXPIRES] = exptime > 0 and now() + exptime or 0
    transfer(d, e, 0, klen, cast(bytes_t, key), true)
    transfer(d, e, klen, vlen, from, true)
    w[DIRTY] = 0
    return true, nil, forcible
  end

  local function incr(d, key, h, n, init, init_ttl)
    expire_tail(d, 2)
    local e = find(d, key, h)
    if e == 0 or expired(d, e) then
      if init == nil then return nil, "not found", false end
      local ok, err, forcible = store(d, "set", key, h, NUMBER, init + n, init_ttl, 0)
      if ok then return init + n, nil, forcible end
      return nil, err, forcible
    end
    local vtype, klen = d.b[4 * e + VTYPE], d.h16[2 * e + KLEN]
    if vtype ~= NUMBER and vtype ~= INTEGER then return nil, "not a number", false end
    transfer(d, e, klen, 8, num.b, false)
    local value = (vtype == NUMBER and num.d or tonumber(num.i)) + n
    num.d = value
    d.b[4 * e + VTYPE] = NUMBER
    transfer(d, e, klen, 8, num.b, true)
    touch(d, e)
    return value, nil, false
  end

  local function ttl(d, key, h)
    local e = find(d, key, h)
    local t = now()
    if e == 0 or expired(d, e, t) then return nil, "not found" end
    local expires = d.f64[e / 2 + EXPIRES]
    return expires == 0 and 0 or expires - t
  end

  local function expire(d, key, h, exptime)
    local e = find(d, key, h)
    local t = now()
    if e == 0 or expired(d, e, t) then return nil, "not found" end
    d.f64[e / 2 + EXPIRES] = exptime > 0 and t + exptime or 0
    return true
  end

  local function flush_all(d)
    local w, e0 = d.w, d.e0
    local i = w[HEAD]
    while i ~= 0 do
      local e = e0 + i * WORDS
      d.f64[e / 2 + EXPIRES] = FLUSHED
      i = w[e + LNEXT]
    end
  end

  local function flush_expired(d, limit)
    local w, e0, done, t = d.w, d.e0, 0, now()
    local i = w[TAIL]
    while i ~= 0 and (limit == 0 or done < limit) do
      local e = e0 + i * WORDS
      i = w[e + PREV]
      if expired(d, e, t) then
        w[DIRTY] = 1
        remove(d, e)
        w[DIRTY] = 0
        done = done + 1
      end
    end
    return done
  end

  local function get_keys(d, limit)
    local w, e0, keys, n, t = d.w, d.e0, {}, 0, now()
    local i = w[HEAD]
    while i ~= 0 and (limit == 0 or n < limit) do
      local e = e0 + i * WORDS
      if not expired(d, e, t) then
        n = n + 1
        keys[n] = gather(d, e, 0, d.h16[2 * e + KLEN])
      end
      i = w[e + LNEXT]
    end
    return keys
  end

  local function free_space(d)
    return available(d) * WORDS * 4
  end

  return {
    -- The ffi module stays referenced as long as the state: its functions ffi.gc and
    -- ffi.metatype are what keep LuaJIT's own finalizer and metatype tables alive. With
    -- `ffi` off runtime.lua takes the module out of package.loaded, and once collected those
    -- tables were freed under the FFI: the serving process died of SIGSEGV (in the trace
    -- recorder, reading the metatype table) in about one run in four of 2,000 increments.
    ffi = ffi,
    release_held = release_held,
    attach = function(_, address)
      local base = cast("uint8_t *", address)
      local w = cast("uint32_t *", base)
      return {mutex = base, b = base, w = w, h16 = cast("uint16_t *", base),
              f64 = cast("double *", base), buckets = w[I.BUCKETS_AT] / 4,
              e0 = w[I.CHUNKS_AT] / 4 - WORDS, mask = w[I.NBUCKETS] - 1}
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

-- get, and get_stale, which also returns a value past its expiry
local function getting(stale)
  return function(self, key)
    local d = dict_of(self)
    local k, err = key_of(key)
    if not k then return nil, err end
    return backend.get(d, k, stale)
  end
end

Dict.get, Dict.get_stale = getting(false), getting(true)

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
-- and for runtime.lua, what to call at the end of every call into the state (nil through
-- Python, which holds no mutex between calls)
return shared, backend.release_held
