"""The registry of Lua states, keyed by script path, shared by every worker.

All bookkeeping happens under one lock, which is never held while Lua runs: states are loaded,
served and closed outside it. A worker holds at most one state at a time and there are at
least as many states as workers, so a waiting worker is always woken by a release.

The policy, for sites with more pages than states:
- a request takes its script's most recently used idle state (the others age, and go first);
- when its script has none idle, it gets a new state: a clone (at most `clones` per script)
  in a free slot, or in place of the idle state least worth keeping: idle longest, for its
  own recent request rate (_choose_victim);
- a request waits only for what no new state can give it: its script has `clones` states,
  or every state is busy or loading. A clone that would displace another script's state
  first waits a moment for one of its own script's states: twice the time its script's
  requests typically hold a state, if that is at most `retries` ms (at most that long while
  it is not known yet). For short requests the wait is shorter than the reloads it spares
  (4 hot pages on 4 states thrashed without it); a slow page's request does not wait at all
  (it used to queue on the page's busy state when the pool was full of other pages).
"""

import math
import threading
import time

RATE_WINDOW = 60.0   # seconds: a state's rate counts the requests of about the last minute
HOLD_WEIGHT = 1 / 8   # of the newest request in a script's typical hold time


class PoolClosed(Exception):
    """The pool is shutting down and lends no more states."""


class _Script:
    """One script's states (and states being loaded)."""

    __slots__ = ("path", "states", "idle", "loading")

    def __init__(self, path):
        self.path = path
        self.states = []    # its records, busy or idle
        self.idle = []      # its idle records, the most recently used last
        self.loading = 0    # states of it being created


class _Record:
    """The pool's bookkeeping for one loaded state."""

    __slots__ = ("state", "script", "busy", "requests", "rate", "last_used", "lent_at",
                 "stale")

    def __init__(self, state, script, now):
        self.state = state
        self.script = script
        self.busy = False
        self.requests = 0     # requests it served
        self.rate = 0.0       # the same, each one's weight decaying by e every RATE_WINDOW
        self.last_used = now  # when its last request gave it back
        self.lent_at = now    # when its current request took it
        self.stale = False    # flushed while busy: closed when given back

    def rate_at(self, now):
        return self.rate * math.exp((self.lent_at - now) / RATE_WINDOW)

    def lend(self, now):
        """Count a request taking this state at `now`."""
        self.busy = True
        self.rate = self.rate_at(now) + 1.0
        self.requests += 1
        self.lent_at = now


