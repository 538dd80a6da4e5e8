"""Each serving thread's own working directory: the running script's directory, so that
relative file names resolve there, in Lua's functions and C modules (LuaSQL, DBI, lfs) alike.

The process has one working directory, shared by its threads. On Linux a thread that calls
unshare(CLONE_FS) (no privilege needed) gets its own, and may then change it without moving
anyone else's: a serving thread does that on its first request, and before each request
changes into the script's directory unless it is there already. Where unshare is missing
(FreeBSD, macOS) or refused (a seccomp profile such as Docker's default), runtime.lua
rewrites relative names in Lua's file functions instead, and C modules see the process's
working directory. Which of the two is decided once per process, by `per_thread()`.
"""

import ctypes
import functools
import logging
import os
import sys
import threading

log = logging.getLogger("luafcgid")

CLONE_FS = 0x200   # <sched.h>: working directory, root and umask

_thread = threading.local()


def _unshare():
    """Give the calling thread its own working directory; OSError when it cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    unshare = getattr(libc, "unshare", None)
    if unshare is None:
        raise OSError("the C library has no unshare()")
    if unshare(CLONE_FS) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare(CLONE_FS): {os.strerror(error)}")
    _thread.own = True


@functools.lru_cache(maxsize=None)
def per_thread():
    """Whether serving threads can have their own working directory. Tried once, on a
    thread of its own, so no other thread is affected; logged."""
    failure = []

    def probe():
        try:
            _unshare()
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=probe, name="workdir-probe")
    thread.start()
    thread.join()
    if failure:
        log.info("relative paths: C modules see the process's working directory (%s); "
                 "Lua's file functions resolve them against the script's directory",
                 failure[0])
        return False
    # Python looks up a relative sys.path entry ("" under `python -c`) in the importing
    # thread's working directory: a script's directory must not become a source of modules.
    sys.path[:] = [os.path.abspath(entry) for entry in sys.path]
    log.info("relative paths: each worker thread changes into the script's directory")
    return True


# dirname() took 0.5 µs, as long as the rest of enter() together
_directory = functools.lru_cache(maxsize=4096)(os.path.dirname)


def enter(script):
    """Make the directory of `script` (an absolute path) the calling thread's working
    directory; per_thread() must be true. Asks the kernel where the thread is rather than
    remembering it, since a script may have moved it (lfs.chdir): os.getcwd() costs 0.6 µs.
    OSError when the directory cannot be entered."""
    if not getattr(_thread, "own", False):
        _unshare()
    directory = _directory(script)
    try:
        here = os.getcwd()
    except FileNotFoundError:   # the directory it was in has been removed
        here = None
    if here != directory:
        os.chdir(directory)
