"""One record per worker thread, like php-fpm's scoreboard entry (fpm_request.c): the stage it
is in, the request it serves (once idle, the last it served) as the responder resolved it,
its counters, and the call into Lua it runs. ops/describe.py words the request for the log
lines about it, ops/access_format.py for the access log; the status page lists the records
as php-fpm lists its processes.

Its worker writes it with plain attribute stores, no lock: readers on other threads (the
status page, the watcher) may see a request late, which is all they promise. What a request
costs to measure is taken only when something reads it (configure): the clock at its end
for the slowlog's count, the access log and the status page, the thread's CPU clock and the
state's memory for the status page and an access_format that shows them. Only a call into
Lua that something may interrupt is watched, under the record's lock (enter and leave): one
on a state with a request_timeout, or any while the slowlog is on. The watcher thread arms
hooks on the running state only under that lock, so a hook never lands on the next call;
check(now) makes its decisions, the deadline's and the slowlog's, together.
"""

import logging
import threading
import time

log = logging.getLogger("luafcgid")

_monotonic = time.monotonic
_thread_time = time.thread_time
_get_ident = threading.get_ident

IDLE, READING, RUNNING, FINISHING = range(4)
# The stages by the names php-fpm gives them (fpm_request_get_stage_name), which its status
# page shows and its exporters count: waiting for a connection; reading a request from one;
# answering a complete request (its script runs); the response went out and the finish
# handler runs.
STAGES = ("Idle", "Reading headers", "Running", "Finishing")

# what check() found due
STUCK = 1   # the running call was given up on just now
SLOW = 2    # the request ran longer than slowlog_timeout: report it (once)