class StatePool:
    def __init__(self, create, states, clones, retries, max_requests=0,
                 close=lambda state: state.close(), clock=time.monotonic):
        """`create(path, *context)` builds a loaded state (or raises); the pool only calls it
        outside its lock. `close(state)` closes a state the pool lets go of. `retries`: the
        longest moment, in ms (see above). A state is closed after `max_requests` requests
        (0: never). `clock()` gives the seconds that ages, rates and hold times are measured
        in."""
        self._create = create
        self._close = close
        self._clock = clock
        self.max_states = states
        self.max_clones = clones
        self.longest_moment = retries / 1000
        self.max_requests = max_requests
        # The request path takes the lock itself and wakes waiters only when there are any:
        # `with` on a Condition and its notify_all() are Python code, 7 calls and about 60
        # bytecode instructions a request (python3 -m bench.calls)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._scripts = {}   # path -> _Script, while it has states, loaded or loading
        # path -> seconds its requests typically hold a state (a moving average), while it
        # has states and once one was given back; read without the lock, for a guess (a
        # float): the request path's dict lookup costs no Python call
        self.holds = {}
        self._records = {}   # state -> its _Record
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
        """A state of `path` lent to the caller: an idle one, or a new one (`context` is
        passed to create), which may replace another script's idle state; see the policy
        above for when it waits."""
        with self._lock:   # the common case first, in a few steps
            script = self._scripts.get(path)
            if script is not None and script.idle and not self._closed:
                return self._lend_idle(script)
        victim = None
        patience = None   # when the moment's wait for our own script's state ends
        with self._lock:
            while True:
                if self._closed:
                    raise PoolClosed()
                now = self._clock()
                script = self._scripts.get(path)
                if script is not None and script.idle:
                    return self._lend_idle(script)
                count = len(script.states) + script.loading if script is not None else 0
                if count >= self.max_clones:
                    self._wait()
                    continue
                if self._total >= self.max_states:
                    if count:
                        if patience is None:
                            patience = time.monotonic() + self._moment(path)
                        left = patience - time.monotonic()
                        if left > 0:
                            self._wait(left)
                            continue
                    victim = self._choose_victim(now)
                    if victim is None:   # every state busy or loading: one is released soon
                        self._wait()
                        continue
                    self._remove(victim)
                    self.evicted += 1
                if script is None:
                    script = self._scripts[path] = _Script(path)
                script.loading += 1
                self._total += 1
                break
        if victim is not None:
            self._close(victim.state)
        try:
            state = self._create(path, *context)
        except BaseException:
            with self._cond:
                script.loading -= 1
                self._total -= 1
                self._forget_if_empty(script)
                self._cond.notify_all()
            raise
        with self._cond:
            script.loading -= 1
            record = self._records[state] = _Record(state, script, self._clock())
            script.states.append(record)
            self.created += 1
            record.lend(record.lent_at)
        return state

    def release(self, state, discard=False):
        """Give a state back; a discarded, stale or worn-out one is closed instead of kept."""
        with self._lock:
            record = self._records[state]
            record.last_used = now = self._clock()
            path, seconds, holds = record.script.path, now - record.lent_at, self.holds
            hold = holds.get(path)
            holds[path] = seconds if hold is None else hold + (seconds - hold) * HOLD_WEIGHT
            drop = self._settle(record, discard)
        if drop:
            self._close(state)

    def inspect(self, state, look):
        """look(state) with `state` lent to the caller, if it is idle now; else None (a busy
        state's runtime belongs to its worker: Lua is not for two threads at once). A look is
        not a use: the state's age and rate stay as they were."""
        with self._cond:
            record = self._records.get(state)
            if record is None or record.busy:
                return None
            self._take(record)
        try:
            return look(state)
        finally:
            with self._cond:
                drop = self._settle(record)
            if drop:
                self._close(state)

    # -- flushing -----------------------------------------------------------------------

    def flush(self, predicate=lambda state: True):
        """Close idle states for which predicate(state) is true; mark busy ones stale so
        they are closed when released. Returns how many states were flushed."""
        with self._cond:
            chosen = [r for r in self._records.values() if predicate(r.state)]
            closing = []
            for record in chosen:
                if record.busy:
                    record.stale = True
                else:
                    self._remove(record)
                    closing.append(record.state)
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

    # -- reading ------------------------------------------------------------------------

    def states(self):
        """A snapshot list of every loaded state (busy or idle)."""
        with self._cond:
            return list(self._records)

    def usage(self):
        """A snapshot list of (state, requests it served) for every loaded state."""
        with self._cond:
            return [(r.state, r.requests) for r in self._records.values()]

    def stats(self):
        with self._cond:
            busy = sum(r.busy for r in self._records.values())
            loading = self._total - len(self._records)
            return {"states": self._total, "busy": busy, "idle": len(self._records) - busy,
                    "loading": loading, "scripts": len(self._scripts),
                    "created": self.created, "evicted": self.evicted,
                    "flushed": self.flushed, "discarded": self.discarded,
                    "recycled": self.recycled, "waiting": self.waiting}

    # -- internals (lock held) ----------------------------------------------------------

    def _wait(self, timeout=None):
        self.waiting += 1
        try:
            self._cond.wait(timeout)
        finally:
            self.waiting -= 1

    def _lend_idle(self, script):
        """Lend `script`'s most recently used idle state (the others age)."""
        record = script.idle.pop()
        record.lend(self._clock())
        return record.state

    def _take(self, record):
        """Lend an idle state for a look (inspect)."""
        record.script.idle.remove(record)
        record.busy = True

    def _settle(self, record, discard=False):
        """Decide whether a state coming back is kept (idle) or dropped; True: close it."""
        record.busy = False
        recycle = not discard and 0 < self.max_requests <= record.requests
        drop = discard or recycle or record.stale or self._closed
        if drop:
            self.discarded += discard
            self.recycled += recycle
            self._remove(record)
        else:   # in the order of last use (a look leaves a state's age as it was)
            idle = record.script.idle
            place = len(idle)
            while place and idle[place - 1].last_used > record.last_used:
                place -= 1
            idle.insert(place, record)
        if self.waiting:
            self._cond.notify_all()
        return drop

    def _remove(self, record):
        script = record.script
        script.states.remove(record)
        if record in script.idle:
            script.idle.remove(record)
        del self._records[record.state]
        self._total -= 1
        self._forget_if_empty(script)

    def _forget_if_empty(self, script):
        if not script.states and not script.loading:
            del self._scripts[script.path]
            self.holds.pop(script.path, None)

    def _moment(self, path):
        """How long a request for a clone of `path` waits for one of its own states first."""
        hold = self.holds.get(path)
        if hold is None:
            return self.longest_moment
        return 2 * hold if 2 * hold <= self.longest_moment else 0.0

    def _choose_victim(self, now):
        """The idle state least worth keeping: idle longest, relative to its request rate. A
        script's requests go to its most recently used state first, so its busiest state
        carries its script's rate, and a clone only the requests that found the others busy:
        a hot script's state thus outlives a one-off script's state that was used more
        recently, a clone made for a moment of concurrency goes before another script's
        only state, and a script no longer asked for loses its rate within minutes. The idle
        time counts from one second, so that in a burst (all idle for milliseconds) the rate
        still decides."""
        victim, worst = None, -1.0
        for script in self._scripts.values():
            for record in script.idle:
                score = (now - record.last_used + 1.0) / (1.0 + record.rate_at(now))
                if score > worst:
                    victim, worst = record, score
        return victim
