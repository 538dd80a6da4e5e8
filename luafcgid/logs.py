"""The logs, through Python logging: the error log (timestamps and the worker's name), and
the optional access log and slowlog. SIGUSR1 reopens them all (logrotate's postrotate)."""

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(message)s"

log = logging.getLogger("luafcgid")
access = logging.getLogger("luafcgid.access")
slow = logging.getLogger("luafcgid.slow")


def _route(logger, handlers, formatter):
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def setup(logfile, to_stderr=True, access_log=None, slowlog=None):
    """Log to `logfile` (when set) and to standard error (when asked); the access log and
    the slowlog only go to their files, and are off when not set."""
    # every file is opened before any logger changes, so a file that cannot be opened
    # (OSError) leaves the logging as it was
    for path in (logfile, access_log, slowlog):
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
    handlers = [logging.FileHandler(logfile, encoding="utf-8")] if logfile else []
    if to_stderr or not logfile:
        handlers.append(logging.StreamHandler(sys.stderr))
    access_handlers = [logging.FileHandler(access_log, encoding="utf-8")] if access_log else []
    slow_handlers = [logging.FileHandler(slowlog, encoding="utf-8")] if slowlog else []
    _route(log, handlers, logging.Formatter(FORMAT))
    # the access log line carries its own time stamp; its handlers stay empty when it is
    # off, which is what the request path checks
    _route(access, access_handlers, logging.Formatter("%(message)s"))
    _route(slow, slow_handlers, logging.Formatter("%(asctime)s [%(threadName)s] %(message)s"))


def files(config):
    """The log files the config names (for handing them to the user the daemon runs as)."""
    return [path for path in (config.logfile, config.access_log, config.slowlog) if path]


def reopen():
    """Reopen every log file by name (SIGUSR1): after logrotate moved it away, new lines go
    to a new file instead of the renamed one. A file that cannot be opened keeps the old."""
    for logger in (log, access, slow):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                try:
                    stream = open(handler.baseFilename, handler.mode, encoding=handler.encoding)
                except OSError as exc:
                    log.error("SIGUSR1: cannot reopen %s: %s", handler.baseFilename, exc)
                    continue
                old = handler.setStream(stream)
                if old is not None:
                    old.close()
    log.info("SIGUSR1: log files reopened")
