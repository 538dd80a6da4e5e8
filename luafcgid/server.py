"""The daemon's moving parts: worker threads taking connections from the acceptor, the
responder and its state pool, the heartbeat, the deadline watcher and the closer; starting
them and draining them at stop."""

import atexit
import logging
import os
import sys
import threading
import time

from . import procman
from .config import LISTENER, RESTART_ONLY, keep_running
from .listener import Listener, ListenError
from .ops import access_format
from .ops.metrics import Metrics, current_worker
from .ops.slowlog import SlowLog
from .ops.status import Status
from .ops.stdout import Capture
from .request.acceptor import Acceptor
from .request.clients import admission
from .request.connection import Connection
from .request.responder import Responder
from .states import vm
from .states.closer import Closer
from .states.deadline import Watcher
from .states.heartbeat import Heartbeat

log = logging.getLogger("luafcgid")

SWITCH_INTERVAL = 0.001


class Server:
    """A serving process, as a role of mainloop.run."""

    def __init__(self, config, listener, reread, process=None, scoreboard=None,
                 supervisor=None, dictionaries=None):
        """Serves on `listener` (a listener.Listener); a reload applies reread() (a Config,
        or None when the file is bad). `process` numbers this serving process when a
        supervisor (pid `supervisor`) runs it: they serve on the supervisor's listener,
        publish their counters on its `scoreboard` (and there ask to be replaced when
        recycling says so), and stop when it is gone. Scripts reach `dictionaries`
        (shared.Dictionaries)."""
        self.config = config
        self.dictionaries = dictionaries
        self.listener = listener
        self.reread = reread
        self.process = process
        self.scoreboard = scoreboard
        self.supervisor = supervisor
        self.recycling = procman.Recycling(config.process_max_requests,
                                           config.process_max_memory)
        self.retiring = False   # asked the supervisor for a successor
        self.metrics = Metrics(config.workers, config.slowlog_timeout)
        self._log_access(config)
        self.slowlog = SlowLog(lambda: self.config, self.metrics)
        self.watcher = Watcher(lambda: self.config, self._replace_stuck, self.slowlog.check)
        for worker in self.metrics.workers:
            worker.window = self.watcher.window(self._worker_name(worker.number))
        self.closer = Closer(config.lua, config.request_timeout)
        self.status = Status(self.metrics, lambda: self.listener.sock, self.watcher.stuck,
                             scoreboard, self.publish, dictionaries)
        self.heartbeat = Heartbeat(config.sweep)
        self.responder = Responder(config, self.status, self.closer,
                                   on_load=self.heartbeat.watch, dictionaries=dictionaries)
        self.stdout = Capture("stdout" if process is None else f"stdout-{process}")
        self.stopping = False
        self.acceptor = None
        self._threads = []   # one per metrics.workers entry, in the same order
        self._threads_lock = threading.Lock()

    def start(self):
        # Python hands its interpreter lock to a waiting thread only every switch interval
        # (5 ms by default): a request whose worker waited that long in a queue of them set
        # the p99 latency. At 1 ms, with 256 clients through nginx, p99 fell from 57 to 28 ms
        # (processes 2, workers 2) and from 49 to 44 ms (processes 1, workers 3).
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.stdout.start()
        self.acceptor = Acceptor(self.listener.sock, self._connect,
                                 admission(self.config.allowed_clients, self.listener.sock))
        self.heartbeat.start(self.responder)
        self.watcher.start()
        for worker in self.metrics.workers:
            self._start_worker(worker)
        self.publish()
        log.info("luafcgid serving on %s with %d workers, %d states, Lua %s",
                 self.listener.description, self.config.workers, self.config.states,
                 self.config.lua)

    def _log_access(self, config):
        """The access log's format, compiled once per config (the config checked it)."""
        self.metrics.configure(access_format.compile(config.access_format)
                               if config.access_log else None, bool(config.status_path))

    def _start_worker(self, worker):
        self._threads.append(vm.start_thread(self.config.lua, self._work,
                                             self._worker_name(worker.number), (worker.number,)))

    def _replace_stuck(self, window):
        """A worker stuck in Lua (deadline.py) serves nothing more; another thread takes its
        place, so that the connections this process already accepted are served. At most
        `workers` threads are added so, however many get stuck."""
        with self._threads_lock:
            if self.stopping or len(self._threads) >= 2 * self.config.workers:
                return
            worker = self.metrics.add_worker()
            worker.window = self.watcher.window(self._worker_name(worker.number))
            self._start_worker(worker)
        log.warning("%s started in place of %s", worker.window.name, window.name)

    def _worker_name(self, number):
        return f"worker-{number}" if self.process is None else f"worker-{self.process}.{number}"

    def summary(self):
        """One line for systemd's STATUS=."""
        requests, failed, _, active = self.metrics.totals()
        return (f"serving on {self.listener.description}: {requests} requests, {failed} "
                f"failed, {active}/{len(self.metrics.workers)} workers busy")

    def healthy(self):
        return self.heartbeat.alive()

    def tick(self):
        if self.supervisor is not None and os.getppid() != self.supervisor:
            log.error("the supervisor (pid %d) is gone; stopping", self.supervisor)
            return False
        if self.scoreboard is not None and not self.retiring:
            why = self.recycling.due(self.metrics.totals()[0])
            if why:
                log.info("process %d %s; asking the supervisor for a successor",
                         self.process, why)
                self.retiring = True
        self.publish()
        if self.scoreboard is not None and self.config.status_path:
            # for the status page's ?full in the other processes; only from here, the one
            # thread that writes this process's slot of them
            self.scoreboard.publish_workers(self.process, self.status.entries())
        self.status.sample()
        self.acceptor.close_idle(self.config.client_timeout)
        return True

    def reopen(self):
        pass   # the logs are all there is to reopen

    def reload(self):
        config = self.reread()
        if config is not None:
            self.apply(config)

    def _connect(self, sock, address):
        return Connection(sock, address, self)

    def _work(self, number):
        worker = current_worker.stats = self.metrics.workers[number - 1]
        worker.tid, worker.born = threading.get_native_id(), time.time()
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
                if not keep:
                    self.acceptor.discard(connection)
                    break
                if self.acceptor.park(connection):
                    break

    def apply(self, config):
        """Apply a re-read config: new states for every script (a new pool; in-flight
        requests finish on the old one), a new listening socket if its settings changed.
        Settings that need a restart keep their running value, with a warning."""
        for name in keep_running(self.config, config, RESTART_ONLY):
            log.warning("reload: %s changed; restart luafcgid to apply it", name)
        if not self.listener.owned:
            if keep_running(self.config, config, LISTENER):
                log.warning("reload: listener settings changed; under the supervisor or a "
                            "socket passed by systemd that needs a restart")
        elif any(getattr(config, name) != getattr(self.config, name) for name in LISTENER):
            self._rebind(config)
        # the re-read config passed preflight (cli.py), so this socket is not refused
        self.acceptor.admit = admission(config.allowed_clients, self.listener.sock)
        self.metrics.slow_after = config.slowlog_timeout
        self._log_access(config)
        self.closer.patience = config.request_timeout
        heartbeat = Heartbeat(config.sweep)
        old, self.responder = self.responder, Responder(
            config, self.status, self.closer, on_load=heartbeat.watch,
            dictionaries=self.dictionaries)
        old.retire(self.responder)
        self.heartbeat.stop()
        self.heartbeat = heartbeat
        heartbeat.start(self.responder)
        self.config = config
        log.info("reloaded %s", config.source)

    def _rebind(self, config):
        """Listen as `config` says; on failure keep the running socket and its settings."""
        try:
            new = Listener.bind(config)
        except ListenError as exc:
            log.error("reload: %s; still listening on %s", exc, self.config.listen)
            keep_running(self.config, config, LISTENER)
            return
        old, self.listener = self.listener, new
        self.acceptor.listen_on(new.sock)
        # A new listener on the same path would have found the old one serving and
        # refused, so the old file is not the new one's.
        old.close()
        log.info("reload: now listening on %s", config.listen)

    def stop(self):
        """Stop accepting and close the listener, let in-flight requests finish (at most
        shutdown_timeout seconds), close every state. False when something could not end:
        a worker or a state's close stuck in Lua (then see exit_leaving_lua)."""
        with self._threads_lock:
            if self.stopping:
                return True
            self.stopping = True
        self.acceptor.close()
        # New connections are refused from now on, so that the web server moves on to
        # another upstream at once: left listening, they waited out the whole drain in the
        # backlog and were then reset (a 502 after up to shutdown_timeout).
        self.listener.close()
        log.info("stopping: draining in-flight requests; new connections are refused")
        deadline = time.monotonic() + self.config.shutdown_timeout
        windows = [worker.window for worker in self.metrics.workers]
        # a worker stuck in Lua is not waited for: it would never end
        while any(thread.is_alive() and not window.stuck
                  for thread, window in zip(self._threads, windows)):
            if time.monotonic() >= deadline:
                break
            self.acceptor.drain(self.config.client_timeout,
                                held=sum(bool(window.stuck) for window in windows))
            time.sleep(0.02)
        busy = sum(thread.is_alive() for thread in self._threads)
        if busy:
            log.warning("%d request(s) still running after shutdown_timeout or stuck; "
                        "exiting anyway", busy)
        self.heartbeat.stop()
        self.watcher.stop()
        # busy should be 0 here: a state still lent out after draining is a leaked slot
        stats = self.responder.pool.stats()
        log.info("pool at stop: %s", " ".join(f"{k}={v}" for k, v in stats.items()))
        self.responder.pool.close()
        closed = self.closer.drain(deadline)
        if not closed:
            log.warning("states still closing after shutdown_timeout (a __gc finalizer that "
                        "does not return?); exiting without them")
        self.stdout.stop()
        log.info("stopped")
        return closed and not busy and not self.closer.abandoned

    def publish(self):
        """Put this process's counters on the supervisor's scoreboard (if there is one)."""
        if self.scoreboard is not None:
            requests, failed, slow, active = self.metrics.totals()
            self.scoreboard.publish(self.process, os.getpid(), requests, failed, slow, active,
                                    len(self.metrics.workers), len(self.watcher.stuck()),
                                    self.retiring)


def exit_leaving_lua():
    """Exit now. A thread still running Lua (a worker stuck in a C call or a __gc, a close
    given up on) would make the interpreter's own exit close that Lua state under it, or run
    an endless finalizer with the interpreter lock held."""
    atexit._run_exitfuncs()
    logging.shutdown()
    os._exit(0)
