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
import _socket
import time

from .connection import Connection

log = logging.getLogger("luafcgid")

# accept() failures that say "not now" rather than "never": back off and try again
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_WATCHED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HUNG_UP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_ACCEPT_BATCH = 64
# How long a connection answered 413, the rest of its body unread, waits for the web server
# to hang up: nginx does within milliseconds of reading the 413
LINGER = 1.0


class Acceptor:
    def __init__(self, sock, admit=None):
        """`admit(address)`, when set, says whether a peer may be served at all
        (clients.py)."""
        self.admit = admit
        self._epoll = select.epoll()
        self._watched = {}   # fd -> Connection registered in the epoll set, parked or served
        self._parked = {}    # fd -> monotonic time parked, of those waiting in the set
        self._arrived = set()   # fds of those served now on which more bytes arrived
        self._kept = set()   # fds of those kept alive by the web server (FCGI_KEEP_CONN)
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        # never drained: once written, it wakes every worker, level-triggered
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self.closed = False
        self.sock = None
        self._listening = None   # its fd
        self._family = None
        self.listen_on(sock)

    def listen_on(self, sock):
        """Accept from `sock` from now on (a reload may rebind)."""
        sock.setblocking(False)
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self._family = sock.family
        self._listening = sock.fileno()
        old, self.sock = self.sock, sock
        if old is not None:
            self._epoll.unregister(old.fileno())

    def next(self):
        """Block until a Connection may have bytes to read: a parked one that has, or one
        just accepted. None once the acceptor is closed."""
        while not self.closed:
            for fd, mask in self._epoll.poll(-1, 1):
                if fd == self._listening:
                    connection = self._accept()
                    if connection is None:
                        continue
                    if self._kept:
                        self._accept_backlog()
                    return connection
                if fd == self._wake_read:
                    return None
                with self._lock:
                    connection = self._watched.get(fd)
                    if connection is None:
                        continue
                    if mask & _HUNG_UP:
                        # the client's last bytes and its end came as one event: the
                        # worker reads on to the end, past a short read
                        connection.hung_up = True
                    if self._parked.pop(fd, None) is not None:
                        return connection
                    self._arrived.add(fd)   # its worker reads again before parking it
        return None

    def _accept_backlog(self):
        """A connection is accepted to be read at once (its request has usually arrived with
        it: no epoll round trip). When the web server keeps connections alive, the rest of
        the backlog is accepted and parked too, so that new connections take turns with
        kept ones in the ready list: accepting one per pass starved the backlog (at 256
        clients the p99 latency was 449 ms against a 9 ms median; 49 ms against 19 ms
        since). Otherwise one at a time is fair and cheapest: a batch parked all but one of
        about ten accepted, each costing an epoll_ctl and a pass through epoll_wait, and
        ended on a failed accept; and a process that took a batch held it while another
        process took newer connections from the backlog."""
        for _ in range(_ACCEPT_BATCH - 1):
            connection = self._accept()
            if connection is None:
                break
            self.park(connection)

    def _accept(self):
        """A Connection of the next admitted socket in the backlog, or None. Takes the raw
        accept() and builds a C socket object (_socket.socket) with the listener's known
        family: socket.accept() asks for the family and type as enums, costing a
        microsecond a connection, and socket.socket's __init__ and close() are Python, 3
        calls more."""
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
                return Connection(_socket.socket(self._family, socket.SOCK_STREAM, 0, fd), fd,
                                  address)
            os.close(fd)

    def park(self, connection):
        """Keep a connection until more bytes arrive on it. False when bytes arrived while
        it was being served: the caller reads them now."""
        fd = connection.fd
        with self._lock:
            if self.closed:
                connection.close()
                return True
            if fd in self._arrived:
                self._arrived.discard(fd)
                return False
            self._parked[fd] = time.monotonic()
            if fd not in self._watched:
                self._watched[fd] = connection
                self._epoll.register(fd, _WATCHED)
            if connection.kept:
                self._kept.add(fd)
        return True

    def discard(self, connection):
        """Close a connection a worker is done with."""
        fd = connection.fd
        # unlocked: while its fd is open no other connection has it
        if fd in self._watched:
            with self._lock:   # before the close frees its fd for another connection
                del self._watched[fd]
                self._kept.discard(fd)
                self._arrived.discard(fd)
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
            expired = []
            for fd, parked_at in self._parked.items():
                connection = self._watched[fd]
                began, lingering = connection.began, connection.lingering
                if (lingering < linger_limit if lingering else
                        (parked_at if began is None else began) < limit
                        and not connection.unread()):
                    expired.append(fd)
            for fd in expired:
                del self._parked[fd]
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
            connections = [self._watched[fd] for fd in self._parked]
            self._watched.clear()
            self._parked.clear()
            self._arrived.clear()
            self._kept.clear()
        os.write(self._wake_write, b"x")
        for connection in connections:
            connection.close()
