"""With processes > 1: every serving process's request counters, in memory the supervisor
shares with the processes it forks, so that whichever process answers the status page can
report the whole pool (as php-fpm's scoreboard does), and the supervisor sees which process
has a worker stuck in Lua (deadline.py). Each process writes only its own slot, once a second
from its main thread."""

import mmap
import struct
import time

_SLOT = struct.Struct("=QQQQQQdQd")
# updated: Unix time, for people; beat: CLOCK_MONOTONIC (one clock for every process on the
# machine), for the supervisor's hang check, which a change of the wall clock must not fool
FIELDS = ("pid", "requests", "failed_requests", "slow_requests", "active_workers", "workers",
          "updated", "stuck_workers", "beat")


class Scoreboard:
    def __init__(self, processes):
        self.processes = processes
        # anonymous and MAP_SHARED (mmap's default): the forked children share the pages
        self._memory = mmap.mmap(-1, _SLOT.size * processes)

    def publish(self, number, pid, requests, failed, slow, active, workers, stuck):
        _SLOT.pack_into(self._memory, (number - 1) * _SLOT.size, pid, requests, failed, slow,
                        active, workers, time.time(), stuck, time.monotonic())

    def read(self):
        """One dict per process, numbered from 1; a slot not yet written has pid 0."""
        return [dict(zip(FIELDS, _SLOT.unpack_from(self._memory, i * _SLOT.size)),
                     process=i + 1) for i in range(self.processes)]
