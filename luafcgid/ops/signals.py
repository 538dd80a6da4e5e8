"""Signals, taken by the main thread from a pipe.

The handlers, set in the main thread, do nothing themselves: Python writes each signal's
number to a pipe (signal.set_wakeup_fd), which the main loop waits on. No handler code
runs at an arbitrary point, and a signal that arrives between a check and the wait stays
in the pipe until read.

No thread blocks the signals. They used to be blocked in every thread, for sigwait(), and
a process a page starts (os.execute, io.popen: glibc's system() and popen() give the child
the caller's mask) inherited the mask: `kill` did nothing to it and `systemctl stop` waited
out TimeoutStopSec. A caught signal is reset to its default by exec, so such a process
starts with default dispositions and an empty mask. The handlers restart interrupted
system calls (SA_RESTART), so a worker thread that takes a signal goes on with its call.
"""

import os
import select
import signal
import time

STOP = {signal.SIGTERM, signal.SIGINT}
RELOAD = signal.SIGHUP
REOPEN = signal.SIGUSR1   # reopen the log files (logrotate's postrotate)
HANDLED = STOP | {RELOAD, REOPEN}
# Python ignores these, and an ignored signal stays ignored across exec: caught instead,
# they reach a page's processes as their default (a send to a closed socket still fails
# with EPIPE here).
_DEFAULT_FOR_CHILDREN = {signal.SIGPIPE, signal.SIGXFSZ}

_pipe = None       # (read fd, write fd) of this process
_owner = None      # the pid that made it: a forked child makes its own
_pending = []      # signal numbers read from the pipe, not yet returned by wait()


def _ignore(signum, frame):
    pass   # the wakeup pipe carries the signal to the main loop


def install():
    """Catch the signals from now on, in this process (from its main thread; again after
    a fork, which os.fork does itself). Until the main loop takes them they wait in the
    pipe, so a SIGTERM during start-up is handled once serving began."""
    global _pipe, _owner
    if _owner == os.getpid():
        return
    if _pipe is not None:   # the parent's, inherited
        for fd in _pipe:
            os.close(fd)
    _pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _owner = os.getpid()
    _pending.clear()
    signal.set_wakeup_fd(_pipe[1], warn_on_full_buffer=False)
    for signum in HANDLED | _DEFAULT_FOR_CHILDREN:
        signal.signal(signum, _ignore)
        signal.siginterrupt(signum, False)


def wait(timeout, readable=None):
    """The next signal, or None after `timeout` seconds without one or, when `readable` (a
    file descriptor) is given, as soon as it can be read."""
    deadline = time.monotonic() + timeout
    watched = [_pipe[0]] if readable is None else [_pipe[0], readable]
    while not _pending:
        remaining = deadline - time.monotonic()
        ready = select.select(watched, [], [], remaining)[0] if remaining > 0 else []
        if not ready:
            return None
        if _pipe[0] in ready:
            _pending.extend(signum for signum in os.read(_pipe[0], 64) if signum in HANDLED)
        if not _pending and readable in ready:
            return None
    return _pending.pop(0)


def _fork_blocking():
    # a signal sent to the child before it has its own pipe would land in the parent's
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def _forked_parent():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


def _forked_child():
    if _owner is not None:
        install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


os.register_at_fork(before=_fork_blocking, after_in_parent=_forked_parent,
                    after_in_child=_forked_child)
