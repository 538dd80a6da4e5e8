"""Connections handed between a pool's serving processes: those just accepted, so that the
connections the web server keeps are spread over the processes, and those parked in a
process whose workers are all in long calls, so that none waits for them while another
process is idle.

A connection stays in the epoll set of the process that accepted it, and when nginx keeps
connections, the process that wakes for a new one accepts the whole backlog (acceptor.py,
_accept_backlog: new connections then take turns with the kept ones). A burst of
connections nginx opens at once ended up in one process, which nginx then reused while the
other idled: with 2 processes of 2 workers, a page that waits 10 ms was served at 188-285
requests a second through kept connections against 380 plain (380 kept since). Accepting
one connection at a time served it kept at 381 a second, but at 256 connections the page's
p99 rose from 133 ms to 1.3 s.

So the process that accepted a batch keeps its share of it and hands the rest, by their
descriptors (SCM_RIGHTS), to the processes that hold fewer connections, each of which
serves them first, as if it had accepted them: nothing of them has been read. What a process
holds is what it has registered in its epoll set (kept connections, once served; see
Acceptor), and what was sent to it that it has not received yet. Both live in memory the
supervisor maps before it forks, beside one datagram socket pair a process slot (a
scoreboard number). Only a batch is spread: a connection accepted alone (plain mode, and
before one is kept) costs nothing more.

A connection parked in a process is served by that process's workers only. When the last of
them goes into a long call (duty.py: nobody left on duty), the process hands what it has
parked to a process a worker of which waits in epoll_wait, idle (a flag in its slot): those
on which nothing has arrived (kept ones idle, ones accepted before their request), and one
on which a request waits (acceptor.hand_parked). Without it, a request arriving on one
waited for a page of 50 ms to end while the other process idled (bench/mixed.py: 2.3% of
hello requests among 10% such pages, 4 clients on 2 x 2). Only a connection of which nothing
is read moves, each flagged kept or not, so no request is ever split between processes.

Draining: a process stops taking connections (close) under its slot's lock, a
process-shared mutex like the shared dictionaries', then receives what was sent before; a
sender checks that the slot takes connections and sends under the same lock, so nothing
arrives after. What was sent to a process that died without draining stays in its slot's
socket, whose ends the supervisor keeps: the supervisor hands it on to the process holding
fewest (vacate), or, when none takes connections, the next process in that slot serves it.
"""

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import socket
import struct
import threading

from ..shared import mutex
from ..shared.layout import MUTEX

log = logging.getLogger("luafcgid")

# a slot: its mutex, then these counters: the pid taking connections in it (0: none), the
# connections it holds, those it received and those sent to it (by the others), and whether
# a worker of it waits in epoll_wait (written without the lock: a hint)
_COUNTER = struct.Struct("=Q")
_PID, _HELD, _RECEIVED, _SENT, _IDLE = (MUTEX + _COUNTER.size * n for n in range(5))
_ROOM = MUTEX + 5 * _COUNTER.size
# a batch (acceptor._ACCEPT_BATCH) is sent in one message, and what a process hands on at
# most this many: Linux's SCM_MAX_FD
MAX_FDS = 253
_RECEIVING = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
# a message's bytes: one a descriptor, whether the web server keeps that connection
_KEPT, _NOT_KEPT = b"k", b"n"


class Handoff:
    """One pool's slots, made by the supervisor before it forks the pool's processes."""

    def __init__(self, slots):
        self._memory = mmap.mmap(-1, _ROOM * slots)   # shared with the forked processes
        base = self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._memory))
        self._locks = [ctypes.c_void_p(base + _ROOM * n) for n in range(slots)]
        for lock in self._locks:
            mutex.initialize(lock.value)
        # (receiving end, sending end) a slot; not inheritable: a page's processes exec
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                       for _ in range(slots)]
        for pair in self._pairs:
            for end in pair:
                end.setblocking(False)

    def share(self, number):
        """In serving process `number` (from 1), just forked: its Share. The other slots'
        receiving ends are the supervisor's (and their processes')."""
        for other, (inbox, _) in enumerate(self._pairs, 1):
            if other != number:
                inbox.close()
        return Share(self, number)

    def vacate(self, number):
        """In the supervisor, once process `number` ended: nothing more is sent to its slot.
        What was sent to it and not received (it died without draining) goes to the process
        holding fewest connections: (how many, to which number), or None when nothing went
        (nothing waited, or no process takes connections: the next one in the slot will)."""
        with self.locked(number):
            self.put(number, _PID, 0)
        loads = {other: self.load(other) for other in self.slots() if other != number}
        loads = {other: load for other, load in loads.items() if load is not None}
        if not loads:
            return None
        with self.locked(number):
            handed = _receive(self._pairs[number - 1][0])
            self.put(number, _RECEIVED, self.get(number, _RECEIVED) + len(handed))
        if not handed:
            return None
        target = min(loads, key=loads.get)
        moved = self.send(target, handed)
        if moved < len(handed):   # it stopped meanwhile: the rest back into the slot
            with self.locked(number):
                back = _post(self._pairs[number - 1][1], handed[moved:])
                self.put(number, _SENT, self.get(number, _SENT) + back)
            if moved + back < len(handed):
                log.error("%d connection(s) handed to process %d were lost: its socket is "
                          "full", len(handed) - moved - back, number)
        for fd, _ in handed:   # the supervisor's copies
            os.close(fd)
        return (moved, target) if moved else None

    def close(self):
        """In the processes of another pool: none of this is theirs. The slots are unmapped
        too (nothing exports a buffer of them: __init__'s is let go of at once)."""
        for pair in self._pairs:
            for end in pair:
                end.close()
        self._memory.close()

    @contextlib.contextmanager
    def locked(self, number):
        lock = self._locks[number - 1]
        if mutex.lock(lock) == errno.EOWNERDEAD:
            # its holder died: each write under it is of one counter, nothing to repair
            mutex.consistent(lock)
        try:
            yield
        finally:
            mutex.unlock(lock)

    def get(self, number, field):
        return _COUNTER.unpack_from(self._memory, _ROOM * (number - 1) + field)[0]

    def put(self, number, field, value):
        _COUNTER.pack_into(self._memory, _ROOM * (number - 1) + field, value)

    def load(self, number):
        """Connections process `number` holds or was sent; None when it takes none."""
        if not self.get(number, _PID):
            return None
        return (self.get(number, _HELD) + self.get(number, _SENT)
                - self.get(number, _RECEIVED))

    def idle_flag(self, number):
        """Process `number`'s idle flag, as a ctypes integer at its address (a buffer
        exported from the map would keep close() from unmapping it)."""
        return ctypes.c_uint64.from_address(self._base + _ROOM * (number - 1) + _IDLE)

    def idle(self, but):
        """The number of a process, other than `but`, that takes connections and has a
        worker waiting in epoll_wait; None if none has."""
        for number in self.slots():
            if number != but and self.get(number, _IDLE) and self.get(number, _PID):
                return number
        return None

    def send(self, number, handed):
        """Hand the connections of the (descriptor, kept) pairs `handed` to process `number`:
        how many went, in order (MAX_FDS a message); those after stay here (it takes no
        connections, or its socket is full)."""
        with self.locked(number):
            if not self.get(number, _PID):
                return 0
            sent = _post(self._pairs[number - 1][1], handed)
            self.put(number, _SENT, self.get(number, _SENT) + sent)
        return sent

    def slots(self):
        return range(1, len(self._pairs) + 1)

    def inbox(self, number):
        return self._pairs[number - 1][0]