class Worker:
    __slots__ = ("number", "name", "thread", "ident", "tid", "born", "stage", "requests",
                 "failed", "slow", "started", "params", "script", "seconds", "status", "sent",
                 "head", "cpu", "cpu_started", "memory", "slow_after", "watched", "access",
                 "timed", "measure_cpu", "measure_memory", "out_lock", "lock", "state",
                 "call_started", "deadline", "expired", "stuck", "abandon", "reported", "duty")

    def __init__(self, number, name):
        self.number = number
        self.name = name
        self.thread = None       # the threading.Thread serving as this worker
        self.ident = None        # its thread's id, once it runs (threading.get_ident)
        self.tid = 0             # and the kernel's (the status page's "pid", as ps -L shows)
        self.born = time.time()  # Unix time it started
        self.stage = IDLE
        self.requests = 0        # requests answered
        self.failed = 0          # answered with a 5xx status
        self.slow = 0            # ran longer than slowlog_timeout
        self.started = 0.0       # monotonic time the request being served began
        self.params = None       # its FastCGI params, encoded
        self.script = None       # its script as the responder resolved it (bytes)
        # the last request answered, when measured (see configure): its seconds, status,
        # bytes sent and first bytes (for the access log), CPU seconds of the thread, and
        # its state's memory (bytes)
        self.seconds = 0.0
        self.status = self.sent = 0
        self.head = None
        self.cpu = self.cpu_started = 0.0
        self.memory = 0
        # set by configure(): slowlog_timeout (None: off); whether every Lua call is
        # watched (the slowlog is written); access(worker) writing the access log line, or
        # None; whether the end of a request is timed, the thread's CPU clock read, the
        # state's memory taken
        self.slow_after = None
        self.watched = False
        self.access = None
        self.timed = self.measure_cpu = self.measure_memory = False
        # the responses it writes, under which the watcher may complete one (abandon)
        self.out_lock = threading.RLock()
        # the watched call into Lua, under `lock`
        self.lock = threading.Lock()
        self.state = None        # the LuaState it runs in; None between calls
        self.call_started = 0.0
        self.deadline = None     # monotonic; None without a request_timeout
        self.expired = False     # the deadline passed during the (last) call
        self.stuck = 0.0         # monotonic time the running call was given up on; 0.0 if not
        self.abandon = None      # answers the request at once; returns False to be retried
        self.reported = -1       # `requests` when the slowlog reported the request
        self.duty = None         # its process's states.duty.Duty, when it serves FastCGI

    def configure(self, slow_after, watched, access, status_page, measure_cpu,
                  measure_memory):
        """slowlog_timeout (None: off); whether the slowlog is written (every call into Lua
        is then watched); access(worker), the access log's writer (None: no access log);
        whether the status page is served (it shows the last request's duration); whether
        a request's CPU time and its state's memory are taken."""
        self.slow_after, self.watched, self.access = slow_after, watched, access
        self.timed = slow_after is not None or access is not None or status_page
        self.measure_cpu, self.measure_memory = measure_cpu, measure_memory

    def run_here(self):
        """Called on the worker's own thread as it starts: its ids and start time."""
        self.ident, self.tid, self.born = _get_ident(), threading.get_native_id(), time.time()

    # -- the request, on the worker's thread ----------------------------------------------

    def begin(self, params):
        """A request with `params` (encoded) begins."""
        self.params = params
        self.script = None
        self.started = _monotonic()
        # (0.0: not taken, when the measure was switched on during the request)
        self.cpu_started = _thread_time() if self.measure_cpu else 0.0
        self.stage = RUNNING

    def end(self, out):
        """Count the request just answered through `out` (a connection.Output: its
        `status`, `sent` and `first` bytes). The request stays in the record until the next
        begins, for the status page."""
        self.stage = READING
        self.requests += 1
        status = out.status
        if status >= 500:
            self.failed += 1
        if self.timed:
            seconds = self.seconds = _monotonic() - self.started
            if self.measure_cpu and self.cpu_started:
                self.cpu = _thread_time() - self.cpu_started
            if self.slow_after is not None and seconds > self.slow_after:
                self.slow += 1
            if self.access is not None:
                self.status, self.sent, self.head = status, out.sent, out.first
                self.access(self)
        self.abandon = None

    def off_duty(self):
        """Let another worker take connections while this one serves (duty.py)."""
        if self.duty is not None:
            self.duty.give(self)

    # -- a watched call into Lua, on the worker's thread ----------------------------------

    def enter(self, state):
        """A call into `state` begins; afterwards `expired` tells whether it ran past its
        deadline (then the state is not to be used again)."""
        now = _monotonic()
        with self.lock:
            self.ident = _get_ident()
            self.state, self.call_started, self.expired, self.stuck = state, now, False, 0.0
            self.deadline = now + state.timeout if state.timeout > 0 else None

    def leave(self, state):
        with self.lock:
            state.hooks.release(*state.threads)
            if self.stuck:
                log.warning("%s: the call given up on %.1f s ago returned; serving again",
                            self.name, _monotonic() - self.stuck)
            self.state = self.deadline = None
            self.stuck = 0.0

    # -- from the watcher thread ----------------------------------------------------------

    def check(self, now, grace):
        """The watcher's decisions at `now` (monotonic), made together: a call past its
        deadline is stopped (its stop hook armed again at every tick, in case the script
        took it off), and given up on once it still runs `grace` seconds later (then its
        client is answered at once, by `abandon`, retried until it can be); a request
        running longer than slow_after is reported once. Returns STUCK and SLOW bits."""
        due = 0
        if (self.slow_after is not None and self.stage >= RUNNING
                and now - self.started > self.slow_after and self.reported != self.requests):
            self.reported = self.requests
            due |= SLOW
        if self.deadline is None:
            return due
        with self.lock:
            state = self.state
            if state is None or self.deadline is None or now < self.deadline:
                return due
            self.expired = True
            state.hooks.stop(*state.threads)
            if now >= self.deadline + grace:
                if not self.stuck:
                    self.stuck = now
                    due |= STUCK
                # an answer that cannot go out now (the worker is writing) is tried again
                if self.abandon is not None and self.abandon():
                    self.abandon = None
        return due

    def trace(self, write):
        """Have write(traceback) called on this worker's thread at the next Lua instruction
        of the request the slowlog reported, or write(None) when that request ended or was
        stopped first. False when it is not running Lua."""
        reported = self.reported
        with self.lock:
            state = self.state
            if state is None or self.expired or self.requests != reported:
                return False
            hooks = state.hooks

            def fired(L):
                same = (L is not None and _get_ident() == self.ident
                        and self.requests == reported)
                write(hooks.traceback(L) if same else None)

            hooks.call_once(state.threads[0], fired, self.ident)
        return True


class Workers:
    """A process's worker records, in the order they were added (a stuck worker's
    replacement adds one), and the settings every one of them follows."""

    def __init__(self, name):
        """name(number) is the name of worker `number`'s thread."""
        self._name = name
        self._all = []
        self._lock = threading.Lock()
        self._settings = (None, False, None, False, False, False)

    def add(self):
        with self._lock:
            worker = Worker(len(self._all) + 1, self._name(len(self._all) + 1))
            worker.configure(*self._settings)
            self._all.append(worker)
        return worker

    def remove(self, worker):
        with self._lock:
            self._all.remove(worker)

    def configure(self, *settings):
        """Worker.configure(*settings) for each worker, now and added later."""
        with self._lock:
            self._settings = settings
            for worker in self._all:
                worker.configure(*settings)

    def __iter__(self):
        return iter(tuple(self._all))

    def __len__(self):
        return len(self._all)

    def totals(self):
        """(requests, failed, slow, active workers), summed over the workers."""
        requests = failed = slow = active = 0
        for worker in tuple(self._all):
            requests += worker.requests
            failed += worker.failed
            slow += worker.slow
            active += worker.stage != IDLE
        return requests, failed, slow, active
