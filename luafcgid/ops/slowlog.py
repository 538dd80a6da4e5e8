"""The slowlog: a request running longer than slowlog_timeout is written once, with the Lua
traceback of where it is (php-fpm's request_slowlog_timeout).

The deadline watcher's thread looks at the workers' start times at every tick. For a slow
request it arms a one-shot hook on the Lua state running it (hooks.call_once): the hook runs
on the worker itself, at the state's next Lua instruction, and writes the traceback.

Limits, honestly: LuaJIT runs no hooks inside compiled traces (with a request_timeout its
JIT compiler is off), and a request blocked inside a C function gets its traceback when the
C function returns to Lua. In PUC Lua, a coroutine of the script runs its own hooks: its
traceback is written when it hands back to the request.
"""

import logging

from .logs import escape, slow as slowlog
from .metrics import current_worker

log = logging.getLogger("luafcgid")


def _describe(worker, seconds):
    """The entry's first line, its fields escaped (logs.escape): the slowlog's formatter
    leaves the entry's lines as they are."""
    params = worker.params or {}
    return "slow request: %s %s ran %.3f s (script %s)" % (
        escape(params.get(b"REQUEST_METHOD", b"-")), escape(params.get(b"REQUEST_URI", b"-")),
        seconds, escape(params.get(b"SCRIPT_FILENAME", b"-")))


class SlowLog:
    """Checked at every tick of the deadline watcher (deadline.Watcher)."""

    def __init__(self, config, metrics):
        """Watches the workers of `metrics` (a metrics.Metrics) against config() (the
        current Config)'s slowlog_timeout."""
        self.config = config
        self.metrics = metrics
        self._reported = {}   # worker number -> its `requests` count when reported

    def check(self, now):
        timeout = self.config().slowlog_timeout
        if timeout is None or not slowlog.handlers:
            return
        for worker in self.metrics.workers:
            started, count = worker.started, worker.requests
            if (started and now - started > timeout
                    and self._reported.get(worker.number) != count):
                self._reported[worker.number] = count
                try:
                    self._report(worker, count, now - started)
                except Exception:
                    log.exception("slowlog failed")

    @staticmethod
    def _report(worker, count, seconds):
        message = _describe(worker, seconds)
        window = worker.window
        with window.lock:   # while it is held, the call (and its lua_State) goes on
            state = window.state
            if state is not None and not window.expired and worker.requests == count:
                hooks = state.hooks
                hooks.call_once(state.threads[0],
                                lambda L: _write(hooks, worker, count, message, L), window.ident)
                return
        slowlog.warning("%s\n(no Lua traceback: not running Lua)", message)


def _write(hooks, worker, count, message, L):
    """The hook's callback: on the worker's thread inside the running Lua code (L), or
    anywhere with L None when the hook was taken off first."""
    try:
        if L is not None and getattr(current_worker, "stats", None) is worker and worker.requests == count:
            # a frame names its script and function, which a line feed could be part of
            slowlog.warning("%s\n%s", message, escape(hooks.traceback(L), continued=True))
        else:
            slowlog.warning("%s\n(no Lua traceback: the request ended or was stopped first)",
                            message)
    except Exception:
        log.exception("slowlog hook failed")
