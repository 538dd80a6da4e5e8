"""The logs, through Python logging: the error log (timestamps and the worker's name), to
a file or to the system logger (logfile: syslog), and the optional access log and slowlog.
SIGUSR1 reopens the files (logrotate's postrotate).

A log that cannot be written (a full disk) never stops serving: the failure is reported on
standard error once, its lines are lost meanwhile, and writing resumes when it can. A file
that cannot be reopened keeps its old stream and is tried again every second.
"""

import logging
import logging.handlers
import os
import socket
import sys

FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(message)s"
# the system logger stamps the time, and the level is the line's priority
SYSLOG_FORMAT = "[%(threadName)s] %(message)s"
SYSLOG = "syslog"   # the logfile that means the system logger

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


class Syslog(logging.handlers.SysLogHandler):
    """The error log sent to the system logger's Unix datagram socket (journald and rsyslog
    listen on /dev/log), as "<PRI>ident[pid]: [thread] message", the form syslog(3) sends.
    A logger that is gone or refuses is reported once, like a file that cannot be written;
    each line tries the socket again (SysLogHandler reconnects), so lines flow once it is
    back."""

    failing = False

    def __init__(self, address, facility, ident):
        # SysLogHandler, like openlog(3), ignores a logger that is not there: a wrong
        # syslog_address is refused here instead (OSError), at start and at reload
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot reach the system logger at {address}: "
                                         f"{exc.strerror}") from None
        super().__init__(address, self.facility_names[facility], socket.SOCK_DGRAM)
        self._failed_now = False
        self.append_nul = False   # not in RFC 3164; rsyslog writes it into the line
        self.label = ident

    def format(self, record):
        # the process id at the time of the line: serving processes are forked after setup
        return f"{self.label}[{os.getpid()}]: {super().format(record)}"

    def emit(self, record):
        self._failed_now = False
        super().emit(record)
        if self.failing and not self._failed_now:
            self.failing = False
            _report(f"sending the log to {self.address} again")

    def handleError(self, record):
        self._failed_now = True
        if not self.failing:
            self.failing = True
            _report(f"cannot send the log to {self.address}: {sys.exc_info()[1]}; its lines "
                    f"are lost until the system logger takes them")


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


def setup(logfile, to_stderr=True, access_log=None, slowlog=None, syslog=None):
    """Log to `logfile` (when set) and to standard error (when asked), or with logfile
    "syslog" to the system logger only, Syslog(*syslog) (address, facility, ident); the
    access log and the slowlog only go to their files, and are off when not set."""
    # every file (and the system logger) is opened before any logger changes, so one that
    # cannot be opened (OSError) leaves the logging as it was
    files = [path for path in (logfile, access_log, slowlog) if path and path != SYSLOG]
    for path in files:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if logfile == SYSLOG:
        handlers, formatter = [Syslog(*syslog)], logging.Formatter(SYSLOG_FORMAT)
    else:
        handlers, formatter = [LogFile(logfile)] if logfile else [], logging.Formatter(FORMAT)
        if to_stderr or not logfile:
            handlers.append(logging.StreamHandler(sys.stderr))
    access_handlers = [LogFile(access_log)] if access_log else []
    slow_handlers = [LogFile(slowlog)] if slowlog else []
    _route(log, handlers, formatter)
    # the access log line carries its own time stamp; its handlers stay empty when it is
    # off, which is what the request path checks
    _route(access, access_handlers, logging.Formatter("%(message)s"))
    _route(slow, slow_handlers, logging.Formatter("%(asctime)s [%(threadName)s] %(message)s"))


def files(config):
    """The log files the config names (for handing them to the user the daemon runs as)."""
    return [path for path in (config.logfile, config.access_log, config.slowlog)
            if path and path != SYSLOG]


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
