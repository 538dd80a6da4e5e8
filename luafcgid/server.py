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
from .ops import access_format, describe, slowlog
from .ops.status import Status
from .ops.catch_output import Capture, thread_name
from .request.acceptor import Acceptor
from .request.clients import admission
from .states.duty import Duty
from .request.responder import Responder
from .states import vm
from .states.closer import Closer
from .states.deadline import Watcher
from .states.heartbeat import Heartbeat
from .states.worker import IDLE, READING, Workers

log = logging.getLogger("luafcgid")

SWITCH_INTERVAL = 0.001


class Server:
    """A serving process, as a role of mainloop.run."""

    def __init__(self, config, listener, reread, process=None, scoreboard=None,
                 supervisor=None, dictionaries=None, pipes=None, handoff=None):
        """Serves on `listener` (a listener.Listener); a reload applies reread() (a Config,
        or None when the file is bad). `process` numbers this serving process when a
        supervisor (pid `supervisor`) runs it: they serve on the supervisor's listener,
        publish their counters on its `scoreboard` (and there ask to be replaced when
        recycling says so), and stop when it is gone, and write to the `pipes` it made
        (catch_output.Pipes), and hand each other connections through `handoff`
        (request.handoff.Share). Scripts reach `dictionaries` (shared.Dictionaries)."""
        vm.load(config.lua)   # the process's VM, before any thread reads a request with it
        self.config = config
        self.dictionaries = dictionaries
        self.listener = listener
        self.reread = reread
        self.process = process
        self.scoreboard = scoreboard
        self.supervisor = supervisor
        self.handoff = handoff
        self.recycling = procman.Recycling(config.process_max_requests,
                                           config.process_max_memory)
        self.retiring = False   # asked the supervisor for a successor
        self.workers = Workers(self._worker_name)
        # with other processes to hand them to, what this one parks leaves it while every
        # worker of it is in a long call (request/handoff.py)
        self.duty = Duty(handoff and (lambda: self.acceptor.hand_parked()))
        for _ in range(config.workers):
            self.workers.add()
        self.status = Status(self.workers, lambda: self.listener.sock, scoreboard, self.publish,
                             dictionaries, lambda: self._configure_workers(self.config))
        self._configure_workers(config)
        self.watcher = Watcher(self.workers, lambda: self.config, self._replace_stuck,
                               slowlog.report)
        self.closer = Closer(config.lua, config.request_timeout)
        self.heartbeat = Heartbeat(config.sweep)
        self.responder = Responder(config, self.status, self.closer,
                                   on_load=self.heartbeat.watch, dictionaries=dictionaries)
        self.captures = [Capture(stream, config.thread_name(thread_name(stream, process)),
                                 pipes and pipes.ends[stream])
                         for stream in ("stdout", "stderr")]
        self.stopping = False
        self.acceptor = None
        self._threads_lock = threading.Lock()

    def start(self):
        # Python hands its interpreter lock to a waiting thread only every switch interval
        # (5 ms by default): a request whose worker waited that long in a queue of them set
        # the p99 latency. At 1 ms, with 256 clients through nginx, p99 fell from 57 to 28 ms
        # (processes 2, workers 2) and from 49 to 44 ms (processes 1, workers 3).
        sys.setswitchinterval(SWITCH_INTERVAL)
        for capture in self.captures:
            capture.start()
        self.acceptor = Acceptor(self.listener.sock,
                                 admission(self.config.allowed_clients, self.listener.sock),
                                 self.handoff)
        self.heartbeat.start(self.responder.pool, self.responder.forget_locations)
        self.watcher.start()
        for worker in self.workers:
            self._start_worker(worker)
        self.publish()
        log.info("%sluafcgid serving on %s with %d workers, %d states, Lua %s",
                 f"pool {self.config.pool_name}: " if self.config.prefix else "",
                 self.listener.description, self.config.workers, self.config.states,
                 self.config.lua)

    def _configure_workers(self, config):
        """What the workers measure and write for the running config: the slowlog, the
        access log (its format compiled once per config, which the config checked), the
        status page (it shows each worker's last request; its CPU and memory once a full
        listing was asked for: Status.listed)."""
        access = (access_format.compile(config.access_format, config.pool_name)
                  if config.access_log else None)
        status_page = bool(config.status_path)
        self._listed = listed = status_page and self.status.listed()
        self.workers.configure(
            config.slowlog_timeout, config.slowlog_timeout is not None and bool(config.slowlog),
            None if access is None else describe.access_writer(access), status_page,
            listed or (access is not None and access.measure_cpu),
            listed or (access is not None and access.measure_memory))

    def _start_worker(self, worker):
        worker.thread = vm.start_thread(self.config.lua, self._work, worker.name, (worker,))

    def _replace_stuck(self, stuck):
        """A worker stuck in Lua (deadline.py) serves nothing more; another thread takes its
        place, so that the connections this process already accepted are served. At most
        `workers` threads are added so, however many get stuck."""
        log.error("%s: %s stuck: still running %.1f s into its call, past request_timeout "
                  "and stuck_timeout (in one C function call, or in a __gc finalizer: Lua "
                  "cannot be interrupted there); its client is answered 500", stuck.name,
                  describe.describe(stuck), time.monotonic() - stuck.call_started)
        with self._threads_lock:
            if self.stopping or len(self.workers) >= 2 * self.config.workers:
                return
            worker = self.workers.add()
            self._start_worker(worker)
        log.warning("%s started in place of %s", worker.name, stuck.name)

    def _worker_name(self, number):
        return self.config.thread_name(f"worker-{number}" if self.process is None
                                       else f"worker-{self.process}.{number}")

    def summary(self):
        """One line for systemd's STATUS=."""
        requests, failed, _, active = self.workers.totals()
        return (f"serving on {self.listener.description}: {requests} requests, {failed} "
                f"failed, {active}/{len(self.workers)} workers busy")

    def healthy(self):
        return self.heartbeat.alive()

    def tick(self):
        if self.supervisor is not None and os.getppid() != self.supervisor:
            log.error("the supervisor (pid %d) is gone; stopping", self.supervisor)
            return False
        if self.scoreboard is not None and not self.retiring:
            why = self.recycling.due(self.workers.totals()[0])
            if why:
                log.info("process %d %s; asking the supervisor for a successor",
                         self.process, why)
                self.retiring = True
        if not self._listed and self.config.status_path and self.status.listed():
            self._configure_workers(self.config)   # another process listed them in full
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

    def _work(self, worker):
        worker.run_here()
        acceptor, duty = self.acceptor, self.duty
        worker.duty = duty
        while True:
            worker.stage = IDLE
            duty.take(worker)
            connection = acceptor.next()
            if connection is None:
                duty.give(worker)   # the next worker finds None too, and ends
                return
            worker.stage = READING
            while True:
                try:
                    keep = connection.serve(worker, self.config, self.responder)
                except Exception:
                    log.exception("unexpected error serving %s", connection.peer)
                    keep = False
                if not keep:
                    acceptor.discard(connection)
                    break
                if acceptor.park(connection):
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
        self._configure_workers(config)
        self.closer.patience = config.request_timeout
        heartbeat = Heartbeat(config.sweep)
        old, self.responder = self.responder, Responder(
            config, self.status, self.closer, on_load=heartbeat.watch,
            dictionaries=self.dictionaries)
        old.retire(self.responder)
        self.heartbeat.stop()
        self.heartbeat = heartbeat
        heartbeat.start(self.responder.pool, self.responder.forget_locations)
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
        # a worker stuck in Lua is not waited for: it would never end
        while any(worker.thread.is_alive() and not worker.stuck for worker in self.workers):
            if time.monotonic() >= deadline:
                break
            self.acceptor.drain(self.config.client_timeout,
                                held=sum(bool(worker.stuck) for worker in self.workers))
            time.sleep(0.02)
        busy = sum(worker.thread.is_alive() for worker in self.workers)
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
        for capture in self.captures:
            capture.stop()
        log.info("stopped")
        return closed and not busy and not self.closer.abandoned

    def publish(self):
        """Put this process's counters on the supervisor's scoreboard (if there is one)."""
        if self.scoreboard is not None:
            requests, failed, slow, active = self.workers.totals()
            self.scoreboard.publish(self.process, os.getpid(), requests, failed, slow, active,
                                    len(self.workers),
                                    sum(bool(worker.stuck) for worker in self.workers),
                                    self.retiring)


def exit_leaving_lua():
    """Exit now. A thread still running Lua (a worker stuck in a C call or a __gc, a close
    given up on) would make the interpreter's own exit close that Lua state under it, or run
    an endless finalizer with the interpreter lock held."""
    atexit._run_exitfuncs()
    logging.shutdown()
    os._exit(0)
