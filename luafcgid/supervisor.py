"""The supervisor, which alone owns process life (the arbiter), whenever procman.supervised:
several pools, several processes, a pm other than static, or recycling.

It runs every pool (pool_group.py: php-fpm's [pool] sections): each pool's serving processes
share that pool's listening socket; each has its own worker threads, state pool and
interpreter lock, so Python work runs on every core. The supervisor starts no threads (it
forks). It keeps the current config (re-read on SIGHUP) for every process it starts and
passes SIGHUP and SIGUSR1 on (on SIGUSR1 it replaces the processes that became another user,
who may not reopen the error log); a reload also starts a pool added to the file and stops
one removed from it. Each pool observes its processes on its scoreboard (and, when requests
waiting may start one, its listener's queue), and procman's policy says how many run. A
process that asks for it (recycling) or has a worker stuck in Lua is replaced (as php-fpm's
master kills a child past request_terminate_timeout): the successor starts first, then the
old one is told to stop and drains. A process that stops reporting (hung) is killed, one
that dies restarted (the daemon waits longer and longer when they keep dying), one that
fails at boot backed off from, and a pool gives up after a few failures in a row (the daemon
exits once every pool has). On SIGTERM it stops them all, waits for them to drain and closes
the listeners. It runs in mainloop.run as a role.

When the pools run as different users the supervisor stays root, as php-fpm's master does,
and each serving process becomes its pool's user right after the fork, before any thread
starts.
"""

import logging
import os
import select
import signal
import time

from . import mainloop, procman
from .config import RESTART_ONLY, keep_running
from .listener import Listener, ListenError
from .ops import logs, privileges
from .pool_group import PoolGroup
from .server import Server
from .shared.dictionaries import Dictionaries

log = logging.getLogger("luafcgid")


def _as_another_user(pool):
    """Whether `pool`'s processes become another user than the supervisor: a root
    supervisor's do when the pools run as different users."""
    return os.geteuid() == 0 and privileges.target(pool) is not None


