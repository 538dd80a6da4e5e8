"""The slowlog: a request running longer than slowlog_timeout is written once, with the Lua
traceback of where it is (php-fpm's request_slowlog_timeout).

The deadline watcher finds the slow requests (worker.Worker.check) and hands each to
report(), which has a one-shot hook armed on the Lua state running it (Worker.trace): the
hook runs on the worker itself, at the state's next Lua instruction, and writes the
traceback.

Limits, honestly: LuaJIT runs no hooks inside compiled traces (with a request_timeout its
JIT compiler is off), and a request blocked inside a C function gets its traceback when the
C function returns to Lua. In PUC Lua, a coroutine of the script runs its own hooks: its
traceback is written when it hands back to the request.
"""

import logging

from .describe import describe
from .logs import escape
from .logs import slow as slowlog

log = logging.getLogger("luafcgid")


def report(worker, now):
    """Write the slow request `worker` runs, with its Lua traceback when it runs Lua. The
    slowlog's formatter leaves an entry's lines as they are: its fields are escaped here
    (logs.escape)."""
    message = "slow request: " + escape(describe(worker, now - worker.started))

    def write(traceback):
        try:
            # a frame names its script and function, which a line feed could be part of
            slowlog.warning("%s\n%s", message, escape(traceback, continued=True)
                            if traceback is not None else
                            "(no Lua traceback: the request ended or was stopped first)")
        except Exception:
            log.exception("slowlog hook failed")

    if not worker.trace(write):
        slowlog.warning("%s\n(no Lua traceback: not running Lua)", message)
