"""One shared dictionary: its memory, and Python's implementation of its operations.

The memory is anonymous and MAP_SHARED: the process that creates it (the supervisor, or the
lone serving process) and every process it forks see the same pages, so the contents outlive
a reload and the replacement of a serving process, and end with the daemon. Its format is
layout.py's. LuaJIT states operate on it directly through the FFI (lua/shared.lua), the same
operations with the same meanings as here; Lua 5.1 to 5.5 states call these through a
callback, and the status page reads figures here.

The operations are ngx.shared.DICT's and return what Lua gets: see lua/shared.lua for the
argument checks and the README for the meanings. Each runs holding the dictionary's mutex;
`dirty` is set while it changes the structure (see layout.HEADER). The memory is read as
words, half-words, bytes and doubles through four views of it (layout.INDEX).
"""

import ctypes
import errno
import mmap
import struct
import time
import zlib

from . import layout, mutex
from .layout import BOOLEAN, CHUNK, FIRST, INDEX, INTEGER, NUMBER, REST, STRING

# field positions (layout.INDEX); e below is an entry's first word
_NCHUNKS, _BUMP, _FREE, _NFREE, _HEAD, _TAIL, _COUNT, _DIRTY = (
    INDEX[name] for name in ("NCHUNKS", "BUMP", "FREE", "NFREE", "HEAD", "TAIL", "COUNT", "DIRTY"))
_NEXT, _HNEXT, _PREV, _LNEXT, _HASH, _VLEN, _FLAGS, _KLEN, _VTYPE, _EXPIRES, _DATA, _WORDS = (
    INDEX[name] for name in ("NEXT", "HNEXT", "PREV", "LNEXT", "HASH", "VLEN", "FLAGS", "KLEN",
                             "VTYPE", "EXPIRES", "DATA", "WORDS"))
_DOUBLE, _INT64 = struct.Struct("=d"), struct.Struct("=q")
_FLUSHED = -1.0   # an `expires` in the past whatever the clock: flush_all's mark
_SAFE = {"set": False, "safe_set": True, "add": False, "safe_add": True, "replace": False}
_monotonic, _crc32 = time.monotonic, zlib.crc32


def _type_error(what):
    raise TypeError(f"shared dictionary: bad {what}")


def _key(key):
    if type(key) is not bytes or not 0 < len(key) <= layout.MAX_KEY:
        _type_error("key")
    return key


def _seconds(value, what):
    if type(value) not in (int, float) or not value >= 0:
        _type_error(what)
    return value


def encode(vtype, value):
    """A Lua value of type `vtype` (layout's codes, as lua/shared.lua names them) to the
    bytes stored after the key."""
    if vtype == STRING and type(value) is bytes:
        return value
    if vtype == NUMBER and type(value) in (int, float):
        return _DOUBLE.pack(value)
    if vtype == INTEGER and type(value) is int and -1 << 63 <= value < 1 << 63:
        return _INT64.pack(value)
    if vtype == BOOLEAN and type(value) is bool:
        return b"\1" if value else b"\0"
    _type_error("value")


def decode(vtype, data):
    if vtype == STRING:
        return data
    if vtype == NUMBER:
        return _DOUBLE.unpack(data)[0]
    if vtype == INTEGER:
        return _INT64.unpack(data)[0]
    return data != b"\0"


def _add(a, a_integer, b, b_integer):
    """a + b as Lua 5.3 adds: two integers wrap around in 64 bits, anything else is a float."""
    if a_integer and b_integer and type(a) is int and type(b) is int:
        return (a + b + (1 << 63)) % (1 << 64) - (1 << 63)
    return float(a) + float(b)


