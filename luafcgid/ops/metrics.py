"""Request counters, kept per worker thread, and the access log line.

Each worker writes only its own WorkerStats, so the counters need no lock and `+=` cannot
lose an update; readers (the status page, systemd's STATUS=) add them up and may see a
request or two late, which is all a status page promises. This runs on every request:
keep it short.
"""

import threading
import time

from .logs import access as access_log

_monotonic = time.monotonic

# the worker thread's own WorkerStats, for code that runs on it without being handed it
# (the slowlog's Lua hook)
current_worker = threading.local()


class WorkerStats:
    __slots__ = ("number", "metrics", "requests", "failed", "slow", "started", "params",
                 "window")

    def __init__(self, number, metrics):
        self.number = number
        self.metrics = metrics
        self.requests = 0       # requests answered
        self.failed = 0         # answered with a 5xx status
        self.slow = 0           # ran longer than slowlog_timeout
        self.started = 0.0      # monotonic start of the request being served; 0.0 when idle
        self.params = None      # its FastCGI params
        self.window = None      # its deadline.Window (set by the server)

    def begin(self, params):
        self.params = params
        self.started = _monotonic()

    def end(self, out):
        """Count the request answered through `out` (a connection.Output)."""
        seconds = _monotonic() - self.started
        self.started = 0.0
        self.requests += 1
        status = out.status
        if status >= 500:
            self.failed += 1
        slow_after = self.metrics.slow_after
        if slow_after is not None and seconds > slow_after:
            self.slow += 1
        if access_log.handlers:
            self._log(status, out.sent, seconds)
        self.params = None

    def _log(self, status, sent, seconds):
        params = self.params
        get = params.get
        # bytes that are not UTF-8 are kept (surrogateescape) for the formatter's \xNN
        access_log.info("%s %s %s %d %d %.6f %s",
                        time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        get(b"REQUEST_METHOD", b"-").decode(errors="surrogateescape"),
                        get(b"REQUEST_URI", b"-").decode(errors="surrogateescape"),
                        status, sent, seconds,
                        get(b"SCRIPT_FILENAME", b"-").decode(errors="surrogateescape"))


class Metrics:
    """Every worker's counters, and the process's start time."""

    def __init__(self, workers, slow_after):
        self.started = time.time()
        self.started_monotonic = _monotonic()
        self.slow_after = slow_after
        self.workers = [WorkerStats(number, self) for number in range(1, workers + 1)]

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
