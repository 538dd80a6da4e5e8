"""The logs, through Python logging: the error log (timestamps and the worker's name), to
a file or to the system logger (logfile: syslog), and the optional access log and slowlog.
SIGUSR1 reopens the files (logrotate's postrotate).

Every line is escaped as it is written (escape()): a request names its script, URI and method,
and a script writes con:log and its error messages, so any of them could otherwise carry a
line feed and forge a line (nginx decodes "%0a" in a URI into SCRIPT_FILENAME). The error
log escapes each whole message, whatever built it; the access log's line escapes each field
(access_format.py) and the slowlog, whose entries span lines on purpose, its fields
(slowlog.py).

A log that cannot be written (a full disk) never stops serving: the failure is reported on
standard error once, its lines are lost meanwhile, and writing resumes when it can. A file
that cannot be reopened keeps its old stream and is tried again every second.
"""

import logging
import os
import re
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
# pool name -> (its access log's handlers, its slowlog's), as setup() opened them: the
# supervisor holds every pool's for the processes it forks, a serving process its own
_pools = {}
# path -> the error log's LogFile in a serving process whose user may not open the file
# again (keep_unopenable())
_kept = {}

# What a log line does not carry as it is: C0 and C1 control characters (CR and LF would
# start a forged line; ESC drives terminals), DEL, Unicode's line and paragraph separators,
# the backslash (the escape's own mark, so that \x0A in a line always stands for a byte
# that was there) and surrogates (a byte that was not UTF-8, as os.fsdecode and decode's
# "surrogateescape" keep it). Tab and line feed are apart, for the slowlog's entries, which
# keep a line feed followed by a tab: the line it starts is a continuation, never an entry
# of its own.
_OTHERS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\\\\\ud800-\udfff"
_UNSAFE = re.compile(f"[\t\n{_OTHERS}]")
_UNSAFE_IN_ENTRY = re.compile(f"\n(?!\t)|(?<!\n)\t|[{_OTHERS}]")


def _hex(match):
    char = match.group()
    if "\udc80" <= char <= "\udcff":   # the byte that was not UTF-8
        return "\\x%02X" % (ord(char) - 0xDC00)
    return "".join(["\\x%02X" % byte for byte in char.encode("utf-8", "surrogatepass")])


def escape(text, continued=False):
    """`text` (a str, or bytes as a request carried them) for a log line: each byte that
    could forge or garble a line written as \\xNN, as nginx writes them (a line feed as
    \\x0A, a backslash as \\x5C), as are bytes that are not UTF-8. `continued`: keep the
    line breaks that a tab follows."""
    if type(text) is bytes:
        text = text.decode("utf-8", "surrogateescape")
    # clean text, the common case, is found at C speed: str.isprintable() is false for
    # every character above but the backslash (0.3 us for an access log line; the regex
    # search took 0.65 us)
    if text.isprintable() and "\\" not in text:
        return text
    return (_UNSAFE_IN_ENTRY if continued else _UNSAFE).sub(_hex, text)


class EscapingFormatter(logging.Formatter):
    """Writes each message escaped (escape()), on one line; an exception's traceback, which
    the daemon's own code raised, follows it as Python formats it."""

    def formatMessage(self, record):
        # format() makes record.message anew for each handler: escaping it is not repeated
        record.message = escape(record.message)
        return super().formatMessage(record)


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


class Syslog(logging.Handler):
    """The error log sent to the system logger's Unix datagram socket (journald and rsyslog
    listen on /dev/log), as "<PRI>ident[pid]: [thread] message", the form syslog(3) sends.
    A logger that is not there is refused at setup (OSError); one that goes away later is
    reported once, like a file that cannot be written, and each line tries to reach it
    again, so lines flow once it is back. (Not logging.handlers.SysLogHandler: importing it
    cost each process 1.5 MB, and it ignores a logger that is not there.)"""

    _PRIORITIES = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}

    def __init__(self, address, facility, ident):
        """`facility`: its code (settings.SYSLOG_FACILITIES)."""
        super().__init__()
        self.address, self.facility, self.ident = address, facility, ident
        self.failing = False
        self.sock = self._connect()

    def _connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.address)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot reach the system logger at {self.address}: "
                                     f"{exc.strerror}") from None
        return sock

    def emit(self, record):
        try:
            # the process id at the time of the line: serving processes are forked after
            # setup
            line = (f"<{self.facility * 8 + self._PRIORITIES.get(record.levelname, 6)}>"
                    f"{self.ident}[{os.getpid()}]: {self.format(record)}").encode()
            try:
                self.sock.send(line)
            except OSError:   # the logger restarted (a new socket) or is gone
                self.sock.close()
                self.sock = self._connect()
                self.sock.send(line)
        except OSError as exc:
            if not self.failing:
                self.failing = True
                _report(f"cannot send the log to {self.address}: {exc}; its lines are lost "
                        f"until the system logger takes them")
            return
        if self.failing:
            self.failing = False
            _report(f"sending the log to {self.address} again")

    def close(self):
        self.sock.close()
        super().close()


