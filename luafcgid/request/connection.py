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
import threading
import time

from . import fastcgi as fcgi
from .parser import Parser

log = logging.getLogger("luafcgid")

_RECV_SIZE = 65536
_IOV_MAX = 1024   # buffers per sendmsg (Linux's UIO_MAXIOV)
# Every response starts "Status: NNN ..." (runtime.lua's head, pages.py, the status page):
# Output keeps that much of it for the counters and the access log
_STATUS = b"Status: "
_HEAD = len(_STATUS) + 3
_DONTWAIT = socket.MSG_DONTWAIT
_monotonic = time.monotonic


class ClientGone(Exception):
    """The web server closed the connection or stopped reading."""


def send_all(sock, data, timeout):
    """Send every byte of `data` on a blocking socket without blocking in send(): one send()
    in the common case; when the socket buffer is full, the rest as send_parts sends it."""
    try:
        sent = sock.send(data, _DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        send_parts(sock, [memoryview(data)[sent:]], timeout)


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


class Output:
    """Response bytes for one request, as STDOUT records. Once the web server went away,
    every write raises ClientGone, which stops the page at its next con:puts or con:flush
    (an error it may catch): running on, a 4-second export held its worker to its end,
    and an endless stream for ever. Keeps the first bytes (the Status line) and the byte
    count for the counters and the access log.
    Written by the worker, and by the request_timeout watcher when it gives up on the
    request (abandon); a lock keeps their records whole."""

    __slots__ = ("sock", "request_id", "half_close", "timeout", "ended", "broken", "head",
                 "first", "sent", "lock")

    def __init__(self, sock, request_id, half_close, timeout):
        """`half_close`: shut the sending side once the response is complete (nginx
        completes a response on a connection it did not ask to keep only when that closes,
        and something, the finish handler, runs before it does). `timeout`: how long a send
        may wait for the web server to read."""
        self.sock = sock
        self.request_id = request_id
        self.half_close = half_close
        self.timeout = timeout
        self.ended = False
        self.broken = False
        self.head = None
        self.first = None   # the first bytes written (a reference), for %{NAME}o
        self.sent = 0
        self.lock = threading.Lock()

    def write(self, data):
        with self.lock:
            if data and not self.ended and not self.broken:
                if self.head is None:
                    self.head = data[:_HEAD]
                    self.first = data
                self.sent += len(data)
                self._send_records(data)
            if self.broken:
                raise ClientGone("the client went away")

    def end(self, data=b""):
        with self.lock:
            self._end(data)

    @property
    def status(self):
        """The response's HTTP status code (200 when it said none); 499, as nginx logs it,
        when the client went away before the response was complete."""
        if self.broken:
            return 499
        head = self.head
        return int(head[len(_STATUS):]) if head and head.startswith(_STATUS) else 200

    def abandon(self, page):
        """From another thread: complete the response now, with `page` unless part of it
        went out already, and close the connection after it (its worker is busy for good).
        False while the worker is writing: try again."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.half_close = True
            self._end(b"" if self.sent else page)
        finally:
            self.lock.release()
        return True

    def _end(self, data):
        if self.ended:
            return
        self.ended = True
        if self.head is None:
            self.head = data[:_HEAD]
            self.first = data
        self.sent += len(data)
        if not self.broken:
            self._send_records(data, fcgi.end_request(self.request_id))
        if self.half_close:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _send_records(self, data, tail=b""):
        """`data` as STDOUT records, then `tail`. A body of one record goes out joined, in
        one sendall; a longer one by sendmsg of the records' headers and slices of `data`,
        without copying it (a 256 KiB body went out 3 times as fast)."""
        try:
            if len(data) <= fcgi.STDOUT_CHUNK:
                send_all(self.sock, (fcgi.record(fcgi.STDOUT, self.request_id, data)
                                     if data else b"") + tail, self.timeout)
                return
            parts = fcgi.stream_parts(fcgi.STDOUT, self.request_id, data)
            if tail:
                parts.append(tail)
            send_parts(self.sock, parts, self.timeout)
        except OSError as exc:
            self.broken = True
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
    __slots__ = ("sock", "address", "server", "parser", "began", "kept", "parked_at",
                 "registered", "parked", "arrived", "lingering", "hung_up")

    def __init__(self, sock, address, server):
        """`server` provides the current `responder` and `config`; a reload replaces them,
        and each request takes the ones current when it begins."""
        self.sock = sock
        self.address = address   # (host, port) on TCP; the peer is asked only for a log line
        self.server = server
        self.parser = Parser()
        self.began = None        # monotonic time the request being received began to arrive
        self.kept = False        # the web server asked to keep it open after a request
        self.lingering = 0.0     # monotonic time it was answered 413 (see serve); 0.0 if not
        # the acceptor's: in its epoll set; waiting there; bytes arrived while served
        self.registered = self.parked = self.arrived = False
        self.parked_at = 0.0
        # the acceptor saw the peer shut its side: a short read no longer means nothing more
        # is there, since the end of the stream is "more" that edge-triggered epoll reports
        # only once (a request cut short and its end in one event left the connection parked
        # until client_timeout)
        self.hung_up = False

    @property
    def peer(self):
        if isinstance(self.address, tuple):
            return f"{self.address[0]}:{self.address[1]}"
        return _unix_peer(self.sock)

    def serve(self, worker):
        """Read what has arrived and answer the requests it completes, counted in `worker`
        (the serving thread's metrics.WorkerStats). True when the connection waits for more
        bytes (park it); False when it is finished.

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
                    request = parser.next(self.server.config)
                    if parser.replies:
                        self._send_replies()
                    if request is None:
                        break
                    self.began = None
                    if not self._answer(request, worker):
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

    def _answer(self, request, worker):
        """Run one request; True when the connection stays open for the next one."""
        request_id, keep_conn, params, body, too_large = request
        self.kept = keep_conn
        server = self.server
        config = server.config
        # without a finish handler the connection closes right after the response; after
        # a 413 it lingers (see serve), its response ended by a half close
        out = Output(self.sock, request_id,
                     too_large or not keep_conn and bool(config.finishhandler),
                     config.client_timeout)
        worker.begin(params)
        try:
            server.responder.respond(params, body, out, too_large, worker)
        finally:
            worker.end(out)
        if too_large:
            self.lingering = _monotonic()
        return keep_conn

    def _send_replies(self):
        replies = b"".join(self.parser.replies)
        self.parser.replies.clear()
        try:
            send_all(self.sock, replies, self.server.config.client_timeout)
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
