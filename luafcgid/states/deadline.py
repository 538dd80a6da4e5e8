"""request_timeout, enforced from outside the script.

php-fpm runs each request in a process of its own and kills it at request_terminate_timeout.
Here the states of many scripts run as threads of one process, so the stop has to come from
inside the Lua VM. Every call into a state (its load, each request, each finish handler) runs
in the state's request thread (runtime.lua) and inside its worker's Window. A watcher thread
reads the windows every TICK with the daemon's own clock (time.monotonic); at a call's
deadline it arms the stop hook on the state (hooks.stop), and again at every tick after, in
case the script took it off: the script fails at its next Lua instruction, whatever it
replaced (os.time, debug.sethook) or caught (pcall), and its state is discarded.

What no hook can interrupt: one C function call (the hook fires when it returns: a sleep, a
blocking read, one huge string operation) and a __gc finalizer (Lua runs no hooks inside
finalizers). A call still running stuck_timeout seconds past its deadline is given up on:
its worker counts as stuck (logged, listed on the status page), its client is answered 500
now, another worker thread takes its place (server.py), and the supervisor, when one runs,
replaces the process. The worker's thread stays in the call; should the call
return, the worker serves again. The same thread checks the slowlog at every tick.
"""

import logging
import threading
import time
from contextlib import contextmanager

log = logging.getLogger("luafcgid")

_monotonic = time.monotonic
TICK = 0.05   # the watcher's period: a call is stopped at most this late


class Window:
    """What one worker is running in Lua, for the watcher: each call's state and deadline.
    The worker opens and closes it; the watcher arms hooks only while it is open, under its
    lock, so a hook never lands on the next call."""

    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()
        self.ident = None      # the worker's OS thread
        self.state = None      # the LuaState a call is running in; None between calls
        self.started = 0.0
        self.deadline = None   # monotonic; None without a request_timeout
        self.expired = False   # the deadline passed during the (last) call
        self.stuck = 0.0       # monotonic time the running call was given up on; 0.0 if not
        self.params = None     # the request's FastCGI params, for the log
        self.abandon = None    # answers the request at once; returns False to be retried

    @contextmanager
    def running(self, state):
        """A call into `state` on this worker's thread. Afterwards `expired` tells whether
        it ran past its deadline (then the state is not to be used again)."""
        now = _monotonic()
        with self.lock:
            self.ident = threading.get_ident()
            self.state, self.started, self.expired, self.stuck = state, now, False, 0.0
            self.deadline = now + state.timeout if state.timeout > 0 else None
        try:
            yield self
        finally:
            with self.lock:
                state.hooks.release(*state.threads)
                if self.stuck:
                    log.warning("%s: the call given up on %.1f s ago returned; serving again",
                                self.name, _monotonic() - self.stuck)
                self.state = self.deadline = None
                self.stuck = 0.0

    def watch(self, now, grace):
        """At each tick, from the watcher thread. True when it gave the call up just now."""
        with self.lock:
            state = self.state
            if state is None or self.deadline is None or now < self.deadline:
                return
            self.expired = True
            state.hooks.stop(*state.threads)
            if now < self.deadline + grace:
                return
            given_up = not self.stuck
            if given_up:
                self.stuck = now
                log.error("%s: %s stuck: still running %.1f s past its request_timeout of "
                          "%g s (in one C function call, or in a __gc finalizer: Lua cannot "
                          "be interrupted there); its client is answered 500", self.name,
                          self.describe(now)["request"], now - self.deadline, state.timeout)
            abandon, self.abandon = self.abandon, None
        # an answer that cannot go out now (the worker is writing) is tried at the next tick
        if abandon is not None and not abandon():
            with self.lock:
                if self.state is state and self.abandon is None:
                    self.abandon = abandon
        return given_up

    def describe(self, now):
        params = self.params or {}
        request = "%s %s (script %s)" % (
            params.get(b"REQUEST_METHOD", b"-").decode(errors="replace"),
            params.get(b"REQUEST_URI", b"-").decode(errors="replace"),
            getattr(self.state, "path", "-"))
        return {"worker": self.name, "request": request, "seconds": round(now - self.started, 3)}


class Watcher:
    """The thread that watches every window."""

    def __init__(self, config, on_stuck=None, on_tick=None):
        """`config()` is the running configuration (it changes on reload); on_stuck(window)
        is called when a window's call is given up on, on_tick(now) at every tick (the
        slowlog's check)."""
        self._config = config
        self._on_stuck = on_stuck
        self._on_tick = on_tick
        self._windows = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def window(self, name):
        """A new window, watched until removed."""
        window = Window(name)
        with self._lock:
            self._windows.append(window)
        return window

    def remove(self, window):
        with self._lock:
            self._windows.remove(window)

    def stuck(self):
        """What every worker given up on runs, as dicts (worker, request, seconds)."""
        now = _monotonic()
        with self._lock:
            windows = list(self._windows)
        return [window.describe(now) for window in windows if window.stuck]

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(TICK):
            now = _monotonic()
            grace = self._config().stuck_timeout
            with self._lock:
                windows = list(self._windows)
            for window in windows:
                try:
                    if window.watch(now, grace) and self._on_stuck is not None:
                        self._on_stuck(window)
                except Exception:
                    log.exception("request_timeout watcher failed")
            if self._on_tick is not None:
                try:
                    self._on_tick(now)
                except Exception:
                    log.exception("watcher tick failed")
