"""The daemon's moving parts: worker threads taking connections from the acceptor, the
responder and its state pool, the heartbeat; starting them and draining them at stop."""

import logging
import os
import sys
import threading
import time

from . import listener, logs, signals, systemd
from .acceptor import Acceptor
from .connection import Connection
from .housekeeping import Housekeeper
from .metrics import Metrics, current as current_worker
from .responder import Responder
from .settings import SETTINGS
from .slowlog import SlowWatcher
from .status import Status

log = logging.getLogger("luafcgid")

SWITCH_INTERVAL = 0.001
LISTENER_SETTINGS = ("listen", "backlog", "listen_mode", "listen_owner", "listen_group")


class Server:
    def __init__(self, config, sock, process=None, inherited=False, scoreboard=None):
        """Serves on the listening socket `sock`. `process` numbers this serving process when a supervisor runs several: they
        share a listening socket the supervisor owns (binds, rebinds and removes), and
        publish their counters on its `scoreboard`.
        `inherited`: `sock` was passed by systemd (socket activation); systemd keeps it
        across restarts, so luafcgid neither replaces it nor removes its file."""
        self.config = config
        self.sock = sock
        self.process = process
        self.inherited = inherited
        self.scoreboard = scoreboard
        self.metrics = Metrics(config.workers, config.slowlog_timeout)
        self.status = Status(self)
        self.responder = Responder(config, self.status)
        self.housekeeper = Housekeeper(self.responder, config.sweep)
        self.slow_watcher = SlowWatcher(self)
        self.stopping = False
        self.acceptor = None
        self._threads = []

    def start(self):
        # Python hands its interpreter lock to a waiting thread only every switch interval
        # (5 ms by default): a request whose worker waited that long in a queue of them set
        # the p99 latency. At 1 ms, with 256 clients through nginx, p99 fell from 57 to 28 ms
        # (processes 2, workers 2) and from 49 to 44 ms (processes 1, workers 3).
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.acceptor = Acceptor(self.sock, self._connect)
        self.housekeeper.start()
        self.slow_watcher.start()
        for number in range(1, self.config.workers + 1):
            name = f"worker-{number}" if self.process is None else f"worker-{self.process}.{number}"
            thread = threading.Thread(target=self._work, args=(number,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("luafcgid serving on %s with %d workers, %d states, Lua %s", self.listening(),
                 self.config.workers, self.config.states, self.config.lua)

    def listening(self):
        return listener.describe(self.config, self.inherited)

    def summary(self):
        """One line for systemd's STATUS=."""
        requests, failed, _, active = self.metrics.totals()
        return (f"serving on {self.listening()}: {requests} requests, {failed} failed, "
                f"{active}/{len(self.metrics.workers)} workers busy")

    def _connect(self, sock, address):
        return Connection(sock, address, self)

    def _work(self, number):
        worker = current_worker.stats = self.metrics.workers[number - 1]
        while True:
            connection = self.acceptor.next()
            if connection is None:
                return
            while True:
                try:
                    keep = connection.serve(worker)
                except Exception:
                    log.exception("unexpected error serving %s", connection.peer)
                    keep = False
                if not keep or self.stopping:
                    self.acceptor.discard(connection)
                    break
                if self.acceptor.park(connection):
                    break

    def reload(self, config):
        """Apply a re-read config: new states for every script (a new pool; in-flight
        requests finish on the old one), a new listening socket if its settings changed.
        Settings that need a restart keep their running value, with a warning."""
        for setting in SETTINGS:
            if not setting.live and self._keep_running(config, (setting.name,)):
                log.warning("reload: %s changed; restart luafcgid to apply it", setting.name)
        if self._changed(config, LISTENER_SETTINGS):
            if self.process is not None or self.inherited:
                log.warning("reload: listener settings changed; with processes > 1 or a "
                            "socket passed by systemd that needs a restart")
                self._keep_running(config, LISTENER_SETTINGS)
            else:
                self._rebind(config)
        self.metrics.slow_after = config.slowlog_timeout
        old = self.responder
        self.responder = Responder(config, self.status)
        old.retire(self.responder)
        self.housekeeper.stop()
        self.housekeeper = Housekeeper(self.responder, config.sweep)
        self.housekeeper.start()
        self.config = config
        log.info("reloaded %s", config.source)

    def _changed(self, config, names):
        return any(getattr(config, name) != getattr(self.config, name) for name in names)

    def _keep_running(self, config, names):
        """Put the running values of `names` back into `config`; True if any differed."""
        changed = self._changed(config, names)
        for name in names:
            setattr(config, name, getattr(self.config, name))
        return changed

    def _rebind(self, config):
        """Listen as `config` says; on failure keep the running socket and its settings."""
        try:
            sock = listener.bind(config)
        except listener.ListenError as exc:
            log.error("reload: %s; still listening on %s", exc, self.config.listen)
            self._keep_running(config, LISTENER_SETTINGS)
            return
        old_sock, old_config = self.sock, self.config
        self.sock = sock
        self.acceptor.listen_on(sock)
        if old_config.listen != config.listen:
            listener.remove(old_config, old_sock)
        log.info("reload: now listening on %s", config.listen)

    def stop(self):
        """Stop accepting, let in-flight requests finish (at most shutdown_timeout seconds),
        close every state and remove the socket file."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: draining in-flight requests")
        self.acceptor.close()
        deadline = time.monotonic() + self.config.shutdown_timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = sum(thread.is_alive() for thread in self._threads)
        if busy:
            log.warning("%d request(s) still running after shutdown_timeout; exiting anyway", busy)
        self.housekeeper.stop()
        self.slow_watcher.stop()
        # busy should be 0 here: a state still lent out after draining is a leaked slot
        stats = self.responder.pool.stats()
        log.info("pool at stop: %s", " ".join(f"{k}={v}" for k, v in stats.items()))
        self.responder.pool.close()
        if self.process is None and not self.inherited:
            listener.remove(self.config, self.sock)
        else:
            self.sock.close()
        log.info("stopped")

    def publish(self):
        """Put this process's counters on the supervisor's scoreboard (if there is one)."""
        if self.scoreboard is not None:
            requests, failed, slow, active = self.metrics.totals()
            self.scoreboard.publish(self.process, os.getpid(), requests, failed, slow, active,
                                    len(self.metrics.workers))

    def serve_forever(self, reread):
        """Run until SIGTERM or SIGINT, in the main thread, which takes the signals:
        SIGHUP applies reread() (a Config, or None when the file is bad) and every second
        the main thread drops kept-alive connections left idle. SIGUSR1 reopens the logs.
        A lone process tells systemd (if it runs us) READY=1, RELOADING=1, STOPPING=1 and
        pings its watchdog; under a supervisor, the supervisor does."""
        signals.block()
        self.start()
        main = self.process is None
        watchdog = systemd.Watchdog() if main else None
        if main:
            systemd.notify("READY=1", f"STATUS={self.summary()}", f"MAINPID={os.getpid()}")
        try:
            while True:
                self.publish()
                signum = signals.wait(timeout=watchdog.timeout(1.0) if main else 1.0)
                if main:
                    watchdog.tick(self.summary, healthy=self.housekeeper.alive())
                if signum is None:
                    self.acceptor.close_idle(self.config.client_timeout)
                elif signum in signals.STOP:
                    break
                elif signum == signals.REOPEN:
                    logs.reopen()
                else:
                    log.info("SIGHUP: reloading the configuration")
                    if main:
                        systemd.reloading()
                    config = reread()
                    if config is not None:
                        self.reload(config)
                    if main:
                        systemd.notify("READY=1", f"STATUS={self.summary()}")
        finally:
            if main:
                systemd.notify("STOPPING=1")
            self.stop()
