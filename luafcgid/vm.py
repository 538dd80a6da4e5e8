"""Choosing the Lua VM: one lupa Lua module per process, its symbols made global.

Lua C modules (cjson, lpeg, LuaSQL, ...) are shared objects that expect the Lua API symbols to be
visible process-wide. They only are when lupa's Lua module is loaded with RTLD_GLOBAL, and two
different Lua builds cannot both be global in one process, so the first choice sticks.
"""

import importlib
import importlib.util
import os
import sys
import threading

MODULES = {"luajit": "lupa.luajit21", "5.1": "lupa.lua51", "5.2": "lupa.lua52",
           "5.3": "lupa.lua53", "5.4": "lupa.lua54", "5.5": "lupa.lua55"}

_lock = threading.Lock()
_loaded = None   # (choice, module)


class VMError(RuntimeError):
    pass


def available(choice):
    """Whether this lupa build ships the module for `choice`, without importing it."""
    return importlib.util.find_spec(MODULES[choice]) is not None


def load(choice):
    """The lupa module for `choice`, imported once with its Lua symbols global."""
    global _loaded
    with _lock:
        if _loaded is not None:
            if _loaded[0] != choice:
                raise VMError(f"lua: this process already runs Lua {_loaded[0]!r}; "
                              f"changing it to {choice!r} needs a restart")
            return _loaded[1]
        if not available(choice):
            raise VMError(f"lua: the installed lupa has no {MODULES[choice]} module")
        flags = sys.getdlopenflags()
        sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
        try:
            module = importlib.import_module(MODULES[choice])
        finally:
            sys.setdlopenflags(flags)
        _loaded = (choice, module)
        return module
