"""The daemon's moving parts: worker threads accepting on the listening socket, the
responder and its state pool, the heartbeat; starting them and draining them at stop."""

import errno
import logging
import socket
import threading
import time

from . import listener
from .connection import Connection
from .housekeeping import Housekeeper
from .metrics import Metrics, current as current_worker
from .responder import Responder
from .settings import SETTINGS
from .slowlog import SlowWatcher
from .status import Status

log = logging.getLogger("luafcgid")

# accept() failures that say "not now" rather than "never": back off and try again
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
LISTENER_SETTINGS = ("listen", "backlog", "listen_mode", "listen_owner", "listen_group")


def _wake_accepts(sock):
    """On Linux, shutdown() of a listening socket wakes the threads blocked in accept()."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Server:
    def __init__(self, config, sock=None):
        """`sock`: a listening socket passed by systemd (socket activation). It belongs to
        systemd, which keeps it across restarts: luafcgid neither shuts it down nor replaces
        it, and leaves its file in place."""
        self.config = config
        self.sock = sock
        self.inherited = sock is not None
        self.metrics = Metrics(config.workers, config.slowlog_timeout)
        self.status = Status(self)
        self.responder = Responder(config, self.status)
        self.housekeeper = Housekeeper(self.responder, config.sweep)
        self.slow_watcher = SlowWatcher(self)
        self.stopping = False
        self._threads = []
        self._connections = {}   # worker number -> Connection being served

    def bind(self):
        self.sock = listener.bind(self.config)

    def start(self):
        if self.sock is None:
            self.bind()
        if self.inherited:
            # shutdown() would break systemd's socket too, so accept() wakes now and then
            # to notice a stop instead
            self.sock.settimeout(0.5)
        self.housekeeper.start()
        self.slow_watcher.start()
        for number in range(1, self.config.workers + 1):
            thread = threading.Thread(target=self._accept_loop, args=(number,),
                                      name=f"worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("luafcgid serving on %s with %d workers, %d states, Lua %s", self.listening(),
                 self.config.workers, self.config.states, self.config.lua)

    def listening(self):
        return "the socket systemd passed" if self.inherited else self.config.listen

    def summary(self):
        """One line for systemd's STATUS=."""
        requests, failed, _, active = self.metrics.totals()
        return (f"serving on {self.listening()}: {requests} requests, {failed} failed, "
                f"{active}/{len(self.metrics.workers)} workers busy")

    def keep_going(self):
        return not self.stopping

    def _accept_loop(self, number):
        worker = current_worker.stats = self.metrics.workers[number - 1]
        while not self.stopping:
            sock = self.sock   # replaced by a reload that rebinds
            tcp = sock.family != socket.AF_UNIX
            try:
                conn, address = sock.accept()
            except OSError as exc:
                if self.stopping or sock is not self.sock:
                    continue
                if exc.errno in _TRANSIENT:
                    log.error("accept failed: %s; retrying", exc)
                    time.sleep(0.1)
                continue
            peer = f"{address[0]}:{address[1]}" if tcp else None
            connection = Connection(conn, peer, self, worker)
            self._connections[number] = connection
            try:
                connection.serve(self.keep_going)
            except Exception:
                log.exception("unexpected error serving %s", connection.peer)
            finally:
                del self._connections[number]
                conn.close()

    def reload(self, config):
        """Apply a re-read config: new states for every script (a new pool; in-flight
        requests finish on the old one), a new listening socket if its settings changed.
        Settings that need a restart keep their running value, with a warning."""
        for setting in SETTINGS:
            name = setting.name
            if not setting.live and getattr(config, name) != getattr(self.config, name):
                log.warning("reload: %s changed; restart luafcgid to apply it", name)
                setattr(config, name, getattr(self.config, name))
        if self.inherited:
            for name in LISTENER_SETTINGS:
                setattr(config, name, getattr(self.config, name))
        if any(getattr(config, name) != getattr(self.config, name) for name in LISTENER_SETTINGS):
            try:
                sock = listener.bind(config)
            except listener.ListenError as exc:
                log.error("reload: %s; still listening on %s", exc, self.config.listen)
                for name in LISTENER_SETTINGS:
                    setattr(config, name, getattr(self.config, name))
            else:
                old_sock, old_config = self.sock, self.config
                self.sock = sock
                _wake_accepts(old_sock)
                if old_config.listen != config.listen:
                    listener.remove(old_config, old_sock)
                log.info("reload: now listening on %s", config.listen)
        self.metrics.slow_after = config.slowlog_timeout
        old = self.responder
        self.responder = Responder(config, self.status)
        old.retire(self.responder)
        self.housekeeper.stop()
        self.housekeeper = Housekeeper(self.responder, config.sweep)
        self.housekeeper.start()
        self.config = config
        log.info("reloaded %s", config.source)

    def stop(self):
        """Stop accepting, let in-flight requests finish (at most shutdown_timeout seconds),
        close every state and remove the socket file."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: draining in-flight requests")
        if not self.inherited:
            _wake_accepts(self.sock)
        for connection in list(self._connections.values()):
            if connection.idle:   # a kept-alive connection waiting for its next request
                try:
                    connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        deadline = time.monotonic() + self.config.shutdown_timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = sum(thread.is_alive() for thread in self._threads)
        if busy:
            log.warning("%d request(s) still running after shutdown_timeout; exiting anyway", busy)
        self.housekeeper.stop()
        self.slow_watcher.stop()
        self.responder.pool.close()
        if self.inherited:
            self.sock.close()
        else:
            listener.remove(self.config, self.sock)
        log.info("stopped")
