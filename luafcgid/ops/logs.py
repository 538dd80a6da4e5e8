"""The logs, through Python logging: the error log (timestamps and the worker's name), and
the optional access log and slowlog. SIGUSR1 reopens them all (logrotate's postrotate).

A log that cannot be written (a full disk) never stops serving: the failure is reported on
standard error once, its lines are lost meanwhile, and writing resumes when it can. A file
that cannot be reopened keeps its old stream and is tried again every second.
"""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(message)s"

log = logging.getLogger("luafcgid")
access = logging.getLogger("luafcgid.access")
slow = logging.getLogger("luafcgid.slow")

_unopened = set()   # LogFiles whose last reopen failed


def _report(message):
    try:
        print(f"luafcgid: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):   # no standard error either (closed, or full too)
        pass


def _close(stream):
    """Close a stream whose buffered lines may fail to flush (the file descriptor is
    released all the same)."""
    try:
        stream.close()
    except OSError:
        pass


class LogFile(logging.FileHandler):
    """A log file whose write failures are reported once, not raised or repeated."""

    failing = False

    def __init__(self, path):
        super().__init__(path, encoding="utf-8")
        self._failed_now = False

    def emit(self, record):
        self._failed_now = False
        super().emit(record)
        if self.failing and not self._failed_now:
            self.failing = False
            _report(f"writing to {self.baseFilename} again")

    def handleError(self, record):
        self._failed_now = True
        if not self.failing:
            self.failing = True
            _report(f"cannot write to {self.baseFilename}: {sys.exc_info()[1]}; "
                    f"its lines are lost until it can be written")

    def close(self):
        try:
            super().close()
        except OSError:
            pass

    def reopen(self):
        """Open the file by name again; False (reported) when it cannot be opened."""
        try:
            stream = open(self.baseFilename, self.mode, encoding=self.encoding)
        except OSError as exc:
            _report(f"cannot reopen {self.baseFilename}: {exc}; still writing to the old "
                    f"file, trying again every second")
            return False
        # not setStream(), which flushes the old stream first and raises if that fails
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        if old is not None:
            _close(old)
        self.failing = False
        return True


def _route(logger, handlers, formatter):
    old = list(logger.handlers)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    for handler in old:
        logger.removeHandler(handler)
        handler.close()
        _unopened.discard(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def setup(logfile, to_stderr=True, access_log=None, slowlog=None):
    """Log to `logfile` (when set) and to standard error (when asked); the access log and
    the slowlog only go to their files, and are off when not set."""
    # every file is opened before any logger changes, so a file that cannot be opened
    # (OSError; a missing directory too: none is created) leaves the logging as it was
    handlers = [LogFile(logfile)] if logfile else []
    if to_stderr or not logfile:
        handlers.append(logging.StreamHandler(sys.stderr))
    access_handlers = [LogFile(access_log)] if access_log else []
    slow_handlers = [LogFile(slowlog)] if slowlog else []
    _route(log, handlers, logging.Formatter(FORMAT))
    # the access log line carries its own time stamp; its handlers stay empty when it is
    # off, which is what the request path checks
    _route(access, access_handlers, logging.Formatter("%(message)s"))
    _route(slow, slow_handlers, logging.Formatter("%(asctime)s [%(threadName)s] %(message)s"))


def files(config):
    """The log files the config names (for handing them to the user the daemon runs as)."""
    return [path for path in (config.logfile, config.access_log, config.slowlog) if path]


def _files():
    return [h for logger in (log, access, slow) for h in logger.handlers if isinstance(h, LogFile)]


def reopen():
    """Reopen every log file by name (SIGUSR1): after logrotate moved it away, new lines go
    to a new file instead of the renamed one."""
    for handler in _files():
        if handler.reopen():
            _unopened.discard(handler)
        else:
            _unopened.add(handler)
    log.info("SIGUSR1: log files reopened")


def retry():
    """Reopen the files whose last reopen failed (the main loops call this every second)."""
    for handler in list(_unopened):
        if handler.reopen():
            _unopened.discard(handler)
            log.info("reopened %s", handler.baseFilename)
