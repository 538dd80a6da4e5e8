"""The responder side of one FastCGI connection: parse what has arrived, answer the requests
that are complete.

A worker thread takes a connection only when it has bytes to read (or was just accepted),
reads what is there without waiting, and hands it back to the acceptor (parked, with its
parser holding any partial request) as soon as nothing more has arrived: a slow or stalled
client never holds a worker. Requests are not multiplexed (FCGI_MPXS_CONNS is 0), but with
FCGI_KEEP_CONN several follow each other on a connection.

No socket options are set per connection (setting SO_RCVTIMEO, SO_SNDTIMEO and blocking
mode, and asking a Unix peer's credentials, were 4 of the 13 system calls of a request on a
new connection, by strace; accepted Unix sockets do not inherit the listener's timeouts):
reads and sends pass MSG_DONTWAIT, and only a send that finds the socket full waits, in
poll(), at most client_timeout for progress.
"""

import logging
import select
import socket
import struct
import time

from . import fastcgi as fcgi
from .parser import Parser

log = logging.getLogger("luafcgid")

_RECV_SIZE = 65536
_IOV_MAX = 1024   # buffers per sendmsg (Linux's UIO_MAXIOV)
# Every response starts "Status: NNN ..." (runtime.lua's head, pages.py, the status page):
# Output reads the code there for the counters and the access log
_STATUS = b"Status: "
_AT = len(_STATUS)
_DONTWAIT = socket.MSG_DONTWAIT
_HEADER = fcgi.HEADER.pack
_STDOUT_TYPE = fcgi.STDOUT
_monotonic = time.monotonic


class ClientGone(Exception):
    """The web server closed the connection or stopped reading."""


def send_parts(sock, parts, timeout):
    """Send a list of buffers by sendmsg, with no joined copy of them (takes `parts`); when
    the socket buffer is full, wait in poll() for room, failing with TimeoutError after
    `timeout` seconds without progress."""
    poller = None
    while parts:
        try:
            sent = sock.sendmsg(parts[:_IOV_MAX], (), _DONTWAIT)
        except BlockingIOError:
            sent = 0
        while parts and sent >= len(parts[0]):   # drop what went out whole
            sent -= len(parts.pop(0))
        if sent:
            parts[0] = memoryview(parts[0])[sent:]
        if parts:
            if poller is None:
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
            if not poller.poll(timeout * 1000):
                raise TimeoutError("the web server read nothing within client_timeout")


_END_REQUEST = {}   # request id -> its END_REQUEST records (nginx numbers every request 1)


class Output:
    """Response bytes for one request, as STDOUT records. Once the web server went away,
    every write raises ClientGone, which stops the page at its next con:puts or con:flush
    (an error it may catch): running on, a 4-second export held its worker to its end,
    and an endless stream for ever. Keeps the status (from the Status line, 499 as nginx
    logs it when the client went away before the response was complete), the first bytes
    and the byte count for the counters and the access log.
    Written by the worker, and by the request_timeout watcher when it gives up on the
    request (abandon): `lock`, the worker's, keeps their records whole."""

    __slots__ = ("sock", "request_id", "half_close", "timeout", "lock", "ended", "broken",
                 "status", "first", "sent")

    def __init__(self, sock, request_id, half_close, timeout, lock):
        """`half_close`: shut the sending side once the response is complete (nginx
        completes a response on a connection it did not ask to keep only when that closes,
        and something, the finish handler, runs before it does). `timeout`: how long a send
        may wait for the web server to read. `lock`: a threading.RLock."""
        self.sock = sock
        self.request_id = request_id
        self.half_close = half_close
        self.timeout = timeout
        self.lock = lock
        self.ended = False
        self.broken = False
        self.status = 200   # the response's HTTP status, once it ended
        self.first = None   # the first bytes written (a reference), for %{NAME}o
        self.sent = 0

    def write(self, data):
        with self.lock:
            if data and not self.ended and not self.broken:
                if not self.sent:
                    self.first = data
                self.sent += len(data)
                self._send(data, b"")
            if self.broken:
                raise ClientGone("the client went away")

    def end(self, data=b""):
        """Send `data` last and complete the response."""
        with self.lock:
            if self.ended:
                return
            self.ended = True
            if not self.sent:
                self.first = data
            self.sent += len(data)
            if not self.broken:   # (broken: 499 already)
                # the status once, here, from the first bytes (200 when they say none)
                first = self.first
                if first[:_AT] == _STATUS:
                    self.status = int(first[_AT:_AT + 3])
                request_id = self.request_id
                tail = _END_REQUEST.get(request_id)
                if tail is None:
                    tail = _END_REQUEST[request_id] = fcgi.end_request(request_id)
                self._send(data, tail)
            if self.half_close:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def abandon(self, page):
        """From another thread: complete the response now, with `page` unless part of it
        went out already, and close the connection after it (its worker is busy for good).
        False while the worker is writing: try again."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.half_close = True
            self.end(b"" if self.sent else page)
        finally:
            self.lock.release()
        return True

    def _send(self, data, tail):
        """`data` as STDOUT records, then `tail`, without blocking in send(). A body of one
        record goes out joined, in one send(); a longer one (or what one send() left) by
        sendmsg of the records' headers and slices of `data`, without copying it (a 256 KiB
        body went out 3 times as fast)."""
        sock = self.sock
        try:
            if len(data) > fcgi.STDOUT_CHUNK:
                parts = fcgi.stream_parts(fcgi.STDOUT, self.request_id, data)
                parts.append(tail)
                send_parts(sock, parts, self.timeout)
                return
            if data:   # one record, unpadded (the spec's padding is optional): no call
                tail = _HEADER(1, _STDOUT_TYPE, self.request_id, len(data), 0) + data + tail
            try:
                sent = sock.send(tail, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent < len(tail):
                send_parts(sock, [memoryview(tail)[sent:]], self.timeout)
        except OSError as exc:
            self.broken = True
            self.status = 499
            log.info("client went away while receiving the response: %s", exc)


def _hung_up(sock):
    """Whether the peer closed the connection (or shut down its sending side), read
    nothing."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(0))