class Share:
    """A serving process's part: its slot, written only by it (but for what the others send
    it), and the others' slots, which it sends to."""

    def __init__(self, handoff, number):
        self._handoff = handoff
        self.number = number
        self._inbox = handoff.inbox(number)
        self.fileno = self._inbox.fileno()
        self._received = 0
        self._lock = threading.Lock()
        # the acceptor sets its value around each epoll_wait that may block: a write into
        # shared memory, not a call
        self.idle_flag = handoff.idle_flag(number)

    def open(self):
        """Take connections from the others from now on."""
        handoff = self._handoff
        with handoff.locked(self.number), self._lock:
            # a slot counts on from its previous process, which may have left connections
            # in its socket (see the module's docstring)
            self._received = handoff.get(self.number, _RECEIVED)
            handoff.put(self.number, _HELD, 0)
            handoff.put(self.number, _IDLE, 0)
            handoff.put(self.number, _PID, os.getpid())

    def close(self):
        """Take no more connections from the others: (descriptor, kept) of those sent
        before."""
        with self._handoff.locked(self.number):
            self._handoff.put(self.number, _PID, 0)
        return self.receive()

    def idle_process(self):
        """The number of another process with a worker waiting idle, or None."""
        return self._handoff.idle(but=self.number)

    def hand(self, number, connections):
        """Hand parked `connections` (MAX_FDS at most) to process `number`; False when they
        stay here."""
        return self._handoff.send(number, _pairs(connections)) == len(connections)

    def held(self, count):
        """This process now holds `count` connections."""
        self._handoff.put(self.number, _HELD, count)

    def receive(self):
        """(descriptor, kept) of the connections handed to this process that have
        arrived."""
        handed = _receive(self._inbox)
        if handed:
            with self._lock:   # workers receive at once (level-triggered)
                self._received += len(handed)
                self._handoff.put(self.number, _RECEIVED, self._received)
        return handed

    def spread(self, batch, mine):
        """Split `batch`, connections just accepted and not read, between this process,
        which holds `mine`, and the others: one at a time to whichever holds fewest, this
        one on a tie. (kept, handed): the ones handed were sent away (close them here)."""
        handoff = self._handoff
        loads = {}
        for number in handoff.slots():
            if number != self.number:
                load = handoff.load(number)
                if load is not None:
                    loads[number] = load
        kept, given = [], {}
        for connection in batch:
            number = min(loads, key=loads.get, default=None)
            if number is not None and loads[number] < mine:
                loads[number] += 1
                given.setdefault(number, []).append(connection)
            else:
                mine += 1
                kept.append(connection)
        handed = []
        for number, connections in given.items():
            if handoff.send(number, _pairs(connections)) == len(connections):
                handed += connections
            else:
                kept += connections
        return kept, handed


def _pairs(connections):
    return [(connection.fd, connection.kept) for connection in connections]


def _post(end, handed):
    """Send the (descriptor, kept) pairs `handed` through `end`, MAX_FDS a message: how
    many went (a message refused, a full socket, ends it)."""
    for start in range(0, len(handed), MAX_FDS):
        part = handed[start:start + MAX_FDS]
        try:
            socket.send_fds(end, [b"".join(_KEPT if kept else _NOT_KEPT for _, kept in part)],
                            [fd for fd, _ in part], socket.MSG_DONTWAIT)
        except OSError:
            return start
    return len(handed)


def _receive(inbox):
    """(descriptor, kept) of every connection waiting in `inbox`."""
    handed = []
    while True:
        try:
            kept, fds, flags, _ = socket.recv_fds(inbox, MAX_FDS, MAX_FDS, _RECEIVING)
        except (BlockingIOError, InterruptedError):
            return handed
        handed += zip(fds, (flag == _KEPT[0] for flag in kept))
        if flags & socket.MSG_CTRUNC:
            log.error("connections handed to a process were lost: no descriptor free for "
                      "them (the open files limit)")