class StandardError(logging.StreamHandler):
    """The error log on standard error, through sys.stderr as it is at each line: a serving
    process points sys.stderr at a copy of the original when it makes file descriptor 2 a
    pipe into this log (catch_output.py), or each line would come back through the pipe."""

    def __init__(self):
        logging.Handler.__init__(self)   # not StreamHandler's, which keeps a stream

    @property
    def stream(self):
        return sys.stderr


def _route(logger, handlers, formatter):
    old = list(logger.handlers)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    for handler in old:
        if handler in handlers:
            continue
        logger.removeHandler(handler)
        handler.close()
        _unopened.discard(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def setup(logfile, to_stderr=True, pools=None, syslog=None, serving=None):
    """Log to `logfile` (when set) and to standard error (when asked), or with logfile
    "syslog" to the system logger only, Syslog(*syslog) (address, facility, ident).
    `pools`: pool name -> (access_log, slowlog), each a path or None (off), opened here; the
    access log and the slowlog only go to pool `serving`'s files (see serve())."""
    global _pools
    # every file (and the system logger) is opened before any logger changes, so one that
    # cannot be opened (OSError; a missing directory too: none is created) leaves the
    # logging as it was
    if logfile == SYSLOG:
        handlers, formatter = [Syslog(*syslog)], EscapingFormatter(SYSLOG_FORMAT)
    else:
        handlers = [_kept.get(os.path.abspath(logfile)) or LogFile(logfile)] if logfile else []
        formatter = EscapingFormatter(FORMAT)
        if to_stderr or not logfile:
            handlers.append(StandardError())
    opened = {}
    try:
        for name, paths in (pools or {}).items():
            opened[name] = tuple([LogFile(path)] if path else [] for path in paths)
    except OSError:
        _close_pools(opened)
        raise
    _route(log, handlers, formatter)
    _close_pools(_pools)
    _pools = opened
    serve(serving)


def _close_pools(pools):
    """Close the handlers of `pools` (setup()'s) that no logger routes to."""
    routed = set(access.handlers + slow.handlers)
    for handler in _pool_handlers(pools):
        if handler not in routed:
            handler.close()
            _unopened.discard(handler)


def _pool_handlers(pools):
    return [handler for both in pools.values() for handlers in both for handler in handlers]


def serve(pool):
    """Write the access log and the slowlog to pool `pool`'s files (none: None), and let go
    of the other pools' (a pool's serving process writes only its own)."""
    global _pools
    own = _pools.get(pool, ([], []))
    # the access log line carries its own time stamp, and access_format escaped each field
    # (a JSON line's quotes and backslashes must stay); its handlers stay empty when it is
    # off, which is what the request path checks
    _route(access, own[0], logging.Formatter("%(message)s"))
    # a slowlog entry spans lines: slowlog.py escapes its fields
    _route(slow, own[1], logging.Formatter("%(asctime)s [%(threadName)s] %(message)s"))
    if pool is not None:
        _close_pools({name: both for name, both in _pools.items() if name != pool})
        _pools = {pool: own}


def files(config):
    """The daemon's log files the config names (for handing them to the user the daemon
    runs as); pool_files() has each pool's."""
    return [config.logfile] if config.logfile and config.logfile != SYSLOG else []


def pool_files(pool):
    """A pool's access log and slowlog (those it names)."""
    return [path for path in (pool.access_log, pool.slowlog) if path]


def keep_unopenable():
    """In a serving process that became its pool's user: an error log file that user may
    not open (it is root's, when the pools run as different users) is kept as inherited and
    never reopened, by SIGUSR1 or a reload: its lines go on to the file the supervisor
    opened, until SIGUSR1 has the supervisor replace the process (supervisor.reopen).
    (logfile: syslog has no file to keep.)"""
    for handler in log.handlers:
        if isinstance(handler, LogFile) and not os.access(handler.baseFilename, os.W_OK):
            _kept[handler.baseFilename] = handler


def _files():
    every = [h for logger in (log, access, slow) for h in logger.handlers] + _pool_handlers(_pools)
    return [h for h in dict.fromkeys(every)
            if isinstance(h, LogFile) and h not in _kept.values()]


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
