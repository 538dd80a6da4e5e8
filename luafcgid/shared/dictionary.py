"""One shared dictionary: its memory, and Python's implementation of its operations.

The memory is anonymous and MAP_SHARED: the process that creates it (the supervisor, or the
lone serving process) and every process it forks see the same pages, so the contents outlive
a reload and the replacement of a serving process, and end with the daemon. Its format is
layout.py's. LuaJIT states operate on it directly through the FFI (lua/shared.lua), the same
operations with the same meanings as here; Lua 5.1 to 5.5 states call these through a
callback, and the status page reads figures here.

The operations are ngx.shared.DICT's and return what Lua gets: see lua/shared.lua for the
argument checks and the README for the meanings. Each runs holding the dictionary's mutex;
`dirty` is set while it changes the structure (see layout.HEADER).
"""

import ctypes
import errno
import mmap
import struct
import time
import zlib

from . import layout, mutex
from .layout import BOOLEAN, CHUNK, FIRST, INTEGER, NUMBER, REST, STRING

_H = {name: at // 4 for name, at in layout.HEADER_AT.items()}   # header words
_NCHUNKS, _BUMP, _FREE, _NFREE, _HEAD, _TAIL, _COUNT, _DIRTY = (
    _H[name] for name in ("nchunks", "bump", "free", "nfree", "head", "tail", "count", "dirty"))
_E = layout.ENTRY_AT   # entry fields: byte offsets in the first chunk
_NEXT, _HNEXT, _PREV, _LNEXT, _HASH, _VLEN, _FLAGS = (
    _E[name] // 4 for name in ("next", "hnext", "prev", "lnext", "hash", "vlen", "flags"))
_DATA = layout.HEAD
_DOUBLE, _INT64 = struct.Struct("=d"), struct.Struct("=q")
_FLUSHED = -1.0   # an `expires` in the past whatever the clock: flush_all's mark
_SAFE = {"set": False, "safe_set": True, "add": False, "safe_add": True, "replace": False}


def _type_error(what):
    raise TypeError(f"shared dictionary: bad {what}")


def _key(key):
    if type(key) is not bytes or not 0 < len(key) <= layout.MAX_KEY:
        _type_error("key")
    return key


def _seconds(value, what):
    if type(value) not in (int, float) or value < 0:
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


class Dictionary:
    def __init__(self, name, capacity):
        """A new, empty dictionary of `capacity` bytes, shared with the processes forked
        from now on."""
        self.name = name
        self.capacity = capacity
        self._memory = mmap.mmap(-1, capacity)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._mutex = ctypes.c_void_p(self.address)
        view = memoryview(self._memory)[:capacity - capacity % 8]
        self._b, self._w, self._h, self._d = view, view.cast("I"), view.cast("H"), view.cast("d")
        mutex.initialize(self.address)
        nbuckets, buckets_at, chunks_at, nchunks = layout.geometry(capacity)
        for name, value in (("magic", layout.MAGIC), ("nchunks", nchunks),
                            ("nbuckets", nbuckets), ("buckets_at", buckets_at),
                            ("chunks_at", chunks_at)):
            self._w[_H[name]] = value
        self._mask = nbuckets - 1
        self._buckets = buckets_at // 4
        self._chunk0 = chunks_at - CHUNK   # chunk i starts at _chunk0 + i * CHUNK

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

    # -- the chunks ---------------------------------------------------------------------------

    def _available(self):
        w = self._w
        return w[_NFREE] + w[_NCHUNKS] - w[_BUMP]

    def _alloc(self):
        w = self._w
        i = w[_FREE]
        if i:
            w[_FREE] = w[(self._chunk0 + i * CHUNK) // 4 + _NEXT]
            w[_NFREE] -= 1
        else:
            i = w[_BUMP] = w[_BUMP] + 1
        w[(self._chunk0 + i * CHUNK) // 4 + _NEXT] = 0
        return i

    def _free_chain(self, i):
        w = self._w
        while i:
            word = (self._chunk0 + i * CHUNK) // 4 + _NEXT
            i, w[word], w[_FREE] = w[word], w[_FREE], i
            w[_NFREE] += 1

    def _nth(self, i, n):
        """The n-th chunk (from 0) of the chain starting at i."""
        w = self._w
        for _ in range(n):
            i = w[(self._chunk0 + i * CHUNK) // 4 + _NEXT]
        return i

    def _resize(self, i, have, need):
        w = self._w
        if need > have:
            last = self._nth(i, have - 1)
            for _ in range(need - have):
                j = self._alloc()
                w[(self._chunk0 + last * CHUNK) // 4 + _NEXT] = j
                last = j
        elif need < have:
            cut = (self._chunk0 + self._nth(i, need - 1) * CHUNK) // 4 + _NEXT
            rest, w[cut] = w[cut], 0
            self._free_chain(rest)

    def _segments(self, i, at, n):
        """(byte offset, length) of the pieces holding n data bytes from `at` of entry i."""
        w, chunk0 = self._w, self._chunk0
        if at < FIRST:
            take = min(FIRST - at, n)
            yield chunk0 + i * CHUNK + _DATA + at, take
            n -= take
            at = 0
        else:
            at -= FIRST
        i = self._nth(w[(chunk0 + i * CHUNK) // 4 + _NEXT], at // REST)
        at %= REST
        while n > 0:
            take = min(REST - at, n)
            yield chunk0 + i * CHUNK + 4 + at, take
            n -= take
            at = 0
            i = w[(chunk0 + i * CHUNK) // 4 + _NEXT]

    def _gather(self, i, at, n):
        b = self._b
        if at + n <= FIRST:
            start = self._chunk0 + i * CHUNK + _DATA + at
            return bytes(b[start:start + n])
        return b"".join([b[start:start + size] for start, size in self._segments(i, at, n)])

    def _scatter(self, i, at, data):
        b, done = self._b, 0
        for start, size in self._segments(i, at, len(data)):
            b[start:start + size] = data[done:done + size]
            done += size

    # -- entries ------------------------------------------------------------------------------

    def _find(self, key, hash_):
        w, b, h, n = self._w, self._b, self._h, len(key)
        i = w[self._buckets + (hash_ & self._mask)]
        while i:
            at = self._chunk0 + i * CHUNK
            if w[at // 4 + _HASH] == hash_ and h[(at + _E["klen"]) // 2] == n:
                if n <= FIRST:
                    if b[at + _DATA:at + _DATA + n] == key:
                        return i
                elif self._gather(i, 0, n) == key:
                    return i
            i = w[at // 4 + _HNEXT]
        return 0

    def _expires(self, i):
        return self._d[(self._chunk0 + i * CHUNK + _E["expires"]) // 8]

    def _expired(self, i, now=None):
        expires = self._expires(i)
        return expires != 0 and expires <= (time.monotonic() if now is None else now)

    def _value(self, i):
        at = self._chunk0 + i * CHUNK
        klen = self._h[(at + _E["klen"]) // 2]
        return decode(self._b[at + _E["vtype"]], self._gather(i, klen, self._w[at // 4 + _VLEN]))

    def _word(self, i, field):
        return (self._chunk0 + i * CHUNK) // 4 + field

    def _unlink(self, i):
        w = self._w
        prev, after = w[self._word(i, _PREV)], w[self._word(i, _LNEXT)]
        if prev:
            w[self._word(prev, _LNEXT)] = after
        else:
            w[_HEAD] = after
        if after:
            w[self._word(after, _PREV)] = prev
        else:
            w[_TAIL] = prev

    def _push(self, i):
        w = self._w
        head = w[_HEAD]
        w[self._word(i, _PREV)], w[self._word(i, _LNEXT)] = 0, head
        if head:
            w[self._word(head, _PREV)] = i
        else:
            w[_TAIL] = i
        w[_HEAD] = i

    def _touch(self, i):
        if self._w[_HEAD] != i:
            self._w[_DIRTY] = 1
            self._unlink(i)
            self._push(i)
            self._w[_DIRTY] = 0

    def _remove(self, i):
        """Unlink entry i and free its chunks (the caller set dirty)."""
        w = self._w
        slot = self._buckets + (w[self._word(i, _HASH)] & self._mask)
        after = w[self._word(i, _HNEXT)]
        if w[slot] == i:
            w[slot] = after
        else:
            j = w[slot]
            while w[self._word(j, _HNEXT)] != i:
                j = w[self._word(j, _HNEXT)]
            w[self._word(j, _HNEXT)] = after
        self._unlink(i)
        self._free_chain(i)
        w[_COUNT] -= 1

    def _expire_tail(self, limit):
        """Remove up to `limit` expired entries from the least recently used end, as ngx
        does before every write, so that expired entries do not stay for ever."""
        w = self._w
        for _ in range(limit):
            tail = w[_TAIL]
            if not tail or not self._expired(tail):
                return
            self._remove(tail)

    def _evict(self, needed, keep, valid):
        """Remove entries from the least recently used end, never `keep`, until `needed`
        chunks are available: only expired ones unless `valid`. Whether a valid one went
        (ngx's "forcible")."""
        w, forcible, now = self._w, False, time.monotonic()
        while self._available() < needed:
            tail = w[_TAIL]
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
        i = self._find(key, zlib.crc32(key))
        if not i:
            return None
        expired = self._expired(i)
        if expired and not stale:
            return None
        self._touch(i)
        flags = self._w[self._word(i, _FLAGS)]
        if stale:
            return self._value(i), flags or None, expired
        return (self._value(i), flags) if flags else self._value(i)

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
        hash_ = zlib.crc32(key)
        w[_DIRTY] = 1
        self._expire_tail(2)
        w[_DIRTY] = 0
        i = self._find(key, hash_)
        live = i and not self._expired(i)
        if live and mode in ("add", "safe_add"):
            return False, b"exists", False
        if not live and mode == "replace":
            return False, b"not found", False
        if vtype == 0:
            if i:
                w[_DIRTY] = 1
                self._remove(i)
                w[_DIRTY] = 0
            return True, None, False
        need = layout.chunks_for(len(key) + len(data))
        if need > w[_NCHUNKS]:
            return False, b"no memory", False
        have = layout.chunks_for(len(key) + w[self._word(i, _VLEN)]) if i else 0
        w[_DIRTY] = 1
        if i:   # the most recent now, out of eviction's way
            self._unlink(i)
            self._push(i)
        forcible = self._evict(need - have, i, not _SAFE[mode])
        if need - have > self._available():
            w[_DIRTY] = 0
            return False, b"no memory", forcible
        if i:
            self._resize(i, have, need)
        else:
            i = self._alloc()
            self._resize(i, 1, need)
            slot = self._buckets + (hash_ & self._mask)
            w[self._word(i, _HNEXT)], w[slot] = w[slot], i
            self._push(i)
            w[_COUNT] += 1
        at = self._chunk0 + i * CHUNK
        w[at // 4 + _HASH], w[at // 4 + _VLEN], w[at // 4 + _FLAGS] = hash_, len(data), flags
        self._h[(at + _E["klen"]) // 2] = len(key)
        self._b[at + _E["vtype"]] = vtype
        self._d[(at + _E["expires"]) // 8] = time.monotonic() + exptime if exptime else 0.0
        self._scatter(i, 0, key)
        self._scatter(i, len(key), data)
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
        w = self._w
        w[_DIRTY] = 1
        self._expire_tail(2)
        w[_DIRTY] = 0
        i = self._find(key, zlib.crc32(key))
        if not i or self._expired(i):
            if init is None:
                return None, b"not found", False
            value = _add(init, init_integer, n, n_integer)
            vtype = INTEGER if type(value) is int else NUMBER
            ok, error, forcible = self._store("set", key, vtype, encode(vtype, value), init_ttl, 0)
            return (value, None, forcible) if ok else (None, error, forcible)
        at = self._chunk0 + i * CHUNK
        vtype, klen = self._b[at + _E["vtype"]], self._h[(at + _E["klen"]) // 2]
        if vtype not in (NUMBER, INTEGER):
            return None, b"not a number", False
        value = _add(decode(vtype, self._gather(i, klen, 8)), vtype == INTEGER, n, n_integer)
        vtype = INTEGER if type(value) is int else NUMBER
        self._b[at + _E["vtype"]] = vtype
        self._scatter(i, klen, encode(vtype, value))
        self._touch(i)
        return value, None, False

    def ttl(self, key):
        """(seconds left, 0 for never) or (None, "not found")."""
        return self._run(self._ttl, _key(key))

    def _ttl(self, key):
        i = self._find(key, zlib.crc32(key))
        now = time.monotonic()
        if not i or self._expired(i, now):
            return None, b"not found"
        expires = self._expires(i)
        return (expires - now if expires else 0),

    def expire(self, key, exptime):
        """(True) or (None, "not found"): the key now expires in exptime seconds (0: never)."""
        return self._run(self._expire, _key(key), _seconds(exptime, "exptime"))

    def _expire(self, key, exptime):
        i = self._find(key, zlib.crc32(key))
        now = time.monotonic()
        if not i or self._expired(i, now):
            return None, b"not found"
        self._d[(self._chunk0 + i * CHUNK + _E["expires"]) // 8] = now + exptime if exptime else 0.0
        return True,

    def flush_all(self):
        """Every entry expires now; get_stale still finds them until they are reclaimed."""
        self._run(self._flush_all)

    def _flush_all(self):
        i = self._w[_HEAD]
        while i:
            self._d[(self._chunk0 + i * CHUNK + _E["expires"]) // 8] = _FLUSHED
            i = self._w[self._word(i, _LNEXT)]

    def flush_expired(self, limit=0):
        """Free up to `limit` expired entries (0: all); how many."""
        if type(limit) is not int or limit < 0:
            _type_error("max_count")
        return self._run(self._flush_expired, limit)

    def _flush_expired(self, limit):
        w, done, now = self._w, 0, time.monotonic()
        i = w[_TAIL]
        while i and (limit == 0 or done < limit):
            prev = w[self._word(i, _PREV)]
            if self._expired(i, now):
                w[_DIRTY] = 1
                self._remove(i)
                w[_DIRTY] = 0
                done += 1
            i = prev
        return done

    def get_keys(self, limit=1024):
        """The keys not expired, the most recently used first, at most `limit` (0: all), as
        one string: each key after its length in two bytes, big-endian (a Lua table cannot
        cross from Python; lua/shared.lua splits it)."""
        if type(limit) is not int or limit < 0:
            _type_error("max_count")
        return self._run(self._get_keys, limit)

    def _get_keys(self, limit):
        w, h, keys, now = self._w, self._h, [], time.monotonic()
        i = w[_HEAD]
        while i and (limit == 0 or len(keys) < limit):
            if not self._expired(i, now):
                klen = h[(self._chunk0 + i * CHUNK + _E["klen"]) // 2]
                keys.append(klen.to_bytes(2, "big") + self._gather(i, 0, klen))
            i = w[self._word(i, _LNEXT)]
        return b"".join(keys)

    def free_space(self):
        """Bytes in free chunks."""
        return self._run(self._available) * CHUNK

    def stats(self):
        """(capacity, free bytes, keys stored, expired ones not yet reclaimed included)."""
        return self._run(lambda: (self.capacity, self._available() * CHUNK, self._w[_COUNT]))


def _add(a, a_integer, b, b_integer):
    """a + b as Lua 5.3 adds: two integers wrap around in 64 bits, anything else is a float."""
    if a_integer and b_integer and type(a) is int and type(b) is int:
        return (a + b + (1 << 63)) % (1 << 64) - (1 << 63)
    return float(a) + float(b)
