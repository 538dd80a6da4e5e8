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

Draining (close, then drain() until the workers end): no connection is accepted any more,
but every one this process holds is served until it is idle: one on which a request has
arrived or is arriving, one accepted that has not sent its request yet, and one the web
server keeps, until it has left it idle DRAIN_IDLE seconds. Closing a connection whose
request had arrived unread resets it, and nginx passes a POST that failed so to no other
connection: across 30 replacements of a process under load (4 clients, kept connections),
34 of 30,478 POSTs got a 502 when the drain closed every parked connection at once.

Timers (close_idle): client_timeout is for a client slow to send. It runs from when a
connection was parked idle, or from when its unfinished request began to arrive; time a
connection waits for a free worker never counts, so a connection with unread bytes is
never closed as idle. A connection answered 413 lingers at most LINGER seconds
(connection.py).
"""

import collections
import ctypes
import errno
import logging
import os
import select
import socket
import threading
import time
import _socket

from .connection import Connection
from .handoff import MAX_FDS

log = logging.getLogger("luafcgid")

# accept() failures that say "not now" rather than "never": back off and try again
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_WATCHED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HUNG_UP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_ACCEPT_BATCH = 64
# Events taken by one epoll_wait and kept, in order, for the next calls of next() in any of the
# process's workers: with kept connections under load several are ready at once, and each
# epoll_wait is a system call (one of 3 a request on a kept connection, with recv and send).
_EVENTS = 64
# At the descriptor limit every worker fails to accept ten times a second (about 30 log
# lines a second with 3 workers): the first failure is logged, then a count per interval.
_REPORT_EVERY = 5.0
# How long a connection answered 413, the rest of its body unread, waits for the web server
# to hang up: nginx does within milliseconds of reading the 413
LINGER = 1.0
# While draining, a connection the web server keeps is let go of once it has been idle this
# long. nginx reuses its most recently used connections first, so one idle that long is
# unlikely to be picked in the moment it closes: closed as soon as it was idle, 7 POSTs of
# 30,000 across 32 replacements still got a 502.
DRAIN_IDLE = 1.0


class Acceptor:
    def __init__(self, sock, admit=None, handoff=None):
        """`admit(address)`, when set, says whether a peer may be served at all
        (clients.py). `handoff`, a handoff.Share when processes share the listener, spreads
        the connections of a batch between them."""
        self.admit = admit
        self.handoff = handoff
        self._epoll = select.epoll()
        self._watched = {}   # fd -> Connection registered in the epoll set, parked or served
        self._parked = {}    # fd -> monotonic time parked, of those waiting in the set
        self._arrived = set()   # fds of those served now on which more bytes arrived
        self._kept = set()   # fds of those kept alive by the web server (FCGI_KEEP_CONN)
        self._serving = 0    # connections accepted and not parked or discarded since
        self._backlog = False   # the last accept found a connection: try the next (next())
        self._ready = collections.deque()   # (fd, events) epoll_wait gave and no worker took
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        # never drained: once written, it wakes every worker, level-triggered
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._inbox = None   # the fd connections handed to this process arrive on
        self._handed = collections.deque()   # of those received and parked, to serve next
        # set while a worker waits in epoll_wait: the others may hand this process what
        # they hold (hand_parked); alone, a flag nobody reads
        self._idle = ctypes.c_uint64()
        if handoff is not None:
            handoff.open()
            self._inbox = handoff.fileno
            self._epoll.register(self._inbox, select.EPOLLIN)
            self._idle = handoff.idle_flag
        self.closed = False
        self._failures = 0         # accept failures not yet logged
        self._failed_at = 0.0      # monotonic time of the last one
        self._reported_at = None   # of the last "accept failed" line; None when it works
        self._ended = False        # the workers were woken with None
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
        just accepted. None once the acceptor is closed and nothing is left to serve.

        While no connection is parked or kept (the web server keeps none, and no request is
        half there) and the last accept found one, the backlog is tried before epoll_wait:
        under load it holds the next connection, and epoll_wait was one of the 9 system
        calls of a request on a new connection (strace). Nothing parked can wait behind it.
        """
        if self._handed:
            connection = self._next_handed()
            if connection is not None:
                return connection
        if self._backlog and not (self._parked or self._kept or self.closed):
            connection = self._accept()
            if connection is not None:
                return connection
            self._backlog = False
        ready = self._ready
        while True:
            if ready:
                try:
                    fd, mask = ready.popleft()
                except IndexError:   # another worker took the last one
                    continue
            else:
                idle = self._idle
                idle.value = 1
                events = self._epoll.poll(-1, _EVENTS)
                idle.value = 0
                if not events:
                    continue
                fd, mask = events[0]
                if len(events) > 1:
                    ready.extend(events[1:])
            if fd == self._listening:
                if self.closed:   # an event taken before the drain began
                    continue
                connection = self._accept()
                if connection is None:
                    continue
                if self._kept:
                    self._accept_backlog()
                else:
                    self._backlog = True
                return connection
            if fd == self._wake_read:
                return None
            if fd == self._inbox:
                connection = self._received()
                if connection is None:
                    continue
                return connection
            with self._lock:
                connection = self._watched.get(fd)
                if connection is None:
                    continue
                if mask & _HUNG_UP:
                    # the client's last bytes and its end came as one event: the
                    # worker reads on to the end, past a short read
                    connection.hung_up = True
                if self._parked.pop(fd, None) is not None:
                    self._serving += 1
                    return connection
                self._arrived.add(fd)   # its worker reads again before parking it

    def _accept_backlog(self):
        """A connection is accepted to be read at once (its request has usually arrived with
        it: no epoll round trip). When the web server keeps connections alive, the rest of
        the backlog is accepted and parked too, so that new connections take turns with
        kept ones in the ready list: accepting one per pass starved the backlog (at 256
        clients the p99 latency was 449 ms against a 9 ms median; 49 ms against 19 ms
        since). Otherwise one at a time is fair and cheapest: a batch parked all but one of
        about ten accepted, each costing an epoll_ctl and a pass through epoll_wait, and
        ended on a failed accept; and a process that took a batch held it while another
        process took newer connections from the backlog. Another process holding fewer
        connections is handed its share of the batch (handoff.py)."""
        batch = []
        for _ in range(_ACCEPT_BATCH - 1):
            connection = self._accept()
            if connection is None:
                break
            batch.append(connection)
        if self.handoff is not None and batch:
            batch, handed = self.handoff.spread(batch, len(self._watched) + 1)
            for connection in handed:
                self.discard(connection)
        for connection in batch:
            self.park(connection)

    def _received(self):
        """The connections other processes handed to this one (handoff.py), accepted
        there and not read: the first to be read now, the others parked and taken next,
        before their turn in the ready list. They waited a turn in the other process's
        ready list, then this one's: a third turn put the 10 ms page's p99 at 256 kept
        connections at 1.6-2.0 s against 1.3 s. Parked, the epoll set still hands them to
        a worker if none calls next() first. None if none arrived (another worker took
        them)."""
        connections = self._take_handed(self.handoff.receive())
        for connection in connections[1:]:
            self.park(connection)
            self._handed.append(connection)
        return connections[0] if connections else None

    def _next_handed(self):
        """A connection of those _received parked, if one is still parked (not taken by
        an epoll event since)."""
        with self._lock:
            while self._handed:
                connection = self._handed.popleft()
                fd = connection.fd
                if (self._watched.get(fd) is connection
                        and self._parked.pop(fd, None) is not None):
                    self._serving += 1
                    return connection
        return None

    def _take_handed(self, handed):
        """Connections of the (descriptor, kept) pairs `handed` to this process, counted as
        accepted."""
        with self._lock:
            self._serving += len(handed)
        connections = []
        for fd, kept in handed:
            sock = _socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
            address = ""   # a Unix peer is asked only for a log line (Connection.peer)
            if self._family != socket.AF_UNIX:
                try:
                    address = sock.getpeername()
                except OSError:   # the client has gone: the first read says so
                    address = ("?", 0)
            connection = Connection(sock, fd, address)
            connection.kept = kept
            connections.append(connection)
        return connections

    def hand_parked(self):
        """The last worker of this process on duty went into a long call (duty.py): hand
        the connections parked here of which nothing was read to a process with a worker
        waiting idle, so that a request on them is not left waiting for this process's
        workers (handoff.py): every one on which nothing has arrived (kept ones, idle),
        and one on which a request waits. Nothing when no process is idle.

        Handed every connection with a request waiting, two processes passed them back
        and forth under a steady load of long pages: the 10 ms page kept at 16 connections
        took 246 CPU µs a request against 209 without handing, its p99 108 ms against 51 (3
        alternating runs, medians). Handing one: 208 against 205 µs, p99 64 against 63 ms,
        p50 42 against 49 (6 runs)."""
        handoff = self.handoff
        number = handoff.idle_process()
        if number is None:
            return
        with self._lock:
            moving, waiting = [], False
            for connection in map(self._watched.get, self._parked):
                if connection.began is not None or connection.lingering:
                    continue   # part of a request was read, or it was answered 413
                if not connection.unread():
                    moving.append(connection)
                elif not waiting:
                    waiting = True
                    moving.insert(0, connection)   # the first the other process reads
                if len(moving) == MAX_FDS:
                    break
            for connection in moving:
                fd = connection.fd
                del self._parked[fd], self._watched[fd]
                self._kept.discard(fd)
                self._epoll.unregister(fd)
            if not moving:
                return
            self._held()
        if handoff.hand(number, moving):
            for connection in moving:
                connection.close()
        else:   # it stopped taking connections meanwhile: they stay
            with self._lock:
                self._serving += len(moving)
            for connection in moving:
                self.park(connection)
        with self._lock:
            self._end_if_drained()

    def _accept(self):
        """A Connection of the next admitted socket in the backlog, or None. Takes the raw
        accept() and builds a C socket object (_socket.socket) with the listener's known
        family: socket.accept() asks for the family and type as enums, costing a
        microsecond a connection, and socket.socket's __init__ and close() are Python, 3
        calls more."""
        # counted before accept(), so that a drain cannot end while a worker takes one
        with self._lock:
            self._serving += 1
        while True:
            try:
                fd, address = self.sock._accept()
            except OSError as exc:
                with self._lock:
                    self._serving -= 1
                    self._end_if_drained()
                # BlockingIOError, InterruptedError, ConnectionAbortedError: the backlog is
                # empty, or the client gave up
                if exc.errno in _TRANSIENT:
                    self._accept_failed(exc)
                    time.sleep(0.1)
                return None
            if self.admit is None or self.admit(address):
                return Connection(_socket.socket(self._family, socket.SOCK_STREAM, 0, fd), fd,
                                  address)
            os.close(fd)

    def _accept_failed(self, exc):
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            self._failed_at = now
            first = self._reported_at is None
            if not first and now - self._reported_at < _REPORT_EVERY:
                return
            failures, self._failures, self._reported_at = self._failures, 0, now
        if first:
            log.error("accept failed: %s; retrying (reported every %g s while it lasts)",
                      exc, _REPORT_EVERY)
        else:
            log.error("accept failed %d more time(s) since the last report: %s; retrying",
                      failures, exc)

    def _accept_recovered(self, now):
        """Once accept has not failed for a whole interval, say so: a success between two
        failures does not end it (at the descriptor limit, each connection closed lets one
        more be accepted, and every such success logged a new first failure)."""
        with self._lock:
            if self._reported_at is None or now - self._failed_at < _REPORT_EVERY:
                return
            failures, self._failures, self._reported_at = self._failures, 0, None
        log.info("accept works again (%d failure(s) since the last report)", failures)

    def park(self, connection):
        """Keep a connection until more bytes arrive on it. False when bytes arrived while
        it was being served: the caller reads them now."""
        fd = connection.fd
        with self._lock:
            if fd in self._arrived:
                self._arrived.discard(fd)
                return False
            self._serving -= 1
            self._parked[fd] = time.monotonic()
            if fd not in self._watched:
                self._watched[fd] = connection
                self._epoll.register(fd, _WATCHED)
                self._held()
            if connection.kept:
                self._kept.add(fd)
        return True

    def discard(self, connection):
        """Close a connection a worker is done with."""
        fd = connection.fd
        with self._lock:   # before the close frees its fd for another connection
            self._serving -= 1
            if fd in self._watched:
                del self._watched[fd]
                self._kept.discard(fd)
                self._arrived.discard(fd)
                self._held()
            if self.closed:
                self._end_if_drained()
        connection.close()

    def _held(self):
        """(lock held) Tell the other processes how many connections this one holds: the
        ones registered, which kept connections stay once served."""
        if self.handoff is not None:
            self.handoff.held(len(self._watched))

    def _end_if_drained(self, held=0):
        """(lock held) Once closed with nothing left to serve but the connections of `held`
        workers, wake every worker with None."""
        if self.closed and not self._ended and self._serving <= held and not self._parked:
            self._ended = True
            os.write(self._wake_write, b"x")

    def drain(self, client_timeout, held):
        """Called while draining: let go of the kept connections idle DRAIN_IDLE seconds
        (and of requests not complete within client_timeout), and end the drain once only
        `held` workers (stuck in Lua, which the server gave up on) still hold connections."""
        self.close_idle(DRAIN_IDLE, client_timeout)
        with self._lock:
            self._end_if_drained(held)

    def close_idle(self, max_idle, max_waiting=None):
        """Close parked connections: those the web server keeps and sent nothing on for
        max_idle seconds since they were parked idle, those whose request did not complete
        within max_waiting seconds (default: max_idle) of its first bytes or of their
        accept, unless bytes wait unread (then the client is waiting for us), and those
        answered 413 more than LINGER seconds ago. The requests cut short are counted in
        one line (a line each: 200 stalled clients, 200 lines). Called every second, it
        also says when accept works again."""
        max_waiting = max_waiting or max_idle
        now = time.monotonic()
        self._accept_recovered(now)
        idle_since, waiting_since, linger_limit = now - max_idle, now - max_waiting, now - LINGER
        with self._lock:
            expired = []
            for fd, parked_at in self._parked.items():
                c = self._watched[fd]
                if (c.lingering < linger_limit if c.lingering else not c.unread() and (
                        parked_at < idle_since if c.kept and c.began is None
                        else (c.began or parked_at) < waiting_since)):
                    expired.append(fd)
            for fd in expired:
                del self._parked[fd]
            self._kept.difference_update(expired)
            connections = [self._watched.pop(fd) for fd in expired]
            if expired:
                self._held()
            self._end_if_drained()
        stalled = sum(c.began is not None for c in connections)
        if stalled:
            log.info("%d connection(s) closed: request not complete within client_timeout "
                     "(%g s)", stalled, max_waiting)
        for connection in connections:
            connection.close()

    def close(self):
        """Start draining (see the module's docstring): accept no more connections; the
        workers get None once those held are served."""
        # before the listener closes: with processes > 1 the others keep the socket open,
        # so closing ours would leave it in this epoll set under a number reused later
        self._epoll.unregister(self.sock.fileno())
        # EPOLLEXCLUSIVE wakes one process for a new connection: one whose arrival woke this
        # process just before, and that no worker took, would wait for the next arrival to
        # wake another (a client sending one request at a time waited for ever, once in
        # about 15 replacements). Take what is queued now and serve it too.
        for _ in range(_ACCEPT_BATCH):
            connection = self._accept()
            if connection is None:
                break
            self.park(connection)
        if self.handoff is not None:
            # no process hands this one more connections: serve those handed before
            self._epoll.unregister(self._inbox)
            for connection in self._take_handed(self.handoff.close()):
                self.park(connection)
        with self._lock:
            self.closed = True
            self._end_if_drained()
