"""The responder side of one FastCGI connection: read records, answer requests in turn.

One worker thread runs one connection at a time. Requests are not multiplexed
(FCGI_MPXS_CONNS is 0), but with FCGI_KEEP_CONN several follow each other on a connection.
"""

import logging
import socket
import struct
import threading
import time

from . import fastcgi as fcgi

log = logging.getLogger("luafcgid")

_RECV_SIZE = 65536
_IOV_MAX = 1024   # buffers per sendmsg (Linux's UIO_MAXIOV)
_KNOWN_TYPES = frozenset(range(fcgi.BEGIN_REQUEST, fcgi.UNKNOWN_TYPE + 1))


class ClientGone(Exception):
    """The web server closed the connection or stopped sending mid-request."""


def set_timeouts(sock, seconds):
    """Kernel-side send and receive timeouts on a blocking socket. A Python-level timeout
    (settimeout) would cost a poll() before every recv() and send()."""
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class Output:
    """Response bytes for one request, as STDOUT records. A web server that went away
    makes further writes no-ops, so the script runs on without noticing. Keeps the first
    bytes (the Status line) and the byte count for the counters and the access log.
    Written by the worker, and by the request_timeout watcher when it gives up on the
    request (abandon); a lock keeps their records whole."""

    __slots__ = ("sock", "request_id", "keep_conn", "ended", "broken", "head", "sent", "lock")

    def __init__(self, sock, request_id, keep_conn):
        self.sock = sock
        self.request_id = request_id
        self.keep_conn = keep_conn
        self.ended = False
        self.broken = False
        self.head = None
        self.sent = 0
        self.lock = threading.Lock()

    def write(self, data):
        with self.lock:
            if data and not self.ended and not self.broken:
                if self.head is None:
                    self.head = data[:12]
                self.sent += len(data)
                self._send_records(data)

    def end(self, data=b""):
        with self.lock:
            self._end(data)

    def abandon(self, page):
        """From another thread: complete the response now, with `page` unless part of it
        went out already, and close the connection after it (its worker is busy for good).
        False while the worker is writing: try again."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.keep_conn = False
            self._end(b"" if self.sent else page)
        finally:
            self.lock.release()
        return True

    def _end(self, data):
        if self.ended:
            return
        self.ended = True
        if self.head is None:
            self.head = data[:12]
        self.sent += len(data)
        if not self.broken:
            self._send_records(data, fcgi.end_request(self.request_id))
        if not self.keep_conn:
            # nginx completes a response on a connection it did not ask to keep only when
            # the connection closes; the finish handler still runs after this.
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
                self.sock.sendall((fcgi.record(fcgi.STDOUT, self.request_id, data)
                                   if data else b"") + tail)
                return
            parts = fcgi.stream_parts(fcgi.STDOUT, self.request_id, data)
            if tail:
                parts.append(tail)
            while parts:
                sent = self.sock.sendmsg(parts[:_IOV_MAX])
                while parts and sent >= len(parts[0]):   # drop what went out whole
                    sent -= len(parts.pop(0))
                if sent:
                    parts[0] = memoryview(parts[0])[sent:]
        except OSError as exc:
            self.broken = True
            log.info("client went away while receiving the response: %s", exc)


def _unix_peer(sock):
    """Who is on the other end of a Unix socket, for the log: its pid and uid."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    except OSError:
        return "unix socket"
    return f"unix socket peer pid {pid} uid {uid}"


