"""Request counters, kept per worker thread, and the access log line (access_format.py
words it).

Each worker writes only its own WorkerStats, so the counters need no lock and `+=` cannot
lose an update; readers (the status page, systemd's STATUS=) add them up and may see a
request or two late, which is all a status page promises. This runs on every request:
keep it short.
"""

import threading
import time

from .logs import access as access_log

_monotonic = time.monotonic
_thread_time = time.thread_time

# the worker thread's own WorkerStats, for code that runs on it without being handed it
# (the slowlog's Lua hook)
current_worker = threading.local()


class WorkerStats:
    __slots__ = ("number", "metrics", "requests", "failed", "slow", "started", "params",
                 "window", "script", "status", "sent", "seconds", "head", "cpu", "cpu_started",
                 "memory", "tid", "born")

    def __init__(self, number, metrics):
        self.number = number
        self.metrics = metrics
        self.requests = 0       # requests answered
        self.failed = 0         # answered with a 5xx status
        self.slow = 0           # ran longer than slowlog_timeout
        self.started = 0.0      # monotonic start of the request being served; 0.0 when idle
        self.params = None      # its FastCGI params (when idle, the last request's)
        self.window = None      # its deadline.Window (set by the server)
        self.script = None      # the script the responder resolved (bytes)
        self.tid = 0            # its thread's id (native), and when it started (Unix time)
        self.born = time.time()
        # the last request answered, for the access log and the status page: status, bytes
        # sent, seconds, its response's first bytes, and when measured its CPU seconds and
        # its state's memory
        self.status = self.sent = 0
        self.seconds = 0.0
        self.head = None
        self.cpu = self.cpu_started = 0.0
        self.memory = 0

    def begin(self, params):
        self.params = params
        self.script = None
        self.memory = 0
        self.started = _monotonic()
        if self.metrics.measure_cpu:
            self.cpu_started = _thread_time()

    def end(self, out):
        """Count the request answered through `out` (a connection.Output)."""
        seconds = _monotonic() - self.started
        metrics = self.metrics
        if metrics.measure_cpu:
            self.cpu = _thread_time() - self.cpu_started
        self.seconds = seconds
        self.started = 0.0
        self.requests += 1
        status = out.status
        if status >= 500:
            self.failed += 1
        slow_after = metrics.slow_after
        if slow_after is not None and seconds > slow_after:
            self.slow += 1
        access = metrics.access
        if access is not None:
            self.status, self.sent, self.head = status, out.sent, out.first
            access_log.info("%s", access.render(self))


class Metrics:
    """Every worker's counters, and the process's start time."""

    def __init__(self, workers, slow_after):
        self.started = time.time()
        self.started_monotonic = _monotonic()
        self.slow_after = slow_after
        # the access log's compiled access_format (None when it is off), and whether a
        # request's CPU time and its state's memory are taken, for it
        self.access = None
        self.measure_cpu = self.measure_memory = False
        self.workers = [WorkerStats(number, self) for number in range(1, workers + 1)]

    def configure(self, access, status_page):
        """Write the access log with `access` (an access_format.Format), or not (None);
        `status_page`: the status page is served, whose full form shows each worker's last
        request's CPU and memory. A thread's CPU clock costs about 0.5 us a read (two a
        request), its state's memory 0.1 us: taken only for them."""
        self.access = access
        self.measure_cpu = status_page or (access is not None and access.measure_cpu)
        self.measure_memory = status_page or (access is not None and access.measure_memory)

    def add_worker(self):
        """Counters for one more worker (in place of one stuck in Lua: server.py)."""
        worker = WorkerStats(len(self.workers) + 1, self)
        self.workers.append(worker)
        return worker

    def uptime(self):
        return _monotonic() - self.started_monotonic

    def totals(self):
        """(requests, failed, slow, active workers), summed over the workers."""
        requests = failed = slow = active = 0
        for worker in self.workers:
            requests += worker.requests
            failed += worker.failed
            slow += worker.slow
            active += worker.started != 0.0
        return requests, failed, slow, active
