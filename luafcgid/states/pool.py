"""The registry of Lua states, keyed by script path, shared by every worker.

All bookkeeping happens under one lock, which is never held while Lua runs: states are loaded,
served and closed outside it. A worker holds at most one state at a time and there are at
least as many states as workers, so a waiting worker is always woken by a release.
"""

import math
import threading
import time


class PoolClosed(Exception):
    """The pool is shutting down and lends no more states."""


class StatePool:
    def __init__(self, create, states, clones, retries, max_requests=0,
                 close=lambda state: state.close()):
        """`create(path, *context)` builds a loaded state (or raises); the pool only calls it
        outside its lock. `close(state)` closes a state the pool lets go of. A state is
        closed after `max_requests` requests (0: never)."""
        self._create = create
        self._close = close
        self.max_states = states
        self.max_clones = clones
        self.retries = retries
        self.max_requests = max_requests
        self._cond = threading.Condition(threading.Lock())
        self._idle = {}      # path -> idle states, most recently used last
        self._states = {}    # path -> every state of that script, busy or idle
        self._loading = {}   # path -> states being created
        self._total = 0      # states that exist or are being created
        self._closed = False
        self.created = 0
        self.evicted = 0
        self.flushed = 0
        self.discarded = 0   # after a fatal error (memory, timeout)
        self.recycled = 0    # after max_requests
        self.waiting = 0     # workers waiting for a state (of a busy script, or a free slot)

    # -- lending ------------------------------------------------------------------------

    def acquire(self, path, *context):
        """An idle state of `path`, marked busy; may create one (with `context` passed to
        create), evict another or wait."""
        victim = None
        looks = 0
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed()
                idle = self._idle.get(path)
                if idle:
                    state = idle.pop()
                    if not idle:   # an empty list left here outlived its script's states
                        del self._idle[path]
                    state.busy = True
                    state.requests += 1
                    return state
                count = len(self._states.get(path, ())) + self._loading.get(path, 0)
                if count >= self.max_clones:
                    self._wait()
                    continue
                if count and looks < self.retries:
                    # A busy clone may be released in a moment: prefer it to a new clone.
                    looks += 1
                    self._wait(0.001)
                    continue
                if self._total >= self.max_states:
                    # A clone only displaces another script's clone: evicting a script's
                    # last state would cost it a reload (about 0.5 ms) to save a wait for
                    # our own busy state, which ends with its request.
                    victim = self._choose_victim(clones_only=count > 0)
                    if victim is None:
                        self._wait()
                        continue
                    self._remove(victim)
                    self.evicted += 1
                self._total += 1
                self._loading[path] = self._loading.get(path, 0) + 1
                break
        if victim is not None:
            self._close(victim)
        try:
            state = self._create(path, *context)
        except BaseException:
            with self._cond:
                self._total -= 1
                self._loading_done(path)
                self._cond.notify_all()
            raise
        with self._cond:
            self._loading_done(path)
            self._states.setdefault(path, []).append(state)
            self.created += 1
            state.busy = True
            state.requests = 1
        return state

    def release(self, state, discard=False):
        """Give a state back; a discarded or stale one is closed instead of kept."""
        with self._cond:
            state.busy = False
            state.last_used = time.monotonic()
            recycle = 0 < self.max_requests <= state.requests
            drop = discard or recycle or state.stale or self._closed
            self.discarded += discard
            self.recycled += recycle and not discard
            if drop:
                self._remove(state)
            else:
                self._idle.setdefault(state.path, []).append(state)
            self._cond.notify_all()
        if drop:
            self._close(state)

    # -- flushing -----------------------------------------------------------------------

    def flush(self, predicate=lambda state: True):
        """Close idle states for which predicate(state) is true; mark busy ones stale so
        they are closed when released. Returns how many states were flushed."""
        with self._cond:
            chosen = [s for states in self._states.values() for s in states if predicate(s)]
            closing = []
            for state in chosen:
                if state.busy:
                    state.stale = True
                else:
                    self._remove(state)
                    closing.append(state)
            self.flushed += len(chosen)
            self._cond.notify_all()
        for state in closing:
            self._close(state)
        return len(chosen)

    def close(self):
        """Refuse further loans, close every idle state; busy ones close on release."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.flush()

    def inspect(self, state, look):
        """look(state) with `state` lent to the caller, if it is idle now; else None (a busy
        state's runtime belongs to its worker: Lua is not for two threads at once)."""
        with self._cond:
            idle = self._idle.get(state.path)
            if not idle or state not in idle:
                return None
            place = idle.index(state)   # kept: a look is not a use
            idle.remove(state)
            if not idle:
                del self._idle[state.path]
            state.busy = True
        try:
            return look(state)
        finally:
            with self._cond:
                state.busy = False
                drop = state.stale or self._closed
                if drop:
                    self._remove(state)
                else:
                    self._idle.setdefault(state.path, []).insert(place, state)
                self._cond.notify_all()
            if drop:
                self._close(state)

    def states(self):
        """A snapshot list of every loaded state (busy or idle)."""
        with self._cond:
            return [s for states in self._states.values() for s in states]

    def stats(self):
        with self._cond:
            busy = sum(s.busy for states in self._states.values() for s in states)
            return {"states": self._total, "busy": busy, "idle": self._total - busy
                    - sum(self._loading.values()), "loading": sum(self._loading.values()),
                    "scripts": len(self._states), "created": self.created,
                    "evicted": self.evicted, "flushed": self.flushed,
                    "discarded": self.discarded, "recycled": self.recycled,
                    "waiting": self.waiting}

    # -- internals (lock held) ----------------------------------------------------------

    def _wait(self, timeout=None):
        self.waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self.waiting -= 1

    def _loading_done(self, path):
        left = self._loading[path] - 1
        if left:
            self._loading[path] = left
        else:
            del self._loading[path]

    def _remove(self, state):
        states = self._states[state.path]
        states.remove(state)
        if not states:
            del self._states[state.path]
        idle = self._idle.get(state.path)
        if idle and state in idle:
            idle.remove(state)
            if not idle:
                del self._idle[state.path]
        self._total -= 1

    def _choose_victim(self, clones_only=False):
        """The idle state least worth keeping: idle longest, relative to how popular it is,
        and sooner if its script has other states to fall back on. A hot script's only
        state thus outlives a one-off script's state that was used more recently. The idle
        time counts from one second, so that in a burst (all idle for milliseconds)
        popularity still decides."""
        now = time.monotonic()
        victim, worst = None, -1.0
        for path, idle in self._idle.items():
            clones = len(self._states[path])
            if clones_only and clones == 1:
                continue
            for state in idle:
                score = ((now - state.last_used + 1.0) * clones
                         / (1 + math.log2(1 + state.requests)))
                if score > worst:
                    victim, worst = state, score
        return victim
