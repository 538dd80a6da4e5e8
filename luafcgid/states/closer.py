"""Closing Lua states off the workers, without stalling anyone.

A state is closed when the pool lets it go (eviction, a flush after its script changed, a
reload, max_requests, a discard after an error, shutdown), and closing runs the script's
__gc finalizers: a database connection's close, or whatever a script put there. They run on
this module's thread, in a Lua call that holds no interpreter lock (state.LuaState.close),
so a slow finalizer (3 s, measured) delays no other request; the workers only queue states.

No hook can stop a finalizer (Lua runs none inside __gc), so one that does not return is
left on its thread: a close running longer than `patience` seconds is given up when the next
state is queued, or at shutdown, and the queue goes on on a fresh thread. The state given up
on is never freed. Shutdown waits for the queue at most until its deadline.
"""

import collections
import logging
import threading
import time

from . import vm

log = logging.getLogger("luafcgid")

_monotonic = time.monotonic


class Closer:
    def __init__(self, lua, patience):
        """`lua`: the VM (threads running LuaJIT need large stacks, see vm.start_thread);
        `patience`: seconds a close may take before it is given up on (0: never)."""
        self._lua = lua
        self.patience = patience
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._thread = None      # the thread closing states now
        self._busy_since = 0.0   # when it began the close it is running; 0.0 when idle
        self._abandoned = []     # closes given up on (their states stay referenced)

    def close(self, state):
        """Queue `state` to be closed; returns at once."""
        with self._cond:
            self._queue.append(state)
            self._ensure_thread()
            self._cond.notify_all()

    def drain(self, deadline):
        """Wait until every queued state is closed, or the monotonic `deadline`. True when
        all were."""
        with self._cond:
            while self._queue or self._busy_since:
                left = deadline - _monotonic()
                if left <= 0:
                    return False
                self._ensure_thread()
                self._cond.wait(min(left, 0.05))
            return True

    @property
    def abandoned(self):
        return len(self._abandoned)

    def _ensure_thread(self):
        """(lock held) A thread that is not stuck takes the queue."""
        if self._thread is not None and self._busy_since and self.patience:
            busy = _monotonic() - self._busy_since
            if busy > self.patience:
                log.error("a Lua state's close has run for %.1f s (a __gc finalizer that does "
                          "not return?): left on its thread, never freed; the other states "
                          "close on a new thread", busy)
                self._abandoned.append(self._thread)
                self._thread, self._busy_since = None, 0.0
        if self._thread is None and self._queue:
            self._thread = vm.start_thread(self._lua, self._run, "closer")

    def _run(self):
        me = threading.current_thread()
        while True:
            with self._cond:
                while self._thread is me and not self._queue:
                    self._cond.wait()
                if self._thread is not me:   # replaced while it was stuck in a close
                    return
                state = self._queue.popleft()
                self._busy_since = _monotonic()
            try:
                state.close()
            except Exception:
                log.exception("closing the state of %s failed", state.path)
            with self._cond:
                if self._thread is me:
                    self._busy_since = 0.0
                self._cond.notify_all()
