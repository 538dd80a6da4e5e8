"""processes > 1: the supervisor, which alone owns process life (the arbiter).

The serving processes it forks share its listening socket; each has its own worker threads,
state pool and interpreter lock, so Python work runs on every core. The supervisor starts
no threads (it forks). It keeps the current config (re-read on SIGHUP) for every process it
starts, passes SIGHUP and SIGUSR1 on, replaces a process that dies, stops reporting on the
scoreboard (hung) or has a worker stuck in Lua (as php-fpm's master kills a child past
request_terminate_timeout), backs off from one that fails at boot and gives up after a few
failures in a row, and on SIGTERM stops them all, waits for them to drain and closes the
listener. It runs in mainloop.run as a role.
"""

import logging
import os
import signal
import time

from . import mainloop
from .config import LISTENER, RESTART_ONLY, keep_running
from .ops.scoreboard import Scoreboard
from .server import Server

log = logging.getLogger("luafcgid")

# A process that exits before it first reported failed at boot: it is started again after
# 1, 2, 4 ... seconds, and after this many failures in a row the supervisor gives up.
BOOT_FAILURES = 4


class Supervisor:
    def __init__(self, config, listener, reread, dictionaries):
        """Forks config.processes serving processes on `listener` (a listener.Listener),
        which share `dictionaries` (shared.Dictionaries); a reload applies reread() (a
        Config, or None when the file is bad)."""
        self.config = config
        self.dictionaries = dictionaries
        self.listener = listener
        self.reread = reread
        self.scoreboard = Scoreboard(config.processes)
        self.children = {}   # pid -> process number
        self.born = {}       # process number -> (pid, monotonic time it was started)
        self.due = {}        # process number -> monotonic time to start it (again)
        self.failures = {}   # process number -> boot failures in a row
        self.replacing = {}  # pid -> when it was told to stop, for a worker stuck in Lua
        self.stopping = False
        self.exit_code = 0
        self.pid = os.getpid()

    def run(self):
        """Serve until stopped; the exit status."""
        mainloop.run(self)
        return self.exit_code

    # -- the role ---------------------------------------------------------------------------

    def start(self):
        for number in range(1, self.config.processes + 1):
            self._spawn(number)
        log.info("luafcgid serving on %s with %d processes of %d workers",
                 self.listener.description, self.config.processes, self.config.workers)

    def summary(self):
        return f"serving on {self.listener.description} with {len(self.children)} processes"

    def healthy(self):
        return True

    def tick(self):
        self._reap()
        self._kill_hung()
        self._replace_stuck()
        now = time.monotonic()
        for number, when in list(self.due.items()):
            if when <= now:
                del self.due[number]
                self._spawn(number)
        return self.exit_code == 0

    def reopen(self):
        self._signal_all(signal.SIGUSR1)

    def reload(self):
        """Keep the re-read config for the processes started from now on, and have every
        running process re-read it (each warns about what needs a restart)."""
        config = self.reread()
        if config is None:
            return
        keep_running(self.config, config, RESTART_ONLY + LISTENER)
        self.config = config
        log.info("reloading every process")
        self._signal_all(signal.SIGHUP)

    def stop(self):
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        if self.children:
            log.error("processes %s did not stop; killing them", sorted(self.children.values()))
            self._signal_all(signal.SIGKILL)
        self.listener.close()
        log.info("stopped")

    # -- process life ---------------------------------------------------------------------

    def _spawn(self, number):
        try:
            pid = os.fork()
        except OSError as exc:   # e.g. the process limit: like a failure at boot
            log.error("cannot start process %d: %s", number, exc)
            self._failed_at_boot(number, 1)
            return
        if pid:
            self.children[pid] = number
            self.born[number] = (pid, time.monotonic())
            return
        code = 1
        try:
            mainloop.run(Server(self.config, self.listener.shared(), self.reread,
                                process=number, scoreboard=self.scoreboard,
                                supervisor=self.pid, dictionaries=self.dictionaries),
                         service=False)
            code = 0
        except BaseException:
            log.exception("process %d failed", number)
        finally:
            logging.shutdown()
            os._exit(code)

    def _reported(self, number, pid):
        """Whether process `number` (pid `pid`) has reported on the scoreboard: the
        monotonic time it last did, or None."""
        slot = self.scoreboard.read()[number - 1]
        return slot["beat"] if slot["pid"] == pid else None

    def _reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            number = self.children.pop(pid, None)
            if number is None or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            if self._reported(number, pid) is None:
                log.error("process %d (pid %d) exited with status %d before it was ready",
                          number, pid, code)
                self._failed_at_boot(number, code)
            else:
                log.error("process %d (pid %d) exited with status %d; starting it again",
                          number, pid, code)
                self.failures.pop(number, None)
                self.due[number] = time.monotonic()

    def _failed_at_boot(self, number, code):
        failures = self.failures[number] = self.failures.get(number, 0) + 1
        if failures >= BOOT_FAILURES:
            log.error("process %d failed at boot %d times in a row; giving up (exit status %d)",
                      number, failures, code)
            self.exit_code = code or 1
            return
        pause = 2.0 ** (failures - 1)
        log.error("starting process %d again in %g s", number, pause)
        self.due[number] = time.monotonic() + pause

    def _kill_hung(self):
        """SIGKILL a process whose main loop has not reported for process_timeout seconds
        (its reaping then starts it again)."""
        now = time.monotonic()
        for pid, number in self.children.items():
            born_pid, born_at = self.born[number]
            beat = self._reported(number, pid)
            # a kill below moves born_at, so it is not repeated before the reaping
            silent = now - max(born_at, beat or 0.0)
            if silent > self.config.process_timeout:
                log.error("process %d (pid %d) has not reported for %.1f s; killing it",
                          number, pid, silent)
                self._kill(pid, signal.SIGKILL)
                self.born[number] = (born_pid, now)

    def _replace_stuck(self):
        """A child whose scoreboard slot shows a worker stuck in Lua (deadline.py) is told to
        stop, which lets its other requests finish; one still there after shutdown_timeout
        (and 5 s) is killed. _reap starts its successor."""
        now = time.monotonic()
        for slot in self.scoreboard.read():
            pid = slot["pid"]
            if slot["stuck_workers"] and pid in self.children and pid not in self.replacing:
                log.error("process %d (pid %d) has %d worker(s) stuck in Lua; replacing it",
                          slot["process"], pid, slot["stuck_workers"])
                self.replacing[pid] = now
                self._kill(pid, signal.SIGTERM)
        for pid, since in list(self.replacing.items()):
            if pid not in self.children:
                del self.replacing[pid]
            elif now - since > self.config.shutdown_timeout + 5:
                self._kill(pid, signal.SIGKILL)

    @staticmethod
    def _kill(pid, signum):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def _signal_all(self, signum):
        for pid in list(self.children):
            self._kill(pid, signum)
