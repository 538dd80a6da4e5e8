"""Arming a hook on a Lua state that another thread is running: the one place that does it.

The Lua manual allows lua_sethook() from any thread ("this function can be called
asynchronously"; it only sets a few fields, and LuaJIT's only switches its dispatch table).
The watcher threads call it through ctypes, on the C API of the lupa module that runs every
state, for two purposes:

- stop(): the running Lua code fails at its next instruction. The hook is luaL_error itself,
  called as hook(L, ar): its format string is then the lua_Debug record, which begins with
  the event code (3, a count event), so it raises a string without conversions. No Python
  runs, so this needs no interpreter lock, and no script can reach or replace the hook. A
  hook fires only between instructions: inside one C function call it waits for the call to
  return, and Lua runs no hooks inside __gc finalizers.
- call_once(): a Python function runs on the Lua thread at its next instruction (the
  slowlog's traceback), and the hook that was there is put back.

Hooks are per coroutine in PUC Lua and per state in LuaJIT (which runs none inside compiled
traces: with a request_timeout its JIT compiler is off).
"""

import ctypes
import re
import threading

from . import vm

LUA_MASKCOUNT = 1 << 3
HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


def thread_address(text):
    """The lua_State address in tostring() of a Lua thread ("thread: 0x55d0c8a0"), or None."""
    match = re.fullmatch(rb"thread: (?:0x)?([0-9a-fA-F]+)", text or b"")
    return int(match.group(1), 16) if match else None


def _bind(function, restype, *argtypes):
    function.restype, function.argtypes = restype, list(argtypes)
    return function


class Hooks:
    """The hook functions of the loaded Lua VM. One per process (see for_vm)."""

    def __init__(self, module):
        lib = ctypes.CDLL(module.__file__)
        p, i = ctypes.c_void_p, ctypes.c_int
        self._sethook = _bind(lib.lua_sethook, None, p, p, i, i)
        self._gethook = _bind(lib.lua_gethook, p, p)
        self._gethookmask = _bind(lib.lua_gethookmask, i, p)
        self._gethookcount = _bind(lib.lua_gethookcount, i, p)
        # Lua 5.1 has no luaL_traceback
        self._traceback = (_bind(lib.luaL_traceback, None, p, p, ctypes.c_char_p, i)
                           if hasattr(lib, "luaL_traceback") else None)
        self._tolstring = _bind(lib.lua_tolstring, p, p, i, ctypes.POINTER(ctypes.c_size_t))
        self._settop = _bind(lib.lua_settop, None, p, i)
        self._raise = ctypes.cast(lib.luaL_error, p).value
        self._dispatch = HOOK(self._fire)   # kept referenced: Lua holds only its address
        self._dispatch_address = ctypes.cast(self._dispatch, p).value
        self._lock = threading.Lock()
        self._armed = set()    # lua_State addresses that carry one of our hooks
        self._pending = {}     # lua_State address -> (callback, the hook it replaced)

    def stop(self, *threads):
        """Make the Lua code running in `threads` fail at its next instruction. A pending
        call_once() on them is cancelled (its callback gets None)."""
        for L in threads:
            self._cancel(L)
            with self._lock:
                self._armed.add(L)
            self._sethook(L, self._raise, LUA_MASKCOUNT, 1)

    def call_once(self, L, callback, ident):
        """Run callback(running) at the next Lua instruction of L (or, in LuaJIT, of the
        coroutine L's OS thread `ident` is running), then put back the hook that was there;
        callback(None) if that cannot happen (see release)."""
        with self._lock:
            if L in self._pending:
                return
            old = (self._gethook(L), self._gethookmask(L), self._gethookcount(L))
            self._pending[L] = (callback, old, ident)
            self._armed.add(L)
        self._sethook(L, self._dispatch_address, LUA_MASKCOUNT, 1)

    def release(self, *threads):
        """A call into `threads` ended: take our hooks off them (a pending callback gets
        None). Cheap when none is there, which is almost always."""
        for L in threads:
            with self._lock:
                if L not in self._armed:
                    continue
                self._armed.discard(L)
            self._cancel(L)
            self._sethook(L, None, 0, 0)

    def _cancel(self, L):
        with self._lock:
            pending = self._pending.pop(L, None)
        if pending is not None:
            pending[0](None)

    def _fire(self, L, _ar):
        """The call_once hook, on the Lua thread, inside the running code. In LuaJIT it may
        fire in another coroutine than the one it was armed on: the entry is then the one
        armed from this OS thread."""
        with self._lock:
            armed = L if L in self._pending else next(
                (key for key, entry in self._pending.items() if entry[2] == threading.get_ident()),
                None)
            if armed is None:   # cancelled meanwhile: only take this hook off
                if self._gethook(L) == self._dispatch_address:
                    self._sethook(L, None, 0, 0)
                return
            callback, old, _ = self._pending.pop(armed)
            self._armed.discard(armed)
        self._sethook(L, *old)
        callback(L)

    def traceback(self, L):
        """The Lua traceback of L's running code; only from a call_once callback."""
        if self._traceback is None:
            return "(no Lua traceback: Lua 5.1 has no luaL_traceback)"
        self._traceback(L, L, None, 0)
        size = ctypes.c_size_t()
        text = ctypes.string_at(self._tolstring(L, -1, ctypes.byref(size)), size.value)
        self._settop(L, -2)   # lua_pop(L, 1)
        return text.decode(errors="surrogateescape")


_hooks = {}
_hooks_lock = threading.Lock()


def for_vm(choice):
    """The Hooks of the lupa module running `choice` (loaded once per process by vm.load)."""
    with _hooks_lock:
        if choice not in _hooks:
            _hooks[choice] = Hooks(vm.load(choice))
        return _hooks[choice]
