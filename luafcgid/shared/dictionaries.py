"""The dictionaries of setting `shared`: made once, by the process that outlives the serving
ones (the supervisor with processes > 1, else the serving process), and handed to every Lua
state as lua/shared.lua needs them."""

import ctypes.util
import errno
import functools
import time

from . import layout
from .dictionary import Dictionary

# What a Lua state's callback may ask (lua/shared.lua names them; a code is a position here).
OPERATIONS = ("get", "get_stale", "set", "safe_set", "add", "safe_add", "replace", "incr", "ttl",
              "expire", "flush_all", "flush_expired", "get_keys", "free_space")


def _operation(dictionary, name):
    if name == "get_stale":
        return functools.partial(dictionary.get, stale=True)
    if name in ("set", "safe_set", "add", "safe_add", "replace"):
        return functools.partial(dictionary.store, name)
    return getattr(dictionary, name)


class Dictionaries:
    def __init__(self, capacities):
        """One Dictionary per name -> capacity in bytes (the setting's value)."""
        self.all = [Dictionary(name, capacity) for name, capacity in sorted(capacities.items())]
        # the zlib whose crc32 Python's zlib module calls, for LuaJIT to hash keys alike
        self._zlib = ctypes.util.find_library("z") if self.all else None
        self._operations = [tuple(_operation(d, name) for name in OPERATIONS) for d in self.all]

    def for_lua(self, ffi):
        """What runtime.lua hands lua/shared.lua, or None when there is no dictionary. With
        `ffi` (and a shared zlib to load) the state works on the memory itself, through
        LuaJIT's FFI."""
        if not self.all:
            return None
        return {"ffi": ffi and self._zlib is not None, "zlib": self._zlib,
                "names": [d.name for d in self.all],
                "addresses": [d.address for d in self.all],
                "capacities": [d.capacity for d in self.all], "index": layout.INDEX,
                "ops": list(OPERATIONS), "STRING": layout.STRING, "NUMBER": layout.NUMBER,
                "BOOLEAN": layout.BOOLEAN, "INTEGER": layout.INTEGER,
                "MAX_KEY": layout.MAX_KEY, "FIRST": layout.FIRST, "REST": layout.REST,
                "EOWNERDEAD": errno.EOWNERDEAD,
                "EDEADLK": errno.EDEADLK, "CLOCK_MONOTONIC": time.CLOCK_MONOTONIC}

    def call(self, op, index, *args):
        """The Lua callback: operation `op` (a code: OPERATIONS[op - 1]) on dictionary
        `index` (from 1). Reachable by scripts, so it takes plain values only."""
        if (type(op) is not int or type(index) is not int or not 0 < op <= len(OPERATIONS)
                or not 0 < index <= len(self.all)):
            raise TypeError("shared dictionary: bad call")
        return self._operations[index - 1][op - 1](*args)

    def release(self):
        """After a call into a state was stopped at its deadline, on its thread: let go of
        the mutex it may have held (Dictionary.release)."""
        for dictionary in self.all:
            dictionary.release()

    def close(self):
        """In a serving process of another pool: unmap every dictionary (Dictionary.close)."""
        for dictionary in self.all:
            dictionary.close()

    def stats(self):
        """For the status page: each dictionary's name, capacity, free bytes and keys."""
        return [dict(zip(("name", "capacity", "free_space", "keys"), (d.name, *d.stats())))
                for d in self.all]
