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
from .responder import Responder
from .settings import SETTINGS

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
        self.config = config
        self.sock = sock
        self.responder = Responder(config)
        self.housekeeper = Housekeeper(self.responder, config.sweep)
        self.stopping = False
        self._threads = []
        self._connections = {}   # worker number -> Connection being served

    def bind(self):
        self.sock = listener.bind(self.config)

    def start(self):
        if self.sock is None:
            self.bind()
        self.housekeeper.start()
        for number in range(1, self.config.workers + 1):
            thread = threading.Thread(target=self._accept_loop, args=(number,),
                                      name=f"worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("luafcgid serving on %s with %d workers, %d states, Lua %s",
                 self.config.listen, self.config.workers, self.config.states, self.config.lua)

    def keep_going(self):
        return not self.stopping

    def _accept_loop(self, number):
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
            connection = Connection(conn, peer, self)
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
        old = self.responder
        self.responder = Responder(config)
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
        self.responder.pool.close()
        listener.remove(self.config, self.sock)
        log.info("stopped")
