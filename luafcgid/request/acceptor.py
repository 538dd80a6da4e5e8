"""What a worker waits for: a new connection on the listening socket, or a parked
connection on which bytes have arrived (the next request on a kept-alive connection, or
more of a request that had only partly arrived).

A worker that blocked on one client would be lost to every other: nginx caches more
upstream connections than there are workers, and a client may send half a request and
stall. So every connection a worker is not reading from is parked in one epoll set shared
with the listening socket, and whichever worker is free takes the next ready one.
EPOLLEXCLUSIVE wakes one worker, not all, for a new connection.

A connection is registered once, edge-triggered, and stays registered while a worker
serves it: each arrival of bytes is one event, which lends a parked connection to the
worker that gets it, or, when the connection is being served, tells its worker to read
again before parking it. Parking is then no system call (EPOLLONESHOT needed an epoll_ctl
to re-arm after every request on a kept connection).

Timers (close_idle): client_timeout is for a client slow to send. It runs from when a
connection was parked idle, or from when its unfinished request began to arrive; time a
connection waits for a free worker never counts, so a connection with unread bytes is
never closed as idle. A connection answered 413 lingers at most LINGER seconds
(connection.py).
"""

import errno
import logging
import os
import select
import socket
import threading
import time

log = logging.getLogger("luafcgid")

# accept() failures that say "not now" rather than "never": back off and try again
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_WATCHED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_ACCEPT_BATCH = 64
# How long a connection answered 413, the rest of its body unread, waits for the web server
# to hang up: nginx does within milliseconds of reading the 413
LINGER = 1.0


class Acceptor:
    def __init__(self, sock, connect, admit=None):
        """`connect(sock, address)` makes a Connection of an accepted socket; `admit(address)`,
        when set, says whether a peer may be served at all (clients.py)."""
        self._connect = connect
        self.admit = admit
        self._epoll = select.epoll()
        self._watched = {}   # fd -> Connection registered in the epoll set, parked or served
        self._kept = set()   # fds of those kept alive by the web server (FCGI_KEEP_CONN)
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        # never drained: once written, it wakes every worker, level-triggered
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self.closed = False
        self.sock = None
        self._family = None
        self.listen_on(sock)

    def listen_on(self, sock):
        """Accept from `sock` from now on (a reload may rebind)."""
        sock.setblocking(False)
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self._family = sock.family
        old, self.sock = self.sock, sock
        if old is not None:
            self._epoll.unregister(old.fileno())

    def next(self):
        """Block until a Connection may have bytes to read: a parked one that has, or one
        just accepted. None once the acceptor is closed."""
        while not self.closed:
            events = self._epoll.poll(-1, 1)
            for fd, _ in events:
                if fd == self._wake_read:
                    return None
                if fd == self.sock.fileno():
                    connection = self._accept_pending()
                    if connection is not None:
                        return connection
                    continue
                with self._lock:
                    connection = self._watched.get(fd)
                    if connection is None:
                        continue
                    if connection.parked:
                        connection.parked = False
                        return connection
                    connection.arrived = True   # its worker reads again before parking it
        return None

    def _accept_pending(self):
        """Accept a connection, to be read at once (its request has usually arrived with it:
        no epoll round trip). When the web server keeps connections alive, accept the whole
        backlog and park the rest, so that new connections take turns with kept ones in the
        ready list: accepting one per pass starved the backlog (at 256 clients the p99
        latency was 449 ms against a 9 ms median; 49 ms against 19 ms since). Otherwise one
        at a time is fair and cheapest: a batch parked all but one of about ten accepted,
        each costing an epoll_ctl and a pass through epoll_wait, and ended on a failed
        accept; and a process that took a batch held it while another process took newer
        connections from the backlog."""
        first = self._accept()
        if first is not None and self._kept:
            for _ in range(_ACCEPT_BATCH - 1):
                connection = self._accept()
                if connection is None:
                    break
                self.park(connection)
        return first

    def _accept(self):
        """A Connection of the next admitted socket in the backlog, or None. Takes the raw
        accept() and builds the socket object with the listener's known family:
        socket.accept() asks for the family and type as enums, costing a microsecond a
        connection."""
        while True:
            try:
                fd, address = self.sock._accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return None   # the backlog is empty, or the client gave up
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    log.error("accept failed: %s; retrying", exc)
                    time.sleep(0.1)
                return None
            if self.admit is None or self.admit(address):
                return self._connect(socket.socket(self._family, socket.SOCK_STREAM, 0, fd),
                                     address)
            os.close(fd)

    def park(self, connection):
        """Keep a connection until more bytes arrive on it. False when bytes arrived while
        it was being served: the caller reads them now."""
        with self._lock:
            if self.closed:
                connection.close()
                return True
            if connection.arrived:
                connection.arrived = False
                return False
            connection.parked = True
            connection.parked_at = time.monotonic()
            fd = connection.sock.fileno()
            if not connection.registered:
                self._watched[fd] = connection
                self._epoll.register(fd, _WATCHED)
                connection.registered = True
            if connection.kept:
                self._kept.add(fd)
        return True

    def discard(self, connection):
        """Close a connection a worker is done with."""
        if connection.registered:
            with self._lock:   # before the close frees its fd for another connection
                fd = connection.sock.fileno()
                self._watched.pop(fd, None)
                self._kept.discard(fd)
        connection.close()

    def close_idle(self, max_idle):
        """Close parked connections whose client sent nothing for max_idle seconds since
        they were parked idle, or did not complete a request within max_idle seconds of
        its first bytes, unless bytes wait unread (then the client is waiting for us), and
        those answered 413 more than LINGER seconds ago. The requests cut short are
        counted in one line (a line each: 200 stalled clients, 200 lines)."""
        now = time.monotonic()
        limit, linger_limit = now - max_idle, now - LINGER
        with self._lock:
            expired = [fd for fd, c in self._watched.items() if c.parked and (
                c.lingering < linger_limit if c.lingering else
                (c.parked_at if c.began is None else c.began) < limit and not c.unread())]
            self._kept.difference_update(expired)
            connections = [self._watched.pop(fd) for fd in expired]
        stalled = sum(c.began is not None for c in connections)
        if stalled:
            log.info("%d connection(s) closed: request not complete within client_timeout "
                     "(%g s)", stalled, max_idle)
        for connection in connections:
            connection.close()

    def close(self):
        """Wake every worker with None, and close the parked connections (workers close
        those they serve)."""
        with self._lock:
            self.closed = True
            connections = [c for c in self._watched.values() if c.parked]
            self._watched.clear()
            self._kept.clear()
        os.write(self._wake_write, b"x")
        for connection in connections:
            connection.close()
