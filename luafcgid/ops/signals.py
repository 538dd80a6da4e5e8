"""Signals, taken synchronously by the main thread.

The signals are blocked before any thread starts (threads inherit the mask), so they stay
pending until the main thread collects them with sigwait(): no handler runs at an arbitrary
point, and none can be lost between checking a flag and going to sleep.
"""

import signal

STOP = {signal.SIGTERM, signal.SIGINT}
RELOAD = signal.SIGHUP
REOPEN = signal.SIGUSR1   # reopen the log files (logrotate's postrotate)
HANDLED = STOP | {RELOAD, REOPEN}


def block():
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def wait(timeout):
    """The next signal, or None after `timeout` seconds without one."""
    info = signal.sigtimedwait(HANDLED, timeout)
    return info.si_signo if info is not None else None