class Dictionary:
    def __init__(self, name, capacity):
        """A new, empty dictionary of `capacity` bytes, shared with the processes forked
        from now on."""
        self.name = name
        self.capacity = capacity
        try:
            self._memory = mmap.mmap(-1, capacity)
        except OSError as exc:
            raise OSError(exc.errno, f"shared: {name}: cannot map {capacity} bytes: "
                                     f"{exc.strerror}") from None
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._mutex = ctypes.c_void_p(self.address)
        view = memoryview(self._memory)[:capacity - capacity % 8]
        self._b, self._w, self._h, self._d = view, view.cast("I"), view.cast("H"), view.cast("d")
        mutex.initialize(self.address)
        nbuckets, buckets_at, chunks_at, nchunks = layout.geometry(capacity)
        for field, value in (("MAGIC", layout.MAGIC), ("NCHUNKS", nchunks),
                             ("NBUCKETS", nbuckets), ("BUCKETS_AT", buckets_at),
                             ("CHUNKS_AT", chunks_at)):
            self._w[INDEX[field]] = value
        self._mask = nbuckets - 1
        self._buckets = buckets_at // 4
        self._e0 = chunks_at // 4 - _WORDS   # chunk i's first word: _e0 + i * _WORDS

    def close(self):
        """Unmap the memory, in a serving process of another pool: a script there with
        the FFI (or a C module) could otherwise read and write it. Its four views are let go
        of first, as mmap refuses to close while buffers of it are exported (BufferError);
        nothing else holds one (the FFI is given the address, not a buffer)."""
        for view in (self._w, self._h, self._d, self._b):
            view.release()
        self._memory.close()

    # -- locking ----------------------------------------------------------------------------

    def _run(self, operation, *args):
        code = mutex.lock(self._mutex)
        try:
            if code:   # EOWNERDEAD or EDEADLK: an operation was interrupted
                if self._w[_DIRTY]:
                    self._reset()
                if code == errno.EOWNERDEAD:
                    mutex.consistent(self._mutex)
            return operation(*args)
        finally:
            if self._w[_DIRTY]:   # this operation failed halfway
                self._reset()
            mutex.unlock(self._mutex)

    def release(self):
        """Called on a thread whose call into a LuaJIT state was stopped (request_timeout):
        if it was stopped inside an operation, that operation's lock is let go of (and the
        dictionary emptied if it was changing the structure). Otherwise this waits for the
        lock like any operation."""
        self._run(lambda: None)

    def _reset(self):
        at = self._buckets * 4
        self._b[at:at + 4 * (self._mask + 1)] = bytes(4 * (self._mask + 1))
        for word in (_BUMP, _FREE, _NFREE, _HEAD, _TAIL, _COUNT, _DIRTY):
            self._w[word] = 0

    # -- chunks -------------------------------------------------------------------------------

    def _available(self):
        w = self._w
        return w[_NFREE] + w[_NCHUNKS] - w[_BUMP]

    def _alloc(self):
        w = self._w
        i = w[_FREE]
        if i:
            w[_FREE] = w[self._e0 + i * _WORDS + _NEXT]
            w[_NFREE] -= 1
        else:
            i = w[_BUMP] = w[_BUMP] + 1
        w[self._e0 + i * _WORDS + _NEXT] = 0
        return i

    def _free_chain(self, i):
        w, e0 = self._w, self._e0
        while i:
            word = e0 + i * _WORDS + _NEXT
            i, w[word], w[_FREE] = w[word], w[_FREE], i
            w[_NFREE] += 1

    def _nth(self, i, n):
        """The n-th chunk (from 0) of the chain starting at i."""
        w, e0 = self._w, self._e0
        for _ in range(n):
            i = w[e0 + i * _WORDS + _NEXT]
        return i

    def _resize(self, i, have, need):
        w, e0 = self._w, self._e0
        if need > have:
            last = self._nth(i, have - 1)
            for _ in range(need - have):
                w[e0 + last * _WORDS + _NEXT] = last = self._alloc()
        elif need < have:
            cut = e0 + self._nth(i, need - 1) * _WORDS + _NEXT
            rest, w[cut] = w[cut], 0
            self._free_chain(rest)

    def _segments(self, i, at, n):
        """(byte offset, length) of the pieces holding n data bytes from `at` of entry i."""
        w, e0 = self._w, self._e0
        e = e0 + i * _WORDS
        if at < FIRST:
            take = min(FIRST - at, n)
            yield 4 * e + _DATA + at, take
            n -= take
            at = 0
        else:
            at -= FIRST
        i = self._nth(w[e + _NEXT], at // REST)
        at %= REST
        while n > 0:
            take = min(REST - at, n)
            e = e0 + i * _WORDS
            yield 4 * e + 4 + at, take
            n -= take
            at = 0
            i = w[e + _NEXT]

    def _gather(self, e, at, n):
        """n data bytes from `at` of the entry whose first word is e."""
        if at + n <= FIRST:
            start = 4 * e + _DATA + at
            return bytes(self._b[start:start + n])
        b, i = self._b, (e - self._e0) // _WORDS
        return b"".join([b[start:start + size] for start, size in self._segments(i, at, n)])

    def _scatter(self, e, at, data):
        b, done = self._b, 0
        for start, size in self._segments((e - self._e0) // _WORDS, at, len(data)):
            b[start:start + size] = data[done:done + size]
            done += size

    # -- entries ------------------------------------------------------------------------------

    def _find(self, key, hash_):
        """The first word of the entry of `key`, or 0."""
        w, b, h, e0, n = self._w, self._b, self._h, self._e0, len(key)
        i = w[self._buckets + (hash_ & self._mask)]
        while i:
            e = e0 + i * _WORDS
            if w[e + _HASH] == hash_ and h[2 * e + _KLEN] == n:
                if n <= FIRST:
                    if b[4 * e + _DATA:4 * e + _DATA + n] == key:
                        return e
                elif self._gather(e, 0, n) == key:
                    return e
            i = w[e + _HNEXT]
        return 0

    def _expired(self, e, now=None):
        expires = self._d[e // 2 + _EXPIRES]
        return expires != 0 and expires <= (_monotonic() if now is None else now)

    def _value(self, e):
        return decode(self._b[4 * e + _VTYPE],
                      self._gather(e, self._h[2 * e + _KLEN], self._w[e + _VLEN]))

    def _index(self, e):
        return (e - self._e0) // _WORDS

    def _unlink(self, e):
        w, e0 = self._w, self._e0
        prev, after = w[e + _PREV], w[e + _LNEXT]
        if prev:
            w[e0 + prev * _WORDS + _LNEXT] = after
        else:
            w[_HEAD] = after
        if after:
            w[e0 + after * _WORDS + _PREV] = prev
        else:
            w[_TAIL] = prev

    def _push(self, e):
        w, i = self._w, self._index(e)
        head = w[_HEAD]
        w[e + _PREV], w[e + _LNEXT] = 0, head
        if head:
            w[self._e0 + head * _WORDS + _PREV] = i
        else:
            w[_TAIL] = i
        w[_HEAD] = i

    def _touch(self, e):
        w = self._w
        if w[_HEAD] != self._index(e):
            w[_DIRTY] = 1
            self._unlink(e)
            self._push(e)
            w[_DIRTY] = 0

    def _remove(self, e):
        """Unlink an entry and free its chunks (the caller set dirty)."""
        w, e0, i = self._w, self._e0, self._index(e)
        slot = self._buckets + (w[e + _HASH] & self._mask)
        after = w[e + _HNEXT]
        if w[slot] == i:
            w[slot] = after
        else:
            j = w[slot]
            while w[e0 + j * _WORDS + _HNEXT] != i:
                j = w[e0 + j * _WORDS + _HNEXT]
            w[e0 + j * _WORDS + _HNEXT] = after
        self._unlink(e)
        self._free_chain(i)
        w[_COUNT] -= 1

    def _tail(self):
        """The first word of the least recently used entry, or 0."""
        tail = self._w[_TAIL]
        return self._e0 + tail * _WORDS if tail else 0

    def _expire_tail(self, limit):
        """Remove up to `limit` expired entries from the least recently used end, as ngx
        does before every write, so that expired entries do not stay for ever."""
        w = self._w
        for _ in range(limit):
            tail = self._tail()
            if not tail or not self._d[tail // 2 + _EXPIRES] or not self._expired(tail):
                return
            w[_DIRTY] = 1
            self._remove(tail)
            w[_DIRTY] = 0

    def _evict(self, needed, keep, valid):
        """Remove entries from the least recently used end, never `keep`, until `needed`
        chunks are available: only expired ones unless `valid`. Whether a valid one went
        (ngx's "forcible"). The caller set dirty."""
        forcible, now = False, _monotonic()
        while self._available() < needed:
            tail = self._tail()
            if not tail or tail == keep:
                break
            if not self._expired(tail, now):
                if not valid:
                    break
                forcible = True
            self._remove(tail)
        return forcible

    # -- the operations (Lua's arguments and results) --------------------------------------

    def get(self, key, stale=False):
        """The value (value, flags when they are not 0; (value, flags or None, stale) for
        get_stale); None when missing or expired (unless stale)."""
        return self._run(self._get, _key(key), stale)

    def _get(self, key, stale):
        e = self._find(key, _crc32(key))
        if not e:
            return None
        expired = self._expired(e)
        if expired and not stale:
            return None
        self._touch(e)
        flags = self._w[e + _FLAGS]
        if stale:
            return self._value(e), flags or None, expired
        return (self._value(e), flags) if flags else self._value(e)

    def store(self, mode, key, vtype, value, exptime, flags):
        """set, safe_set, add, safe_add, replace (`mode`) or, with vtype 0, delete:
        (ok, error or None, forcible)."""
        if mode not in _SAFE:
            _type_error("mode")
        data = b"" if vtype == 0 and value is None else encode(vtype, value)
        if type(flags) is not int or not 0 <= flags < 1 << 32:
            _type_error("flags")
        return self._run(self._store, mode, _key(key), vtype, data, _seconds(exptime, "exptime"),
                         flags)

    def _store(self, mode, key, vtype, data, exptime, flags):
        w = self._w
        hash_ = _crc32(key)
        self._expire_tail(2)
        e = self._find(key, hash_)
        live = e and not self._expired(e)
        if live and mode in ("add", "safe_add"):
            return False, b"exists", False
        if not live and mode == "replace":
            return False, b"not found", False
        if vtype == 0:
            if e:
                w[_DIRTY] = 1
                self._remove(e)
                w[_DIRTY] = 0
            return True, None, False
        klen, vlen = len(key), len(data)
        need = layout.chunks_for(klen + vlen)
        if need > w[_NCHUNKS]:
            return False, b"no memory", False
        have = layout.chunks_for(klen + w[e + _VLEN]) if e else 0
        w[_DIRTY] = 1
        if e:   # the most recent now, out of eviction's way
            self._unlink(e)
            self._push(e)
        forcible = self._evict(need - have, e, not _SAFE[mode])
        if need - have > self._available():
            w[_DIRTY] = 0
            return False, b"no memory", forcible
        if e:
            self._resize(self._index(e), have, need)
        else:
            i = self._alloc()
            self._resize(i, 1, need)
            e, slot = self._e0 + i * _WORDS, self._buckets + (hash_ & self._mask)
            w[e + _HNEXT], w[slot] = w[slot], i
            self._push(e)
            w[_COUNT] += 1
        w[e + _HASH], w[e + _VLEN], w[e + _FLAGS] = hash_, vlen, flags
        self._h[2 * e + _KLEN] = klen
        self._b[4 * e + _VTYPE] = vtype
        self._d[e // 2 + _EXPIRES] = _monotonic() + exptime if exptime else 0.0
        if klen + vlen <= FIRST:
            self._b[4 * e + _DATA:4 * e + _DATA + klen + vlen] = key + data
        else:
            self._scatter(e, 0, key)
            self._scatter(e, klen, data)
        w[_DIRTY] = 0
        return True, None, forcible

    def incr(self, key, n, n_integer, init, init_integer, init_ttl):
        """(the new value, None, forcible) or (None, error, False). The *_integer flags say
        that Lua (5.3 and later) holds the number as an integer: integers add as Lua's do."""
        if type(n) not in (int, float) or (init is not None and type(init) not in (int, float)):
            _type_error("number")
        return self._run(self._incr, _key(key), n, n_integer is True, init,
                         init_integer is True, _seconds(init_ttl, "init_ttl"))

    def _incr(self, key, n, n_integer, init, init_integer, init_ttl):
        self._expire_tail(2)
        e = self._find(key, _crc32(key))
        if not e or self._expired(e):
            if init is None:
                return None, b"not found", False
            value = _add(init, init_integer, n, n_integer)
            vtype = INTEGER if type(value) is int else NUMBER
            ok, error, forcible = self._store("set", key, vtype, encode(vtype, value), init_ttl, 0)
            return (value, None, forcible) if ok else (None, error, forcible)
        vtype, klen = self._b[4 * e + _VTYPE], self._h[2 * e + _KLEN]
        if vtype != NUMBER and vtype != INTEGER:
            return None, b"not a number", False
        value = _add(decode(vtype, self._gather(e, klen, 8)), vtype == INTEGER, n, n_integer)
        vtype = INTEGER if type(value) is int else NUMBER
        self._b[4 * e + _VTYPE] = vtype
        if klen + 8 <= FIRST:
            at = 4 * e + _DATA + klen
            self._b[at:at + 8] = encode(vtype, value)
        else:
            self._scatter(e, klen, encode(vtype, value))
        self._touch(e)
        return value, None, False

    def ttl(self, key):
        """(seconds left, 0 for never) or (None, "not found")."""
        return self._run(self._ttl, _key(key))

    def _ttl(self, key):
        e = self._find(key, _crc32(key))
        now = _monotonic()
        if not e or self._expired(e, now):
            return None, b"not found"
        expires = self._d[e // 2 + _EXPIRES]
        return expires - now if expires else 0

    def expire(self, key, exptime):
        """True, or (None, "not found"): the key now expires in exptime seconds (0: never)."""
        return self._run(self._expire, _key(key), _seconds(exptime, "exptime"))

    def _expire(self, key, exptime):
        e = self._find(key, _crc32(key))
        now = _monotonic()
        if not e or self._expired(e, now):
            return None, b"not found"
        self._d[e // 2 + _EXPIRES] = now + exptime if exptime else 0.0
        return True

    def flush_all(self):
        """Every entry expires now; get_stale still finds them until they are reclaimed."""
        self._run(self._flush_all)

    def _flush_all(self):
        w, e0, i = self._w, self._e0, self._w[_HEAD]
        while i:
            e = e0 + i * _WORDS
            self._d[e // 2 + _EXPIRES] = _FLUSHED
            i = w[e + _LNEXT]

    def flush_expired(self, limit=0):
        """Free up to `limit` expired entries (0: all); how many."""
        if type(limit) is not int or limit < 0:
            _type_error("max_count")
        return self._run(self._flush_expired, limit)

    def _flush_expired(self, limit):
        w, e0, done, now = self._w, self._e0, 0, _monotonic()
        i = w[_TAIL]
        while i and (limit == 0 or done < limit):
            e = e0 + i * _WORDS
            i = w[e + _PREV]
            if self._expired(e, now):
                w[_DIRTY] = 1
                self._remove(e)
                w[_DIRTY] = 0
                done += 1
        return done

    def get_keys(self, limit=1024):
        """The keys not expired, the most recently used first, at most `limit` (0: all), as
        one string: each key after its length in two bytes, big-endian (a Lua table cannot
        cross from Python; lua/shared.lua splits it)."""
        if type(limit) is not int or limit < 0:
            _type_error("max_count")
        return self._run(self._get_keys, limit)

    def _get_keys(self, limit):
        w, e0, keys, now = self._w, self._e0, [], _monotonic()
        i = w[_HEAD]
        while i and (limit == 0 or len(keys) < limit):
            e = e0 + i * _WORDS
            if not self._expired(e, now):
                klen = self._h[2 * e + _KLEN]
                keys.append(klen.to_bytes(2, "big") + self._gather(e, 0, klen))
            i = w[e + _LNEXT]
        return b"".join(keys)

    def free_space(self):
        """Bytes in free chunks."""
        return self._run(self._available) * CHUNK

    def stats(self):
        """(capacity, free bytes, keys stored, expired ones not yet reclaimed included)."""
        return self._run(lambda: (self.capacity, self._available() * CHUNK, self._w[_COUNT]))
