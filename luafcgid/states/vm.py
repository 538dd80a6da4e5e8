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


# LuaJIT sets no limit on recursion through C functions: string.gsub with a function that
# calls gsub recursed until LuaJIT's own Lua stack limit ("stack overflow", after 6,581
# levels), which took 54 MiB of C stack; a worker thread's 8 MiB ran out first and the whole
# daemon died of SIGSEGV. Threads that run LuaJIT get this much stack (address space: only
# the pages a deep recursion touches become resident). PUC Lua stops C recursion itself, at
# 200 levels.
LUAJIT_STACK_SIZE = 128 << 20

_stack_lock = threading.Lock()


def start_thread(choice, target, name, args=()):
    """Start a daemon thread that runs Lua `choice`, with a stack large enough for it."""
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    if choice != "luajit":
        thread.start()
        return thread
    with _stack_lock:   # threading.stack_size applies to every thread started meanwhile
        previous = threading.stack_size(LUAJIT_STACK_SIZE)
        try:
            thread.start()
        finally:
            threading.stack_size(previous)
    return thread


def chosen():
    """The choice this process loaded (see load), or None before any."""
    loaded = _loaded
    return loaded[0] if loaded is not None else None


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


_memory_checked = {}   # choice -> whether max_memory holds


def limits_memory(choice):
    """Whether lupa enforces max_memory for `choice`: a 1 MiB state must fail to grow to
    4 MiB. (LuaJIT accepts a custom allocator only when built with GC64.)"""
    if choice not in _memory_checked:
        module = load(choice)
        try:
            runtime = module.LuaRuntime(max_memory=1 << 20)
            runtime.execute("local t = {} for i = 1, 64 do t[i] = string.rep('x', 65536) .. i end")
        except module.LuaMemoryError:
            _memory_checked[choice] = True
        except Exception:   # no runtime at all with a limit
            _memory_checked[choice] = False
        else:
            _memory_checked[choice] = False
    return _memory_checked[choice]


def problems(config):
    """What the VM the states will run cannot do of what `config` asks, one line each. That
    VM is the one this process runs already, if any: a reload keeps it (lua needs a
    restart), and loading another would fail."""
    if config.memory_limit is None:
        return []
    with _lock:
        choice = _loaded[0] if _loaded is not None else config.lua
    if limits_memory(choice):
        return []
    return [f"memory_limit: the installed {MODULES[choice]} cannot limit a state's memory "
            f"(LuaJIT needs a GC64 build for that); set memory_limit: null or choose another lua"]
