"""What pages write to standard output and standard error, into the error log line by line
(as php-fpm's catch_workers_output).

Lua's print and io.write write to the C library's standard output, which is fully buffered
when it is a file, a pipe or the journal, and a serving process ends with os._exit, which
flushes nothing: with one process the text appeared only at exit, with two never. Standard
error (io.stderr, a C module's fprintf(stderr), a process a page starts) went wherever the
daemon's went: the journal untagged, or /dev/null with --daemon. So each serving process
makes both a pipe, line-buffered, and a thread logs each line that comes out of it (the
processes a page starts write there too).

Python's own sys.stdout and sys.stderr keep the original streams: the error log's handler
on standard error writes through sys.stderr (logs.py), and through the pipe each of its
lines would come back to be logged again. Python's tracebacks (an uncaught exception, in a
thread or at exit) and faulthandler's, when it is enabled, go there too. What a process
writes to file descriptor 2 as it aborts (Py_FatalError, a Lua panic) is lost with the
thread that would have logged it.
"""

import ctypes
import faulthandler
import logging
import os
import sys
import threading

log = logging.getLogger("luafcgid")

_LINE_BUFFERED = 1   # setvbuf's _IOLBF (glibc, FreeBSD, macOS)
_LONGEST = 8192      # a longer line is logged in pieces of this many bytes
_DRAIN_WAIT = 1.0    # seconds stop waits for the last lines (a page's child may hold the pipe)

# each captured stream: its file descriptor, sys's name for it and the C library's names
# (glibc; FreeBSD and macOS)
_STREAMS = {"stdout": (1, ("stdout", "__stdoutp")),
            "stderr": (2, ("stderr", "__stderrp"))}

_libc = ctypes.CDLL(None)


def _c_stream(names):
    for name in names:
        try:
            return ctypes.c_void_p.in_dll(_libc, name)
        except ValueError:
            continue
    return None


class Capture:
    """One of this process's standard streams, from start() to stop(), into the error log."""

    def __init__(self, stream, name):
        """`stream`: "stdout" or "stderr"; `name`: the reading thread's, which the log lines
        carry."""
        self._fd, self._c_names = _STREAMS[stream]
        self._sys_name = stream
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._read = self._original = None

    def start(self):
        self._original = os.dup(self._fd)   # not inheritable: a page's processes get the pipe
        sys_stream = getattr(sys, self._sys_name)
        setattr(sys, self._sys_name, open(
            self._original, "w", encoding=sys_stream.encoding, errors=sys_stream.errors,
            buffering=1, closefd=False))
        if self._sys_name == "stderr" and faulthandler.is_enabled():
            faulthandler.enable(sys.stderr)   # it wrote to fd 2 itself
        self._read, write = os.pipe()
        os.dup2(write, self._fd)   # inheritable: the processes a page starts write here too
        os.close(write)
        # line-buffered whatever the C library or PYTHONUNBUFFERED made it: standard output
        # was fully buffered (see above), or unbuffered with PYTHONUNBUFFERED, and standard
        # error unbuffered (a line a page writes in pieces was as many writes)
        c_stream = _c_stream(self._c_names)
        if c_stream is not None:
            _libc.setvbuf(c_stream, None, _LINE_BUFFERED, 0)
        self._thread.start()

    def stop(self):
        """Log what is still buffered and give the stream back its original."""
        _libc.fflush(None)
        os.dup2(self._original, self._fd)
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
