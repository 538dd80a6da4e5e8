"""request_timeout, enforced from outside the script.

php-fpm runs each request in a process of its own and kills it at request_terminate_timeout.
Here the states of many scripts run as threads of one process, so the stop has to come from
inside the Lua VM. Every call into a state (its load, each request, each finish handler) runs
in the state's request thread (runtime.lua), watched by its worker's record (worker.py). A
watcher thread checks the records every TICK with the daemon's own clock (time.monotonic); at
a call's deadline it arms the stop hook on the state (hooks.stop), and again at every tick
after, in case the script took it off: the script fails at its next Lua instruction,
whatever it replaced (os.time, debug.sethook) or caught (pcall), and its state is discarded.

What no hook can interrupt: one C function call (the hook fires when it returns: a sleep, a
blocking read, one huge string operation) and a __gc finalizer (Lua runs no hooks inside
finalizers). A call still running stuck_timeout seconds past its deadline is given up on:
its worker counts as stuck (logged, listed on the status page), its client is answered 500
now, another worker thread takes its place (server.py), and the supervisor, when one runs,
replaces the process. The worker's thread stays in the call; should the call return, the
worker serves again. The same check finds the requests for the slowlog.
"""

import logging
import threading
import time

from .duty import STALLED
from .worker import RUNNING, SLOW, STUCK

log = logging.getLogger("luafcgid")

_monotonic = time.monotonic
TICK = 0.05   # the watcher's period: a call is stopped at most this late


class Watcher:
    """The thread that checks every worker's record at every TICK (worker.Worker.check)."""

    def __init__(self, workers, config, on_stuck=None, on_slow=None):
        """Watches `workers` (a worker.Workers); `config()` is the running configuration (it
        changes on reload). on_stuck(worker) is called when a worker's call is given up on,
        on_slow(worker, now) when its request runs longer than slowlog_timeout."""
        self._workers = workers
        self._config = config
        self._on_stuck = on_stuck
        self._on_slow = on_slow
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(TICK):
            now = _monotonic()
            grace = self._config().stuck_timeout
            for worker in self._workers:
                try:
                    if worker.stage >= RUNNING and now - worker.started > STALLED:
                        worker.off_duty()   # a request that blocked: see states/duty.py
                    due = worker.check(now, grace)
                    if due & STUCK and self._on_stuck is not None:
                        self._on_stuck(worker)
                    if due & SLOW and self._on_slow is not None:
                        self._on_slow(worker, now)
                except Exception:
                    log.exception("the watcher failed on %s", worker.name)
