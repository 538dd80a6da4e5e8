"""The error log: Python logging with timestamps and the worker's name."""

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(message)s"

log = logging.getLogger("luafcgid")


def setup(logfile, to_stderr=True):
    """Log to `logfile` (when set) and to standard error (when asked)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(FORMAT)
    handlers = []
    if logfile:
        handlers.append(logging.FileHandler(logfile, encoding="utf-8"))
    if to_stderr or not logfile:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
