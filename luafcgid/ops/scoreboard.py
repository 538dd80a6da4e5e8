"""Under a supervisor: every serving process's request counters, in memory the supervisor
shares with the processes it forks, so that whichever process answers the status page can
report the whole pool (as php-fpm's scoreboard does), and the supervisor sees which process
is serving, has a worker stuck in Lua (deadline.py) or asks to be replaced (recycling); and
each process's workers for the status page's ?full. Each process writes only its own slots,
once a second from its main thread; the supervisor clears the slot of a process that
ended."""

import json
import mmap
import struct
import time

_SLOT = struct.Struct("=QQQQQQdQdQ")
# updated: Unix time, for people; beat: CLOCK_MONOTONIC (one clock for every process on the
# machine), for the supervisor's hang check, which a change of the wall clock must not fool
FIELDS = ("pid", "requests", "failed_requests", "slow_requests", "active_workers", "workers",
          "updated", "stuck_workers", "beat", "retiring")


# the pool's own figures, one field each, so that no writer overwrites another's: php-fpm's
# max children reached, which the supervisor writes; and whether a full listing of the
# workers was asked for, which any process sets
_POOL = struct.Struct("=Q")
_LISTED = struct.Struct("=Q")
_HEAD = _POOL.size + _LISTED.size

# a process's workers, as the status page's ?full lists them: JSON, behind its length
_LENGTH = struct.Struct("=I")
# room per worker (twice `workers`: stuck ones are replaced); longer strings are cut as
# php-fpm cuts them in its scoreboard (its request_uri holds 128 bytes, script 256)
_PER_WORKER = 1024
_CUT = {"request uri": 128, "script": 256, "user": 32, "request method": 16}


class Scoreboard:
    def __init__(self, processes, workers=1):
        self.processes = processes
        # anonymous and MAP_SHARED (mmap's default): the forked children share the pages
        self._memory = mmap.mmap(-1, _HEAD + _SLOT.size * processes)
        self._room = 2 * workers * _PER_WORKER
        self._workers = mmap.mmap(-1, self._room * processes)

    def close(self):
        """Unmap it, in a serving process of another pool, whose scripts are not to read or
        write it (with the FFI, or a C module). Nothing exports a buffer of it."""
        self._memory.close()
        self._workers.close()

    def publish_workers(self, number, entries):
        """Process `number`'s workers: a list of plain dicts (the status page's entries)."""
        for entry in entries:
            for name, most in _CUT.items():
                if len(entry[name]) > most:
                    entry[name] = entry[name][:most]
        data = json.dumps(entries).encode()[:self._room - _LENGTH.size]
        start = (number - 1) * self._room
        self._workers[start + _LENGTH.size:start + _LENGTH.size + len(data)] = data
        _LENGTH.pack_into(self._workers, start, len(data))

    def workers(self, number):
        """What process `number` last published with publish_workers ([] if nothing, or
        if it was read in the middle of a write)."""
        start = (number - 1) * self._room
        length, = _LENGTH.unpack_from(self._workers, start)
        try:
            return json.loads(self._workers[start + _LENGTH.size:start + _LENGTH.size + length])
        except ValueError:
            return []

    @staticmethod
    def _at(number):
        return _HEAD + (number - 1) * _SLOT.size

    def publish(self, number, pid, requests, failed, slow, active, workers, stuck, retiring):
        _SLOT.pack_into(self._memory, self._at(number), pid, requests, failed, slow,
                        active, workers, time.time(), stuck, time.monotonic(), retiring)

    def clear(self, number):
        """Empty the slot of process `number`, which ended."""
        _SLOT.pack_into(self._memory, self._at(number), *[0] * len(FIELDS))

    def slot(self, number):
        """Process `number`'s slot as a dict; one not written (or cleared) has pid 0."""
        return dict(zip(FIELDS, _SLOT.unpack_from(self._memory, self._at(number))),
                    process=number)

    @property
    def max_children_reached(self):
        """How often a request waited for a process while the pool ran `processes` of them
        (php-fpm's max children reached); only the supervisor counts it."""
        return _POOL.unpack_from(self._memory, 0)[0]

    @max_children_reached.setter
    def max_children_reached(self, count):
        _POOL.pack_into(self._memory, 0, count)

    @property
    def listed(self):
        """Whether the status page listed the workers in full (?full), in any process."""
        return bool(_LISTED.unpack_from(self._memory, _POOL.size)[0])

    def list_in_full(self):
        _LISTED.pack_into(self._memory, _POOL.size, 1)

    def read(self):
        """Every slot, numbered from 1."""
        return [self.slot(number) for number in range(1, self.processes + 1)]