class Supervisor:
    def __init__(self, config, listeners, dictionaries, reread):
        """Runs every pool of `config` on its listener.Listener in `listeners` (pool name ->
        Listener), its processes sharing its shared.Dictionaries in `dictionaries` (pool name
        -> Dictionaries); a reload applies reread() (a Config, or None when the file is
        bad), and a serving process of pool P reloads with reread(P)."""
        self.config = config
        self.reread = reread
        self.groups = {name: PoolGroup(pool, listeners[name], dictionaries[name], self._serve)
                       for name, pool in config.pools.items()}
        self.retired = []     # pools removed by a reload whose processes still drain
        self.held = 0.0       # monotonic time before which no process starts (the throttle)
        self.throttle = procman.RestartThrottle()
        self.epoll = None     # the listeners watch() waits on, registered in one epoll
        self.watched = None   # their descriptors
        self.stopping = False
        self.exit_code = 0
        self.pid = os.getpid()

    def run(self):
        """Serve until stopped; the exit status."""
        mainloop.run(self)
        return self.exit_code

    def _all(self):
        return list(self.groups.values()) + self.retired

    # -- the role ---------------------------------------------------------------------------

    def start(self):
        now = time.monotonic()
        for group in self.groups.values():
            group.start(now)

    def summary(self):
        processes = sum(len(group.children) for group in self._all())
        listeners = ", ".join(group.listener.description for group in self.groups.values())
        return f"serving on {listeners} with {processes} processes"

    def healthy(self):
        return True

    def watch(self):
        """For the main loop: one descriptor, an epoll of the listeners where a connection
        waiting would start a process (it wakes the supervisor at once), and how soon to look
        again."""
        now = time.monotonic()
        if now < self.held:
            return None, min(mainloop.TICK, self.held - now)
        wanted, timeout = set(), mainloop.TICK
        for group in self.groups.values():
            fd, soon = group.watch(now)
            timeout = min(timeout, soon)
            if fd is not None:
                wanted.add(fd)
        if wanted != self.watched:
            # made anew when the set changes (rarely: a process starts or stops), so that
            # no closed listener stays registered
            if self.epoll is not None:
                self.epoll.close()
            self.epoll = select.epoll()
            for fd in wanted:
                self.epoll.register(fd, select.EPOLLIN)
            self.watched = wanted
        return (self.epoll.fileno() if wanted else None), timeout

    def tick(self):
        """Every second, and as soon as watch() asked: reap, observe, act."""
        now = time.monotonic()
        self._reap(now)
        for group in self._all():
            group.tick(now, self.held)
            if group.failed and not group.stopping:
                group.stop()
                self.watched = None
        self.retired = [group for group in self.retired if group.children]
        failed = [group.failed for group in self.groups.values()]
        if failed and all(failed):
            self.exit_code = failed[0]
        return self.exit_code == 0

    def reopen(self):
        """SIGUSR1, once the supervisor reopened its own logs: every process reopens its
        pool's. A process that became another user keeps the error log it inherited (root's,
        which it may not open), so it is replaced too, as php-fpm replaces its children on
        SIGUSR1: its successor inherits the file just reopened."""
        self._signal_all(signal.SIGUSR1)
        if not logs.files(self.config):   # syslog or standard error: nothing to go stale
            return
        for group in self.groups.values():
            if _as_another_user(group.config):
                group.replace_all("writes to the error log as it was before SIGUSR1")

    def reload(self):
        """Every pool that stays reloads (pool_group.reload); a pool added to the file starts,
        one removed from it stops (its processes drain; its socket file is removed)."""
        config = self.reread()
        if config is None:
            return
        keep_running(self.config, config, RESTART_ONLY)
        self.config = config
        for name, group in list(self.groups.items()):
            if name in config.pools:
                pool = config.pools[name]
                # a process of another user may not read the file: it is replaced instead
                group.reload(pool, _as_another_user(pool))
                continue
            log.info("pool %s: removed from the configuration; stopping it", name)
            group.stop()
            self.retired.append(self.groups.pop(name))
            self.watched = None
        now = time.monotonic()
        for name, pool in config.pools.items():
            if name not in self.groups:
                self._add(pool, now)

    def _add(self, pool, now):
        try:
            listener = Listener.bind(pool)
        except ListenError as exc:
            log.error("reload: pool %s not started: %s", pool.pool_name, exc)
            return
        log.info("pool %s: added to the configuration; starting it", pool.pool_name)
        group = self.groups[pool.pool_name] = PoolGroup(pool, listener, Dictionaries(pool.shared),
                                                        self._serve)
        group.start(now)

    def stop(self):
        self.stopping = True
        for group in self._all():
            group.stop()
        deadline = time.monotonic() + max((group.config.shutdown_timeout
                                           for group in self._all()), default=0) + 5
        while self._children() and time.monotonic() < deadline:
            self._reap(time.monotonic())
            time.sleep(0.05)
        if self._children():
            log.error("processes %s did not stop; killing them",
                      sorted(child.pid for child in self._children()))
            self._signal_all(signal.SIGKILL)
        log.info("stopped")

    # -- process life -----------------------------------------------------------------------

    def _children(self):
        return [child for group in self._all() for child in group.children.values()]

    def _signal_all(self, signum):
        for group in self._all():
            group.signal_all(signum)

    def _serve(self, group, number, pipes):
        """In a forked child: be serving process `number` of `group`, writing to `pipes`
        (catch_output.Pipes), then exit."""
        code = 1
        try:
            # this process's copies only: the supervisor's wait, the other pools' sockets
            # and memory, the other processes' pipes
            if self.epoll is not None:
                self.epoll.close()
            for other in self._all():
                if other is not group:
                    other.forget()
            for child in self._children():
                child.pipes.close()
            logs.serve(group.name)
            privileges.become(group.config)
            logs.keep_unopenable()
            mainloop.run(Server(group.config, group.listener.shared(),
                                lambda: self.reread(group.name), process=number,
                                scoreboard=group.scoreboard, supervisor=self.pid,
                                dictionaries=group.dictionaries, pipes=pipes,
                                handoff=group.handoff.share(number)),
                         service=False)
            code = 0
        except BaseException:
            log.exception("%sprocess %d failed", group.label, number)
        finally:
            logging.shutdown()
            os._exit(code)

    def _reap(self, now):
        while self._children():
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for group in self._all():
                child = group.children.pop(pid, None)
                if child is not None:
                    break
            else:
                continue
            code = group.reaped(child, status, now)
            if code is None or self.stopping:
                continue
            delay = self.throttle.exited(now, self.config.emergency_restart_threshold,
                                         self.config.emergency_restart_interval)
            if delay:
                self.held = max(self.held, now + delay)
                log.error("%sprocess %d (pid %d) exited with status %d; %d processes exited "
                          "within %g s (emergency_restart_threshold): no process starts for "
                          "%g s", group.label, child.number, pid, code,
                          len(self.throttle.exits), self.config.emergency_restart_interval,
                          delay)
            else:
                log.error("%sprocess %d (pid %d) exited with status %d", group.label,
                          child.number, pid, code)
