"""The status and ping pages (php-fpm's pm.status_path and ping.path).

The responder answers them when SCRIPT_NAME matches status_path or ping_path, before any
script lookup. Only clients in status_allow see them, by REMOTE_ADDR: the web server's
word, which anyone who can connect to luafcgid's socket can forge. That is why a TCP
listener needs allowed_clients (clients.py): on a Unix socket, listen_mode and listen_group
decide who can speak. The status page is php-fpm's (fpm_status.py renders it): plain text,
?json, ?xml, ?html or ?openmetrics, and ?full lists every worker as php-fpm lists its
processes (a worker thread serves one request at a time, as a php-fpm process does).
luafcgid's own figures, the Lua states and scripts, failed requests, stuck workers and with
processes > 1 each serving process, follow php-fpm's under their own names.
"""

import os
import socket
import subprocess
import time
from collections import defaultdict
from ipaddress import ip_network

from ..request import pages
from ..request.clients import peer_address
from ..states.worker import IDLE, STAGES
from . import fpm_status
from .describe import params_of, running


def _plain(status, body, content_type="text/plain; charset=utf-8"):
    return (f"Status: {status}\r\nContent-Type: {content_type}\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def accept_queue(sock):
    """Connections waiting in the listening socket's accept queue, or None where the system
    does not say. TCP: the rx_queue /proc/net/tcp{,6} shows for a listening socket. Unix
    sockets: /proc/net/unix has no queue column, but `ss -xl` reads it over sock_diag."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    if sock.family == socket.AF_UNIX:
        try:
            lines = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True,
                                   timeout=2, check=True).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return None
        for line in lines:
            fields = line.split()
            # u_str LISTEN Recv-Q Send-Q path inode * 0
            if len(fields) >= 6 and fields[5] == inode:
                return int(fields[2])
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as stream:
                next(stream)
                for line in stream:
                    fields = line.split()
                    if fields[9] == inode:
                        return int(fields[4].split(":")[1], 16)
        except (OSError, IndexError, StopIteration):
            continue
    return None


def _memory_kb(state):
    """collectgarbage("count") of a state the pool lent for inspection."""
    try:
        return float(state.runtime.eval('collectgarbage("count")'))
    except Exception:   # the script replaced collectgarbage
        return None


def backlog_length(backlog):
    """The most connections the listening socket queues: `backlog` (the setting), as the
    kernel caps it at net.core.somaxconn (which -1 takes)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as stream:
            cap = int(stream.read())
    except (OSError, ValueError):
        return max(backlog, 0)
    return cap if backlog < 0 else min(backlog, cap)


def _text_of(value):
    return value.decode("utf-8", "replace") if value else "-"


def worker_entry(worker, now, wall):
    """php-fpm's entry of one process (fpm_status.PROCESS) for a worker thread, from its
    record (states/worker.py): while it serves a request, that request and how long it runs
    so far; idle, its last request, with that request's CPU (percent of its duration, as
    php-fpm's) and its state's memory."""
    stage, params = worker.stage, params_of(worker)
    idle = stage == IDLE
    seconds = worker.seconds if idle else now - worker.started
    uri = params.get(b"REQUEST_URI")
    if uri is None and params.get(b"SCRIPT_NAME"):
        query = params.get(b"QUERY_STRING")
        uri = params[b"SCRIPT_NAME"] + (b"?" + query if query else b"")
    script = worker.script if worker.script is not None else params.get(b"SCRIPT_FILENAME")
    try:
        length = int(params.get(b"CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    return {
        # the worker thread's id (its LWP, as ps -L shows it): php-fpm_exporter tells
        # processes apart by pid and start time, and threads of one process share the pid
        "pid": worker.tid,
        "state": STAGES[stage],
        "start time": int(worker.born),
        "start since": int(wall - worker.born),
        "requests": worker.requests,
        "request duration": int(seconds * 1e6),
        "request method": _text_of(params.get(b"REQUEST_METHOD")),
        "request uri": _text_of(uri),
        "content length": length,
        "user": _text_of(params.get(b"REMOTE_USER")),
        "script": _text_of(script),
        "last request cpu": round(worker.cpu / worker.seconds * 100, 2)
        if idle and worker.seconds > 0 else 0.0,
        "last request memory": worker.memory if idle else 0,
    }


class Status:
    def __init__(self, workers, sock, scoreboard=None, publish=None, dictionaries=None,
                 on_listed=None):
        """The figures of `workers` (a worker.Workers), the accept queue of sock() (the
        listening socket), with the supervisor every process's from `scoreboard`, on which
        publish() puts this one's first, and those of the shared `dictionaries`
        (shared.Dictionaries). on_listed() is called when the workers are first listed in
        full (see listed)."""
        self.workers = workers
        self.sock = sock
        self.scoreboard = scoreboard
        self.publish = publish
        self.dictionaries = dictionaries
        self.on_listed = on_listed
        self._listed = False
        self.started = time.time()
        self._started_monotonic = time.monotonic()
        # php-fpm's maxima since the start: of the accept queue as the status page saw it,
        # and of the active workers, sampled every second (sample()) as php-fpm's master does
        self.max_queue = 0
        self.max_active = 0

    def listed(self):
        """Whether the workers were listed in full (?full), by this process or, with the
        supervisor, by any. Only then is a request's CPU time and its state's memory taken
        for the listing: reading the thread's CPU clock was 2 of a request's 9 system calls,
        for a figure most sites never look at."""
        if not self._listed and self.scoreboard is not None and self.scoreboard.listed:
            self._listed = True
        return self._listed

    def uptime(self):
        return time.monotonic() - self._started_monotonic

    def stuck(self):
        """What every worker given up on runs (describe.running's dicts)."""
        now = time.monotonic()
        return [running(worker, now) for worker in self.workers if worker.stuck]

    def routes(self, config, pool):
        """SCRIPT_NAME (bytes) -> page function, for a responder whose states are `pool`."""
        allowed = tuple(ip_network(network) for network in config.status_allow)
        found = {}
        if config.status_path:
            found[config.status_path.encode()] = lambda params: self._guarded(
                allowed, params, lambda params: self.status_page(params, config, pool))
        if config.ping_path:
            found[config.ping_path.encode()] = lambda params: self._guarded(
                allowed, params, lambda _: _plain("200 OK", b"pong\n"))
        return found

    @staticmethod
    def _guarded(allowed, params, page):
        peer = peer_address(params.get(b"REMOTE_ADDR", b"").decode(errors="replace"))
        if peer is None or not any(peer in network for network in allowed):
            return pages.response("403 Forbidden")
        return page(params)

    def _pool_totals(self):
        """(requests, failed, slow, active, workers, stuck, the processes' slots or None):
        this process's, or with processes > 1 the sums over every process (this one live,
        the others as they published them within the last second)."""
        if self.scoreboard is None:
            requests, failed, slow, active = self.workers.totals()
            return (requests, failed, slow, active, len(self.workers),
                    sum(bool(worker.stuck) for worker in self.workers), None)
        self.publish()
        slots = [slot for slot in self.scoreboard.read() if slot["pid"]]
        return tuple(sum(slot[key] for slot in slots) for key in (
            "requests", "failed_requests", "slow_requests", "active_workers", "workers",
            "stuck_workers")) + (slots,)

    def entries(self):
        """This process's workers, as ?full lists them (worker_entry)."""
        now, wall = time.monotonic(), time.time()
        return [worker_entry(worker, now, wall) for worker in self.workers]

    def sample(self):
        """Every second (the server's tick): the most workers active at once."""
        self.max_active = max(self.max_active, self._pool_totals()[3])

    def snapshot(self, config, pool, full=False):
        """(php-fpm's pool figures, its process entries or None, luafcgid's own figures)."""
        requests, failed, slow, active, workers, _, slots = self._pool_totals()
        self.max_active = max(self.max_active, active)
        queue = accept_queue(self.sock())
        if queue is not None:
            self.max_queue = max(self.max_queue, queue)
        figures = {
            "pool": config.pool_name,
            "process manager": config.pm,
            "start time": int(self.started),
            "start since": int(self.uptime()),
            # php-fpm counts a request when it is accepted: the ones running too
            "accepted conn": requests + active,
            "listen queue": queue or 0,
            "max listen queue": self.max_queue,
            "listen queue len": backlog_length(config.backlog),
            "idle processes": workers - active,
            "active processes": active,
            "total processes": workers,
            "max active processes": self.max_active,
            "max children reached": (0 if self.scoreboard is None
                                     else self.scoreboard.max_children_reached),
            "slow requests": slow,
        }
        processes = None
        if full:
            processes = self.entries()
            # with processes > 1 the other processes' workers, as of the last second
            for slot in slots or ():
                if slot["pid"] != os.getpid():
                    processes += self.scoreboard.workers(slot["process"])
        scripts = defaultdict(lambda: {"clones": 0, "requests": 0, "loaded_at": 0.0,
                                       "memory_kb": None})
        for state, served in pool.usage():
            entry = scripts[state.path]
            entry["clones"] += 1
            entry["requests"] += served
            entry["loaded_at"] = max(entry["loaded_at"], state.loaded_at)
            memory = pool.inspect(state, _memory_kb)
            if memory is not None:
                entry["memory_kb"] = (entry["memory_kb"] or 0.0) + memory
        own = {
            "failed_requests": failed,
            # workers given up on, stuck in Lua past request_timeout (deadline.py)
            "stuck": self.stuck(),
            "states": pool.stats(),
            "scripts": [{"path": path, **entry} for path, entry in sorted(scripts.items())],
            # one store for every process: whichever answers shows the same
            "shared": self.dictionaries.stats() if self.dictionaries is not None else [],
        }
        if slots is not None:
            own["serving_processes"] = slots
        return figures, processes, own

    def status_page(self, params, config, pool):
        chosen, full = fpm_status.form(params.get(b"QUERY_STRING", b""))
        if full and not self._listed:
            self._listed = True
            if self.scoreboard is not None:
                self.scoreboard.list_in_full()
            if self.on_listed is not None:
                self.on_listed()
        figures, processes, own = self.snapshot(config, pool, full)
        content_type, body = fpm_status.render(chosen, figures, processes, own, text(own),
                                               openmetrics(own, config.pool_name))
        return _plain("200 OK", body, content_type)


def text(own):
    """luafcgid's own lines of the plain text page, after php-fpm's."""
    lines = [f"failed requests:      {own['failed_requests']}",
             f"stuck workers:        {len(own['stuck'])}"]
    for slot in own.get("serving_processes", ()):
        lines.append(f"process {slot['process']}: pid {slot['pid']} requests {slot['requests']} "
                     f"failed {slot['failed_requests']} slow {slot['slow_requests']} active "
                     f"workers {slot['active_workers']} of {slot['workers']} stuck "
                     f"{slot['stuck_workers']}")
    for stuck in own["stuck"]:
        lines.append(f"stuck: {stuck['worker']} running {stuck['request']} for "
                     f"{stuck['seconds']} s")
    lines.append(f"states: {own['states']['states']} (created {own['states']['created']}, "
                 f"evicted {own['states']['evicted']}, flushed {own['states']['flushed']})")
    for script in own["scripts"]:
        memory = "-" if script["memory_kb"] is None else f"{script['memory_kb']:.1f} KiB"
        loaded = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(script["loaded_at"]))
        lines.append(f"script: {script['path']} clones {script['clones']} requests "
                     f"{script['requests']} loaded {loaded} memory {memory}")
    for shared in own["shared"]:
        lines.append(f"shared: {shared['name']} capacity {shared['capacity']} free "
                     f"{shared['free_space']} keys {shared['keys']}")
    return lines


def _label(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# luafcgid's own OpenMetrics families, after php-fpm's and in this order: (name, type,
# help, the label its samples carry: None for one sample, "pool" for the page's pool,
# "script" for one a script, "dict" for one a shared dictionary, and the sample's value of
# `own`, the pool's name, or the script's or dictionary's entry; None writes no sample)
_OWN_FAMILIES = (
    # php-fpm's families carry no label (its exporter adds the pool's); this one says which
    # pool the page reports on
    ("pool", "gauge", "The pool this page reports on: its name in the label.", "pool",
     lambda pool: 1),
    ("failed_requests", "counter", "Requests answered with a 5xx status.", None,
     lambda own: own["failed_requests"]),
    ("stuck_workers", "gauge", "Workers stuck in Lua past request_timeout, which could not "
     "stop them.", None, lambda own: len(own["stuck"])),
    ("states", "gauge", "Lua states in the pool.", None, lambda own: own["states"]["states"]),
    ("script_clones", "gauge", "Lua states holding the script.", "script",
     lambda script: script["clones"]),
    ("script_requests", "counter", "Requests served by the script's loaded states.", "script",
     lambda script: script["requests"]),
    ("script_load_time_seconds", "gauge", "Unix time the script was last loaded.", "script",
     lambda script: script["loaded_at"]),
    ("script_memory_bytes", "gauge", "Lua memory of the script's idle states.", "script",
     lambda script: None if script["memory_kb"] is None else round(script["memory_kb"] * 1024)),
    ("shared_capacity_bytes", "gauge", "Capacity of the shared dictionary.", "dict",
     lambda shared: shared["capacity"]),
    ("shared_free_bytes", "gauge", "Free space in the shared dictionary.", "dict",
     lambda shared: shared["free_space"]),
    ("shared_keys", "gauge", "Keys stored in the shared dictionary (expired ones until they "
     "are reclaimed).", "dict", lambda shared: shared["keys"]),
)


def openmetrics(own, pool):
    """luafcgid's own OpenMetrics families (_OWN_FAMILIES) of pool `pool`, after php-fpm's:
    every family has # TYPE and # HELP; counters end in _total."""
    # each label's samples: (the label's value, what the family's value is of)
    subjects = {None: [(None, own)], "pool": [(pool, pool)],
                "script": [(script["path"], script) for script in own["scripts"]],
                "dict": [(shared["name"], shared) for shared in own["shared"]]}
    out = []
    for name, kind, help_text, label, value in _OWN_FAMILIES:
        out.append(f"# TYPE luafcgid_{name} {kind}")
        out.append(f"# HELP luafcgid_{name} {help_text}")
        suffix = "_total" if kind == "counter" else ""
        for named, entry in subjects[label]:
            sample = value(entry)
            if sample is not None:
                labels = "" if label is None else f'{{{label}="{_label(named)}"}}'
                out.append(f"luafcgid_{name}{suffix}{labels} {sample}")
    return out
