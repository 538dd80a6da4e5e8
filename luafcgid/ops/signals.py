"""Signals, taken synchronously by the main thread.

The signals are blocked before any thread starts (threads inherit the mask), so they stay
pending until the main thread collects them with sigwait(): no handler runs at an arbitrary
point, and none can be lost between checking a flag and going to sleep.
"""

import select
import signal
import time

STOP = {signal.SIGTERM, signal.SIGINT}
RELOAD = signal.SIGHUP
REOPEN = signal.SIGUSR1   # reopen the log files (logrotate's postrotate)
HANDLED = STOP | {RELOAD, REOPEN}
SLICE = 0.1   # while a descriptor is watched, signals are looked for this often


def block():
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def wait(timeout, readable=None):
    """The next signal, or None after `timeout` seconds without one or, when `readable` (a
    file descriptor) is given, as soon as it can be read. poll() cannot take blocked
    signals, so while it watches a descriptor they are looked for every SLICE seconds."""
    if readable is None:
        info = signal.sigtimedwait(HANDLED, timeout)
        return info.si_signo if info is not None else None
    poller = select.poll()
    poller.register(readable, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        info = signal.sigtimedwait(HANDLED, 0)
        if info is not None:
            return info.si_signo
        left = deadline - time.monotonic()
        if left <= 0 or poller.poll(min(left, SLICE) * 1000):
            return None
