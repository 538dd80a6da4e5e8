"""The slowlog: a request running longer than slowlog_timeout is written once, with the Lua
traceback of where it is (php-fpm's request_slowlog_timeout).

A watcher thread looks at the workers' start times. For a slow request it arms a one-shot
count hook on the Lua state running it, with lua_sethook() called from the watcher thread:
the Lua manual allows that from any thread (it is meant to be called even from a signal
handler). The hook then runs on the worker itself, at the state's next Lua instruction,
writes the traceback and puts back the hook that was there before.

Limits, honestly: the state's lua_State address comes from coroutine.running(), which Lua
5.1 and LuaJIT do not return for the main thread, so there the entry has no traceback; and
LuaJIT does not run hooks inside compiled traces anyway. A request blocked inside a C
function gets its traceback when the C function returns to Lua.
"""

import ctypes
import logging
import re
import threading
import time

from . import vm
from .logs import slow as slowlog
from .metrics import current

log = logging.getLogger("luafcgid")

LUA_MASKCOUNT = 1 << 3
HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


def main_thread(runtime):
    """The address of a fresh runtime's main lua_State, or None (Lua 5.1, LuaJIT). Called
    before any script runs, so no script can have replaced coroutine or tostring."""
    text = runtime.eval("tostring(coroutine.running())")
    match = re.fullmatch(rb"thread: (?:0x)?([0-9a-fA-F]+)", text or b"")
    return int(match.group(1), 16) if match else None


class _LuaAPI:
    """The few C functions of the loaded Lua VM the hook needs, through ctypes."""

    def __init__(self, module):
        lib = ctypes.CDLL(module.__file__)
        p, i = ctypes.c_void_p, ctypes.c_int
        self.sethook = self._fn(lib.lua_sethook, None, p, p, i, i)
        self.gethook = self._fn(lib.lua_gethook, p, p)
        self.gethookmask = self._fn(lib.lua_gethookmask, i, p)
        self.gethookcount = self._fn(lib.lua_gethookcount, i, p)
        self.traceback = self._fn(lib.luaL_traceback, None, p, p, ctypes.c_char_p, i)
        self.tolstring = self._fn(lib.lua_tolstring, p, p, i, ctypes.POINTER(ctypes.c_size_t))
        self.settop = self._fn(lib.lua_settop, None, p, i)

    @staticmethod
    def _fn(function, restype, *argtypes):
        function.restype, function.argtypes = restype, list(argtypes)
        return function

    def traceback_of(self, L):
        self.traceback(L, L, None, 0)
        size = ctypes.c_size_t()
        text = ctypes.string_at(self.tolstring(L, -1, ctypes.byref(size)), size.value)
        self.settop(L, -2)   # lua_pop(L, 1)
        return text.decode(errors="replace")


def _describe(worker, seconds):
    params = worker.params or {}
    return "slow request: %s %s ran %.3f s (script %s)" % (
        params.get(b"REQUEST_METHOD", b"-").decode(errors="replace"),
        params.get(b"REQUEST_URI", b"-").decode(errors="replace"), seconds,
        params.get(b"SCRIPT_FILENAME", b"-").decode(errors="replace"))


class SlowWatcher:
    def __init__(self, server):
        self.server = server
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slowlog", daemon=True)
        self._reported = {}   # worker number -> its `requests` count when reported
        self._pending = {}    # lua_State address -> (worker, requests count, message, old hook)
        self._hook = HOOK(self._fire)   # kept referenced: Lua holds only its address
        self._lua = None

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while True:
            timeout = self.server.config.slowlog_timeout
            if self._stop.wait(0.5 if timeout is None else min(0.5, max(0.01, timeout / 4))):
                return
            if timeout is None or not slowlog.handlers:
                continue
            now = time.monotonic()
            for worker in self.server.metrics.workers:
                started, count = worker.started, worker.requests
                if (started and now - started > timeout
                        and self._reported.get(worker.number) != count):
                    self._reported[worker.number] = count
                    try:
                        self._report(worker, count, now - started)
                    except Exception:
                        log.exception("slowlog failed")

    def _report(self, worker, count, seconds):
        message = _describe(worker, seconds)
        state = worker.state
        runtime = state.runtime if state is not None else None   # keeps the lua_State alive
        L = getattr(state, "lua_thread", None) if runtime is not None else None
        if L is None or worker.requests != count:
            slowlog.warning("%s\n(no Lua traceback: %s)", message,
                            "not running Lua" if runtime is None else
                            "this Lua VM does not tell the state's address")
            return
        lua = self._lua or _LuaAPI(vm.load(self.server.config.lua))
        self._lua = lua
        old = (lua.gethook(L), lua.gethookmask(L), lua.gethookcount(L))
        self._pending[L] = (worker, count, message, old)
        lua.sethook(L, ctypes.cast(self._hook, ctypes.c_void_p), LUA_MASKCOUNT, 1)

    def _fire(self, L, _ar):
        """The hook, on the worker's thread, inside the running Lua code."""
        try:
            pending = self._pending.pop(L, None)
            if pending is None:
                self._lua.sethook(L, None, 0, 0)
                return
            worker, count, message, old = pending
            self._lua.sethook(L, *old)
            if getattr(current, "stats", None) is worker and worker.requests == count:
                slowlog.warning("%s\n%s", message, self._lua.traceback_of(L))
            else:   # the request ended before its state ran Lua again
                slowlog.warning("%s\n(no Lua traceback: the request ended first)", message)
        except Exception:
            log.exception("slowlog hook failed")
