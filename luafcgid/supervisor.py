"""processes > 1: a parent that forks the serving processes and looks after them.

The children share the parent's listening socket; each has its own worker threads, state
pool and interpreter lock, so Python work runs on every core. The parent starts no
threads (it forks), restarts a child that dies, replaces a child with a worker stuck in Lua
(as php-fpm's master kills a child past request_terminate_timeout), passes SIGHUP on (each
child re-reads the config) and on SIGTERM stops the children, waits for them to drain and
removes the socket.
"""

import logging
import os
import signal
import time

from . import listener, logs, signals, systemd
from .scoreboard import Scoreboard
from .server import Server

log = logging.getLogger("luafcgid")

_RESPAWN_PAUSE = 1.0   # seconds between restarts of the same child, against crash loops


class Supervisor:
    def __init__(self, config, sock, reread, inherited=False):
        """`inherited`: `sock` was passed by systemd, which keeps it (and its file)."""
        self.config = config
        self.sock = sock
        self.reread = reread
        self.inherited = inherited
        self.scoreboard = Scoreboard(config.processes)
        self.children = {}   # pid -> process number
        self.started = {}    # process number -> when it was last started
        self.replacing = {}  # pid -> when it was told to stop, for being stuck
        self.stopping = False

    def run(self):
        signals.block()   # before forking: children inherit the mask and sigwait too
        for number in range(1, self.config.processes + 1):
            self._spawn(number)
        where = listener.describe(self.config, self.inherited)
        log.info("luafcgid serving on %s with %d processes of %d workers", where,
                 self.config.processes, self.config.workers)
        status = lambda: f"serving on {where} with {len(self.children)} processes"
        systemd.notify("READY=1", f"STATUS={status()}", f"MAINPID={os.getpid()}")
        watchdog = systemd.Watchdog()
        try:
            while True:
                signum = signals.wait(timeout=watchdog.timeout(1.0))
                self._reap()
                self._replace_stuck()
                watchdog.tick(status)
                if signum in signals.STOP:
                    break
                if signum == signals.REOPEN:
                    logs.reopen()
                    self._signal_all(signal.SIGUSR1)
                if signum == signals.RELOAD:
                    systemd.reloading()
                    if self.reread() is not None:
                        log.info("SIGHUP: reloading every process")
                        self._signal_all(signal.SIGHUP)
                    systemd.notify("READY=1", f"STATUS={status()}")
        finally:
            systemd.notify("STOPPING=1")
            self._stop()
        return 0

    def _spawn(self, number):
        pause = self.started.get(number, 0) + _RESPAWN_PAUSE - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        self.started[number] = time.monotonic()
        pid = os.fork()
        if pid:
            self.children[pid] = number
            return
        code = 1
        try:
            Server(self.config, self.sock, process=number, inherited=self.inherited,
                   scoreboard=self.scoreboard).serve_forever(self.reread)
            code = 0
        except BaseException:
            log.exception("process %d failed", number)
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            number = self.children.pop(pid, None)
            if number is not None and not self.stopping:
                log.error("process %d (pid %d) exited with status %d; starting it again",
                          number, pid, os.waitstatus_to_exitcode(status))
                self._spawn(number)

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

    def _stop(self):
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        if self.children:
            log.error("processes %s did not stop; killing them", sorted(self.children.values()))
            self._signal_all(signal.SIGKILL)
        if self.inherited:
            self.sock.close()
        else:
            listener.remove(self.config, self.sock)
        log.info("stopped")