class Connection:
    def __init__(self, sock, peer, server):
        """`server` provides the current `responder` and `config`; a reload replaces them,
        and each request takes the ones current when it begins."""
        self.sock = sock
        self.peer = peer or _unix_peer(sock)
        self.server = server
        self.parked_at = 0.0
        self._buf = bytearray()
        self._pos = 0
        self._deadline = None   # when the request being read must be complete
        set_timeouts(sock, server.config.client_timeout)

    def serve(self, worker):
        """Answer the requests that are ready, counted in `worker` (the serving thread's
        metrics.WorkerStats). True when the connection is idle and kept (park it until its
        next request); False when it is finished."""
        try:
            while True:
                request = self._read_request()
                if request is None:
                    return False
                request_id, keep_conn, params, body, too_large = request
                out = Output(self.sock, request_id, keep_conn)
                worker.begin(params)
                try:
                    self.server.responder.respond(params, body, out, too_large, worker)
                finally:
                    worker.end(out)
                if not keep_conn or self.server.stopping:
                    return False
                if len(self._buf) == self._pos:   # nothing more received yet
                    return True
        except fcgi.ProtocolError as exc:
            log.warning("malformed FastCGI from %s: %s; connection closed", self.peer, exc)
        except ClientGone as exc:
            log.info("%s: %s", self.peer, exc)
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- records --------------------------------------------------------------------------

    def _fill(self, need):
        """Make at least `need` unread bytes available; False on a clean EOF before any."""
        buf = self._buf
        if self._pos and self._pos > len(buf) // 2:
            del buf[:self._pos]
            self._pos = 0
        while len(buf) - self._pos < need:
            try:
                chunk = self.sock.recv(_RECV_SIZE)
            except BlockingIOError:   # SO_RCVTIMEO expired
                raise ClientGone("no data within client_timeout; connection closed") from None
            except OSError as exc:
                raise ClientGone(f"connection failed: {exc}") from None
            if not chunk:
                if len(buf) == self._pos:
                    return False
                raise fcgi.ProtocolError("connection closed in the middle of a record")
            buf += chunk
            # One deadline for the whole request, checked as bytes arrive, so a client
            # trickling bytes cannot hold a worker beyond it (a silent one hits SO_RCVTIMEO).
            now = time.monotonic()
            if self._deadline is None:
                self._deadline = now + self.server.config.client_timeout
            elif now > self._deadline:
                raise ClientGone("request not complete within client_timeout; "
                                 "connection closed")
        return True

    def _next_record(self):
        if not self._fill(fcgi.HEADER_LEN):
            return None
        version, rtype, request_id, length, padding = fcgi.HEADER.unpack_from(self._buf, self._pos)
        if version != fcgi.VERSION:
            raise fcgi.ProtocolError(f"unsupported version {version} (not FastCGI?)")
        total = fcgi.HEADER_LEN + length + padding
        self._fill(total)   # the header is buffered, so an EOF here raises ProtocolError
        start = self._pos + fcgi.HEADER_LEN
        content = bytes(self._buf[start:start + length])
        self._pos += total
        return rtype, request_id, content

    def _reply(self, rtype, request_id, content):
        try:
            self.sock.sendall(fcgi.record(rtype, request_id, content))
        except OSError as exc:
            raise ClientGone(f"connection failed: {exc}") from None

    def _end(self, request_id, protocol_status):
        self._reply(fcgi.END_REQUEST, request_id, fcgi.END_BODY.pack(0, protocol_status))

    # -- requests -------------------------------------------------------------------------

    def _read_request(self):
        """(request_id, keep_conn, params, body, too_large), or None when the connection
        ends between requests."""
        config = self.server.config
        self._deadline = None
        request_id = None
        keep_conn = False
        params = bytearray()
        body = []
        body_len = 0
        too_large = False
        while True:
            record = self._next_record()
            if record is None:
                if request_id is None:
                    return None
                raise fcgi.ProtocolError("connection closed in the middle of a request")
            rtype, rid, content = record
            if rid == 0:
                self._management(rtype, content, config)
            elif rtype == fcgi.BEGIN_REQUEST:
                if len(content) != fcgi.BEGIN_BODY.size:
                    raise fcgi.ProtocolError("BEGIN_REQUEST body is not 8 bytes")
                role, flags = fcgi.BEGIN_BODY.unpack(content)
                if rid == request_id:
                    raise fcgi.ProtocolError(f"BEGIN_REQUEST for request {rid}, which is "
                                             f"already active")
                if request_id is not None:
                    self._end(rid, fcgi.CANT_MPX_CONN)
                elif role != fcgi.RESPONDER:
                    self._end(rid, fcgi.UNKNOWN_ROLE)
                    if not flags & fcgi.KEEP_CONN:
                        return None
                else:
                    request_id, keep_conn = rid, bool(flags & fcgi.KEEP_CONN)
            elif rtype not in _KNOWN_TYPES:
                self._unknown_type(rtype)
            elif rid != request_id:
                continue   # spec 4.2: records of an inactive request are ignored
            elif rtype == fcgi.PARAMS:
                if not content:
                    continue
                params += content
                if len(params) > config.max_params:
                    raise fcgi.ProtocolError(
                        f"params longer than max_params ({config.max_params} bytes)")
            elif rtype == fcgi.STDIN:
                if not content:
                    return (request_id, keep_conn, fcgi.decode_params(params),
                            b"".join(body), too_large)
                body_len += len(content)
                if body_len > config.maxpost:
                    too_large = True
                    body = []
                elif not too_large:
                    body.append(content)
            elif rtype == fcgi.ABORT_REQUEST:
                self._end(rid, fcgi.REQUEST_COMPLETE)
                if not keep_conn:
                    return None
                request_id, params, body, body_len, too_large = None, bytearray(), [], 0, False

    def _management(self, rtype, content, config):
        if rtype == fcgi.GET_VALUES:
            workers = str(config.workers).encode()
            values = {b"FCGI_MAX_CONNS": workers, b"FCGI_MAX_REQS": workers,
                      b"FCGI_MPXS_CONNS": b"0"}
            asked = fcgi.decode_params(content)
            self._reply(fcgi.GET_VALUES_RESULT, 0,
                        fcgi.encode_params((k, values[k]) for k in asked if k in values))
        else:
            self._unknown_type(rtype)

    def _unknown_type(self, rtype):
        self._reply(fcgi.UNKNOWN_TYPE, 0, bytes((rtype,)) + b"\0" * 7)
