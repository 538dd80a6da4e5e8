"""What pages print, into the error log line by line (as php-fpm's catch_workers_output).

Lua's print and io.write write to the C library's standard output, which is fully buffered
when it is a file, a pipe or the journal, and a serving process ends with os._exit, which
flushes nothing: with one process the text appeared only at exit, with two never. So each
serving process makes its standard output a pipe, line-buffered, and a thread logs each
line that comes out of it (the processes a page starts write there too).
"""

import ctypes
import logging
import os
import threading

log = logging.getLogger("luafcgid")

_LINE_BUFFERED = 1   # setvbuf's _IOLBF (glibc, FreeBSD, macOS)
_LONGEST = 8192      # a longer line is logged in pieces of this many bytes
_DRAIN_WAIT = 1.0    # seconds stop waits for the last lines (a page's child may hold the pipe)

_libc = ctypes.CDLL(None)


def _c_stdout():
    for name in ("stdout", "__stdoutp"):   # glibc; FreeBSD and macOS
        try:
            return ctypes.c_void_p.in_dll(_libc, name)
        except ValueError:
            continue
    return None


class Capture:
    """This process's standard output, from start() to stop(), into the error log."""

    def __init__(self, name):
        """`name`: the reading thread's, which the log lines carry."""
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._read = None

    def start(self):
        self._read, write = os.pipe()
        os.dup2(write, 1)   # inheritable: the processes a page starts write here too
        os.close(write)
        stream = _c_stdout()
        if stream is not None:   # with PYTHONUNBUFFERED Python made it unbuffered
            _libc.setvbuf(stream, None, _LINE_BUFFERED, 0)
        self._thread.start()

    def stop(self):
        """Log what is still buffered and release standard output (to /dev/null)."""
        _libc.fflush(None)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        self._thread.join(_DRAIN_WAIT)

    def _run(self):
        pending = b""
        while chunk := os.read(self._read, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            whole = len(pending) - len(pending) % _LONGEST
            if whole:   # a line without end: logged in pieces, not kept whole
                lines.append(pending[:whole])
                pending = pending[whole:]
            for line in lines:
                _log(line)
        if pending:
            _log(pending)
        os.close(self._read)


def _log(line):
    # bytes that are not UTF-8 (or a character cut between pieces) are kept, for the log's
    # escaping to write as \xNN
    for at in range(0, max(len(line), 1), _LONGEST):
        log.info("%s", line[at:at + _LONGEST].decode("utf-8", "surrogateescape"))
