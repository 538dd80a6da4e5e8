"""What pages write to standard output and standard error, into the error log line by line
(as php-fpm's catch_workers_output).

Lua's print and io.write write to the C library's standard output, which is fully buffered
when it is a file, a pipe or the journal, and a serving process ends with os._exit, which
flushes nothing: with one process the text appeared only at exit, with two never. Standard
error (io.stderr, a C module's fprintf(stderr), a process a page starts) went wherever the
daemon's went: the journal untagged, or /dev/null with --daemon. So each serving process
has both a pipe, line-buffered, and a thread logs each line that comes out of it (the
processes a page starts write there too).

Python's own sys.stdout and sys.stderr keep the original streams: the error log's handler
on standard error writes through sys.stderr (logs.py), and through the pipe each of its
lines would come back to be logged again. Python's tracebacks (an uncaught exception, in a
thread or at exit) and faulthandler's, when it is enabled, go there too.

What a process writes to file descriptor 2 (or 1) as it aborts (Py_FatalError, a Lua
panic, the C library's "free(): invalid pointer") its own thread cannot log: it dies with
the process. Under a supervisor (procman.supervised) the supervisor makes the pipes before
it forks (Pipes), keeps their read ends, as php-fpm's master does, and logs what is left in
them (up to _LEFT_AT_MOST) when it reaps the process; lost still is what the thread had
read and not logged (a line without its end). One process serving alone (no supervisor)
makes its own pipes, and loses all of it.
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
# bytes the supervisor reads at most from an ended process's pipe: a process the page
# started may write on (a pipe holds 64 KiB on Linux)
_LEFT_AT_MOST = 1 << 20

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


def thread_name(stream, process):
    """The name of the thread that logs `stream` ("stdout" or "stderr") of serving process
    `process` (None: the process runs alone), which its lines carry (before the pool's name,
    Config.thread_name)."""
    return stream if process is None else f"{stream}-{process}"


class Pipes:
    """A serving process's two pipes, which its supervisor makes before it forks it: the
    process writes into them and its Captures read them; the supervisor keeps the read ends,
    to log what the process wrote as it ended (drain)."""

    def __init__(self):
        self.ends = {}   # stream -> (read end, write end)
        try:
            for stream in _STREAMS:
                self.ends[stream] = os.pipe()   # not inheritable: a page's processes exec
        except OSError:
            self.close()
            raise

    def forked(self):
        """In the supervisor, once the process is forked: the write ends are the process's
        (the supervisor holding one, its pipe would never end)."""
        for stream, (read, write) in self.ends.items():
            os.close(write)
            self.ends[stream] = (read, None)

    def close(self):
        """Close what is open of them (in the supervisor, once drained; in the other serving
        processes, which inherit the read ends at their fork)."""
        for ends in self.ends.values():
            for end in ends:
                if end is not None:
                    os.close(end)
        self.ends = {}

    def drain(self, names, said):
        """The process has ended: log what is left in the pipes, each line under the name
        its thread (`names`: stream -> thread name) would have given it, after `said`; then
        close them. What is left is read without waiting: a process the page started may
        hold a write end, and write on."""
        for stream, (read, _) in self.ends.items():
            os.set_blocking(read, False)   # the process, which shared this end, is gone
            lines = Lines()
            left = _LEFT_AT_MOST
            try:
                while left > 0 and (chunk := os.read(read, min(left, 65536))):
                    left -= len(chunk)
                    for line in lines.add(chunk):
                        _log(line, names[stream], said)
            except BlockingIOError:
                pass
            for line in lines.end():
                _log(line, names[stream], said)
        self.close()


class Lines:
    """Bytes read from a stream, into lines."""

    def __init__(self):
        self.pending = b""

    def add(self, chunk):
        """The lines `chunk` ends; a line without end is given in pieces, not kept whole."""
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        whole = len(self.pending) - len(self.pending) % _LONGEST
        if whole:
            lines.append(self.pending[:whole])
            self.pending = self.pending[whole:]
        return lines

    def end(self):
        """The last line, which has no end, if any."""
        return [self.pending] if self.pending else []


class Capture:
    """One of this process's standard streams, from start() to stop(), into the error log."""

    def __init__(self, stream, name, ends=None):
        """`stream`: "stdout" or "stderr"; `name`: the reading thread's, which the log lines
        carry; `ends`: the pipe (read end, write end) its supervisor made (Pipes), else
        start() makes one."""
        self._fd, self._c_names = _STREAMS[stream]
        self._sys_name = stream
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ends = ends
        self._read = self._original = None

    def start(self):
        self._original = os.dup(self._fd)   # not inheritable: a page's processes get the pipe
        sys_stream = getattr(sys, self._sys_name)
        setattr(sys, self._sys_name, open(
            self._original, "w", encoding=sys_stream.encoding, errors=sys_stream.errors,
            buffering=1, closefd=False))
        if self._sys_name == "stderr" and faulthandler.is_enabled():
            faulthandler.enable(sys.stderr)   # it wrote to fd 2 itself
        self._read, write = self._ends or os.pipe()
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
        lines, name = Lines(), self._thread.name
        while chunk := os.read(self._read, 65536):
            for line in lines.add(chunk):
                _log(line, name)
        for line in lines.end():
            _log(line, name)
        os.close(self._read)


def _log(line, thread, said=""):
    """Log `line` (bytes) after `said`, under thread name `thread` (the supervisor speaks
    for an ended process's thread)."""
    # bytes that are not UTF-8 (or a character cut between pieces) are kept, for the log's
    # escaping to write as \xNN
    for at in range(0, max(len(line), 1), _LONGEST):
        text = said + line[at:at + _LONGEST].decode("utf-8", "surrogateescape")
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (text,), None)
        record.threadName = thread
        log.handle(record)
