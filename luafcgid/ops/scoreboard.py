"""Under a supervisor: every serving process's request counters, in memory the supervisor
shares with the processes it forks, so that whichever process answers the status page can
report the whole pool (as php-fpm's scoreboard does), and the supervisor sees which process
is serving, has a worker stuck in Lua (deadline.py) or asks to be replaced (recycling). Each
process writes only its own slot, once a second from its main thread; the supervisor clears
the slot of a process that ended."""

import mmap
import struct
import time

_SLOT = struct.Struct("=QQQQQQdQdQ")
# updated: Unix time, for people; beat: CLOCK_MONOTONIC (one clock for every process on the
# machine), for the supervisor's hang check, which a change of the wall clock must not fool
FIELDS = ("pid", "requests", "failed_requests", "slow_requests", "active_workers", "workers",
          "updated", "stuck_workers", "beat", "retiring")


class Scoreboard:
    def __init__(self, processes):
        self.processes = processes
        # anonymous and MAP_SHARED (mmap's default): the forked children share the pages
        self._memory = mmap.mmap(-1, _SLOT.size * processes)

    def publish(self, number, pid, requests, failed, slow, active, workers, stuck, retiring):
        _SLOT.pack_into(self._memory, (number - 1) * _SLOT.size, pid, requests, failed, slow,
                        active, workers, time.time(), stuck, time.monotonic(), retiring)

    def clear(self, number):
        """Empty the slot of process `number`, which ended."""
        _SLOT.pack_into(self._memory, (number - 1) * _SLOT.size, *[0] * len(FIELDS))

    def slot(self, number):
        """Process `number`'s slot as a dict; one not written (or cleared) has pid 0."""
        return dict(zip(FIELDS, _SLOT.unpack_from(self._memory, (number - 1) * _SLOT.size)),
                    process=number)

    def read(self):
        """Every slot, numbered from 1."""
        return [self.slot(number) for number in range(1, self.processes + 1)]