def _unix_peer(sock):
    """Who is on the other end of a Unix socket, for the log: its pid and uid."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    except OSError:
        return "unix socket"
    return f"unix socket peer pid {pid} uid {uid}"


class Connection:
    __slots__ = ("sock", "fd", "address", "parser", "began", "kept", "hung_up", "lingering")

    def __init__(self, sock, fd, address):
        self.sock = sock
        self.fd = fd
        self.address = address   # (host, port) on TCP; the peer is asked only for a log line
        self.parser = Parser()
        self.began = None        # monotonic time the request being received began to arrive
        self.kept = False        # the web server asked to keep it open after a request
        # the acceptor saw the peer shut its side: a short read no longer means nothing more
        # is there, since the end of the stream is "more" that edge-triggered epoll reports
        # only once (a request cut short and its end in one event left the connection parked
        # until client_timeout)
        self.hung_up = False
        self.lingering = 0.0     # monotonic time it was answered 413 (see serve); 0.0 if not

    @property
    def peer(self):
        if isinstance(self.address, tuple):
            return f"{self.address[0]}:{self.address[1]}"
        return _unix_peer(self.sock)

    def serve(self, worker, config, responder):
        """Read what has arrived and answer the requests it completes with `responder`
        under `config` (a reload replaces them: each read takes the current ones), counted
        in `worker` (the serving thread's worker.Worker). True when the connection waits
        for more bytes (park it); False when it is finished.

        After a request too large (413) nothing more is read: the connection lingers,
        parked, until the web server hangs up (or LINGER seconds, acceptor.close_idle).
        nginx, still sending the body, then finds the socket full and reads the 413; closed
        at once, nginx failed its next write (EPIPE) and answered 502, 19 times in 30, and
        reading on to drop the body kept it sending to the end."""
        sock, parser = self.sock, self.parser
        if self.lingering:
            return not _hung_up(sock)
        try:
            while True:
                try:
                    data = sock.recv(_RECV_SIZE, _DONTWAIT)
                except BlockingIOError:
                    return self._waiting()
                except OSError as exc:
                    raise ClientGone(f"connection failed: {exc}") from None
                if not data:
                    parser.eof()
                    return False
                parser.received(data)
                while True:
                    request = parser.next(config)
                    if parser.replies:
                        self._send_replies(config.client_timeout)
                    if request is None:
                        break
                    self.began = None
                    self.kept = keep = request.keep
                    # without a finish handler the connection closes right after the
                    # response; after a 413 it lingers (see above), its response ended by a
                    # half close
                    out = Output(sock, request.id, request.too_large or not keep
                                 and bool(config.finishhandler), config.client_timeout,
                                 worker.out_lock)
                    worker.begin(request.params)
                    try:
                        responder.respond(request, out, worker)
                    finally:
                        worker.end(out)
                    if request.too_large:
                        self.lingering = _monotonic()
                    if not keep:
                        return bool(self.lingering)
                if parser.closing:
                    return False
                if len(data) < _RECV_SIZE and not self.hung_up:   # nothing more had arrived
                    return self._waiting()
        except fcgi.ProtocolError as exc:
            log.warning("malformed FastCGI from %s: %s; connection closed", self.peer, exc)
        except ClientGone as exc:
            log.info("%s: %s", self.peer, exc)
        return False

    def _waiting(self):
        if not self.parser.in_progress:
            self.began = None
        elif self.began is None:
            self.began = _monotonic()
        return True

    def _send_replies(self, timeout):
        replies = self.parser.replies[:]
        self.parser.replies.clear()
        try:
            send_parts(self.sock, replies, timeout)
        except OSError as exc:
            raise ClientGone(f"connection failed: {exc}") from None

    def unread(self):
        """True when request bytes have arrived that no worker has read yet."""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | _DONTWAIT))
        except OSError:   # BlockingIOError: nothing there
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
