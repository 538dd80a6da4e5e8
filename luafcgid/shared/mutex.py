"""The process-shared lock of a shared dictionary: a pthread mutex in the dictionary's own
memory, made robust (a process killed while holding it leaves EOWNERDEAD to the next owner,
not a lock held forever) and error-checking (a thread locking it again is told EDEADLK:
that thread's previous operation was interrupted, see Dictionary.release). LuaJIT's FFI
locks the same mutex (lua/shared.lua)."""

import ctypes
import errno
import sys

# <pthread.h> values that differ between systems
if sys.platform.startswith("freebsd"):
    PROCESS_SHARED, ROBUST, ERRORCHECK = 1, 1, 1
else:
    PROCESS_SHARED, ROBUST, ERRORCHECK = 1, 1, 2

_ATTR = 64   # room for a pthread_mutexattr_t (4 bytes on glibc)
_libc = ctypes.CDLL(None, use_errno=True)   # its calls let go of the interpreter lock
_quick = ctypes.PyDLL(None)                 # these keep it: they never block

_p = ctypes.c_void_p
for _name in ("pthread_mutexattr_init", "pthread_mutexattr_setpshared",
              "pthread_mutexattr_setrobust", "pthread_mutexattr_settype",
              "pthread_mutexattr_destroy", "pthread_mutex_init", "pthread_mutex_lock"):
    getattr(_libc, _name).restype = ctypes.c_int
for _name in ("pthread_mutex_trylock", "pthread_mutex_unlock", "pthread_mutex_consistent"):
    getattr(_quick, _name).restype = ctypes.c_int
    getattr(_quick, _name).argtypes = [_p]
_libc.pthread_mutex_lock.argtypes = [_p]


def initialize(address):
    """Make the memory at `address` (MUTEX bytes) a fresh mutex."""
    attr = ctypes.create_string_buffer(_ATTR)
    for call, *args in ((_libc.pthread_mutexattr_init,),
                        (_libc.pthread_mutexattr_setpshared, PROCESS_SHARED),
                        (_libc.pthread_mutexattr_setrobust, ROBUST),
                        (_libc.pthread_mutexattr_settype, ERRORCHECK),
                        (_libc.pthread_mutex_init, _p(address))):
        if call is _libc.pthread_mutex_init:
            code = call(_p(address), attr)
        else:
            code = call(attr, *args)
        if code:
            raise OSError(code, f"{call.__name__}: {errno.errorcode.get(code, code)}")
    _libc.pthread_mutexattr_destroy(attr)


def lock(address):
    """Lock; 0, EOWNERDEAD (the owner died: call consistent once the data is checked) or
    EDEADLK (this thread holds it already). Waits without the interpreter lock, which the
    owner may need to finish."""
    code = _quick.pthread_mutex_trylock(address)
    if code == errno.EBUSY:
        code = _libc.pthread_mutex_lock(address)
    if code not in (0, errno.EOWNERDEAD, errno.EDEADLK):
        raise OSError(code, f"pthread_mutex_lock: {errno.errorcode.get(code, code)}")
    return code


def consistent(address):
    _quick.pthread_mutex_consistent(address)


def unlock(address):
    _quick.pthread_mutex_unlock(address)
