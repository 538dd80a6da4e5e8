"""One pool (php-fpm's [pool] section) as the supervisor runs it: its config, listener,
scoreboard, shared dictionaries and serving processes, the watch on its listener's queue,
its boot failures. The supervisor (supervisor.py) owns the daemon-wide parts: the main loop,
reaping, the restart throttle, reloads that add or remove pools. (Not `pool`: that is the
Lua state pool, states/pool.py.)"""

import logging
import os
import select
import signal
import time

from . import mainloop, procman
from .config import LISTENER, RESTART_ONLY, keep_running
from .ops.catch_output import Pipes, thread_name
from .ops.scoreboard import Scoreboard
from .request.handoff import Handoff

log = logging.getLogger("luafcgid")

# A process that exits before it first reported failed at boot: processes start again after
# 1, 2, 4 ... seconds, and after this many failures in a row of one process number the
# supervisor gives up.
BOOT_FAILURES = 4
# A connection no process accepted within this long waits for a process. The listener's
# queue is looked at again this long after a connection was seen in it (not at once, which
# would spin while the connection is being accepted), and a process starting or being
# replaced this often.
GLANCE = 0.05


class Child:
    """A serving process as the supervisor sees it."""

    def __init__(self, number, pid, now, pipes):
        self.number = number     # its scoreboard slot, from 1
        self.pid = pid
        self.pipes = pipes       # the read ends of its stdout and stderr (catch_output.Pipes)
        self.born = now
        self.beat = None         # monotonic time it last reported; None until it first has
        self.active_at = now     # its last report that showed it serving (or its start)
        self.requests = 0        # its request count as last reported
        self.busy = False        # it served during the last second it reported on
        self.leaving = None      # why it is being replaced or stopped
        self.successor = None    # the Child started in its place
        self.told = None         # when it was told to stop (SIGTERM)
        self.killed = False      # SIGKILLed as hung

    def idle(self):
        """Seconds it has reported serving nothing for; None while it starts. Its reports
        come every second, so this is up to a second short, never long."""
        return None if self.beat is None else self.beat - self.active_at


def kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class PoolGroup:
    def __init__(self, config, listener, dictionaries, serve):
        """Runs pool `config`'s serving processes on `listener` (a listener.Listener) as
        procman says, which share `dictionaries` (shared.Dictionaries); in a forked child,
        serve(group, number, pipes) runs process `number`, writing to `pipes`
        (catch_output.Pipes), and does not return."""
        self.name = config.pool_name
        # log lines name the pool when the file names pools
        self.label = f"pool {self.name}: " if config.prefix else ""
        self.config = config
        self.listener = listener
        self.dictionaries = dictionaries
        self.serve = serve
        # a slot for each process and for a successor beside each one being replaced
        self.scoreboard = Scoreboard(2 * config.processes, config.workers)
        # the processes hand each other connections (a slot a scoreboard number)
        self.handoff = Handoff(self.scoreboard.processes)
        self.children = {}   # pid -> Child
        self.failures = {}   # process number -> boot failures in a row
        self.held = 0.0      # monotonic time before which no process starts (a boot backoff)
        self.trimmed = 0.0   # when a process was last stopped for being idle
        self.queue = select.poll()
        self.queue.register(listener.sock, select.POLLIN)
        self.queued_at = None   # when a connection was first seen waiting in the queue
        self.looked_at = 0.0    # when a connection was last seen waiting in the queue
        self.at_most = False    # a request waited while the pool ran `processes` processes
        self.stopping = False   # stopped, or removed from the config by a reload
        self.failed = 0         # the exit status it gave up with, after boot failures

    def start(self, now):
        for _ in range(procman.initial(self.config)):
            self.spawn(now)
        log.info("%sluafcgid serving on %s with %s", self.label, self.listener.description,
                 procman.describe(self.config))

    def watch(self, now):
        """(the listener's descriptor when a connection waiting there would start a process,
        else None; how soon to look again)."""
        if now < self.held:
            return None, min(mainloop.TICK, self.held - now)
        # a process starting, or one waiting for its successor to start
        soon = any(child.beat is None or (child.leaving and not child.told)
                   for child in self.children.values())
        if (procman.starts_on_demand(self.config)
                and len(self.staying()) < self.config.processes and not self.stopping):
            since = now - self.looked_at
            if since < GLANCE:
                return None, GLANCE - since
            if not soon:
                return self.listener.sock.fileno(), mainloop.TICK
        return None, GLANCE if soon else mainloop.TICK

    def tick(self, now, held):
        """Observe and act; `held`: the daemon's restart throttle holds starts until then."""
        self._observe()
        self._kill_hung(now)
        self._manage(now, held)

    def reload(self, config, replace):
        """Keep the re-read `config` for the processes started from now on, and have every
        running process re-read it (each warns about what needs a restart), or with
        `replace` replace each (a successor first, then it drains): a process that became
        another user than the supervisor's may not read the file."""
        changed = keep_running(self.config, config, RESTART_ONLY + LISTENER)
        self.config = config
        if not replace:
            log.info("%sreloading every process", self.label)
            self.signal_all(signal.SIGHUP)
            return
        for name in changed:   # no process re-reads the file to say so
            log.warning("%sreload: %s changed; restart luafcgid to apply it", self.label, name)
        self.replace_all("runs the configuration before the reload")

    def replace_all(self, why):
        """Replace every process that stays: a successor first, then it drains."""
        for child in self.staying():
            self._replace(child, why)

    def stop(self):
        """Stop serving: the listener refuses from now on (the file of a Unix socket is
        gone), as each process closes its copy, so that the web server moves on to another
        upstream instead of waiting; every process drains and exits."""
        self.stopping = True
        self.listener.close()
        self.signal_all(signal.SIGTERM)

    def forget(self):
        """In a serving process of another pool, just forked: close this pool's socket and
        hand-off and unmap its scoreboard and shared dictionaries. None of it is that
        process's, and a script there with the FFI (or a C module) reads and writes any
        memory still mapped: another site's sessions. The supervisor keeps them all."""
        self.listener.sock.close()
        self.handoff.close()
        self.scoreboard.close()
        self.dictionaries.close()

    def signal_all(self, signum):
        for pid in list(self.children):
            kill(pid, signum)

    # -- what the processes do --------------------------------------------------------------

    def staying(self):
        return [child for child in self.children.values() if child.leaving is None]

    def _observe(self):
        """Read the scoreboard: which process has reported, is serving, asks to be replaced
        or has a worker stuck in Lua."""
        for slot in self.scoreboard.read():
            child = self.children.get(slot["pid"])
            if child is None or child.number != slot["process"]:
                continue
            if child.beat is None:
                self.failures.pop(child.number, None)   # it booted
            if slot["beat"] != child.beat:   # it reported again
                child.beat = slot["beat"]
                child.busy = slot["active_workers"] > 0 or slot["requests"] != child.requests
                child.requests = slot["requests"]
                if child.busy:
                    child.active_at = child.beat
            if child.leaving is None and slot["retiring"]:
                self._replace(child, "asks to be replaced (recycling)")
            elif child.leaving is None and slot["stuck_workers"]:
                self._replace(child, f"has {slot['stuck_workers']} worker(s) stuck in Lua")

    def _waiting(self, now, staying):
        """Whether a request waits for a process: a connection in the listener's queue that
        no process accepted within GLANCE, or at all when none runs."""
        if self.stopping or not self.queue.poll(0):
            self.queued_at = None
            return False
        self.looked_at = now
        if self.queued_at is None:
            self.queued_at = now
        return not staying or now - self.queued_at >= GLANCE

    def _manage(self, now, held):
        """Start and stop processes as procman's policy says; tell a process being replaced
        to stop once its successor has reported (at once if none is to start)."""
        staying = self.staying()
        waiting = procman.starts_on_demand(self.config) and self._waiting(now, staying)
        self._count_at_most(waiting, len(staying))
        start, stop = procman.plan(self.config, [
            procman.Process(child.pid, child.idle(), child.busy) for child in staying],
            waiting)
        if stop and now - self.trimmed >= mainloop.TICK:
            self.trimmed = now
            child = self.children[stop[0]]
            self._stop(child, f"served nothing for {child.idle():.1f} s (pm {self.config.pm})")
        started = 0
        while (started < start and now >= held
               and self.spawn(now, "a request was waiting" if waiting else None)):
            started += 1
            self.queued_at = None
        for child in list(self.children.values()):
            if child.leaving and not child.told:
                successor = child.successor
                if successor is not None and successor.beat is not None:
                    self._stop(child, f"is replaced by process {successor.number} "
                                      f"(pid {successor.pid})")
                elif successor is None and started == start:
                    self._stop(child, "needs no successor now")

    def _count_at_most(self, waiting, running):
        """php-fpm's max children reached: counted, with a warning, when a request waits
        while the pool runs all the processes it may; again only once it ran fewer."""
        if running < self.config.processes:
            self.at_most = False
        elif waiting and not self.at_most:
            self.at_most = True
            self.scoreboard.max_children_reached += 1
            log.warning("%sa request waits, and the pool runs all its %d processes: "
                        "consider raising processes", self.label, self.config.processes)

    def _replace(self, child, why):
        child.leaving = why
        log.info("%sprocess %d (pid %d) %s; replacing it", self.label, child.number,
                 child.pid, why)

    def _stop(self, child, why):
        """Tell a process to stop: it stops accepting, finishes what it holds and exits."""
        log.info("%sprocess %d (pid %d) %s; stopping it", self.label, child.number, child.pid,
                 why)
        child.leaving = child.leaving or why
        child.told = time.monotonic()
        kill(child.pid, signal.SIGTERM)

    # -- process life ---------------------------------------------------------------------

    def spawn(self, now, why=None):
        """Start a serving process, in place of one being replaced if any; the Child, or
        None when none may start now (stopping, backing off, or no slot free)."""
        used = {child.number for child in self.children.values()}
        free = [n for n in range(1, self.scoreboard.processes + 1) if n not in used]
        if self.stopping or now < self.held or not free:
            return None
        number = free[0]
        pipes = None
        try:
            pipes = Pipes()
            pid = os.fork()
        except OSError as exc:   # e.g. the process or file limit: like a failure at boot
            if pipes is not None:
                pipes.close()
            log.error("%scannot start process %d: %s", self.label, number, exc)
            self._failed_at_boot(number, 1)
            return None
        if not pid:
            self.serve(self, number, pipes)   # does not return
        pipes.forked()
        child = self.children[pid] = Child(number, pid, now, pipes)
        waiting = [c for c in self.children.values() if c.leaving and not c.told
                   and c.successor is None]
        if waiting:
            min(waiting, key=lambda c: c.born).successor = child
        log.info("%sprocess %d (pid %d) started%s", self.label, number, pid,
                 f": {why}" if why else "")
        return child

    def reaped(self, child, status, now):
        """Child `child` of this pool exited with wait status `status`: the exit status if it
        exited unasked after it booted (the daemon's restart throttle counts it), else None."""
        child.pipes.drain({stream: self.config.thread_name(thread_name(stream, child.number))
                           for stream in child.pipes.ends},
                          f"{self.label}process {child.number} (pid {child.pid}) wrote as it "
                          f"ended: ")
        if self.scoreboard.slot(child.number)["pid"] == child.pid:   # it reported, maybe unseen
            child.beat = child.beat or now
        self.scoreboard.clear(child.number)
        moved = self.handoff.vacate(child.number)
        if moved:
            log.info("%s%d connection(s) handed to process %d (pid %d), which ended unread, "
                     "went to process %d", self.label, moved[0], child.number, child.pid,
                     moved[1])
        for other in self.children.values():
            if other.successor is child:
                other.successor = None
        if self.stopping or child.told:
            return None
        code = os.waitstatus_to_exitcode(status)
        if child.beat is None:
            log.error("%sprocess %d (pid %d) exited with status %d before it was ready",
                      self.label, child.number, child.pid, code)
            self._failed_at_boot(child.number, code)
            return None
        return code

    def _failed_at_boot(self, number, code):
        failures = self.failures[number] = self.failures.get(number, 0) + 1
        if failures >= BOOT_FAILURES:
            log.error("%sprocess %d failed at boot %d times in a row; giving up (exit status "
                      "%d)", self.label, number, failures, code)
            self.failed = code or 1
            return
        pause = 2.0 ** (failures - 1)
        log.error("%sstarting processes again in %g s", self.label, pause)
        self.held = max(self.held, time.monotonic() + pause)

    def _kill_hung(self, now):
        """SIGKILL a process whose main loop has not reported for process_timeout seconds
        (then it is reaped and, if the policy says so, another starts), and one told to stop
        that has not within shutdown_timeout (and 5 s)."""
        for child in self.children.values():
            if child.killed:
                continue
            if child.told is not None:
                late = now - child.told > self.config.shutdown_timeout + 5
                if late:
                    log.error("%sprocess %d (pid %d) did not stop; killing it", self.label,
                              child.number, child.pid)
            else:
                silent = now - max(child.born, child.beat or 0.0)
                late = silent > self.config.process_timeout
                if late:
                    log.error("%sprocess %d (pid %d) has not reported for %.1f s; killing it",
                              self.label, child.number, child.pid, silent)
            if late:
                kill(child.pid, signal.SIGKILL)
                child.killed = True
