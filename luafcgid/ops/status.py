"""The status and ping pages (php-fpm's pm.status_path and ping.path).

The responder answers them when SCRIPT_NAME matches status_path or ping_path, before any
script lookup. Only clients in status_allow see them, by REMOTE_ADDR: the web server's
word, which anyone who can connect to luafcgid's socket can forge. That is why a TCP
listener needs allowed_clients (clients.py): on a Unix socket, listen_mode and listen_group
decide who can speak. The status page is plain text, JSON with `?json`, or OpenMetrics text (which
Prometheus reads) with `?openmetrics`.
"""

import ipaddress
import json
import os
import socket
import subprocess
import time
from collections import defaultdict

from ..request import pages
from ..request.clients import peer_address

OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


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


def _whole_pool(data, scoreboard):
    """Under the supervisor: the request and worker figures become the sums over every
    process (this one live, the others as they published them within the last second), and
    `processes` lists each. States and scripts stay this process's own."""
    processes = [slot for slot in scoreboard.read() if slot["pid"]]
    data["processes"] = processes
    for key in ("requests", "failed_requests", "slow_requests"):
        data[key] = sum(slot[key] for slot in processes)
    total = sum(slot["workers"] for slot in processes)
    active = sum(slot["active_workers"] for slot in processes)
    data["workers"] = {"total": total, "active": active, "idle": total - active,
                       "stuck": sum(slot["stuck_workers"] for slot in processes)}
    uptime = data["uptime_seconds"]
    data["requests_per_second"] = round(data["requests"] / uptime, 3) if uptime > 0 else 0.0


class Status:
    def __init__(self, metrics, sock, stuck, scoreboard=None, publish=None, dictionaries=None):
        """The figures of `metrics` (a metrics.Metrics), the accept queue of sock() (the
        listening socket), the workers stuck() in Lua (deadline.Watcher.stuck), with the
        supervisor every process's from `scoreboard`, on which publish() puts this one's
        first, and those of the shared `dictionaries` (shared.Dictionaries)."""
        self.metrics = metrics
        self.sock = sock
        self.stuck = stuck
        self.scoreboard = scoreboard
        self.publish = publish
        self.dictionaries = dictionaries

    def routes(self, config, pool):
        """SCRIPT_NAME (bytes) -> page function, for a responder whose states are `pool`."""
        allowed = tuple(ipaddress.ip_network(network) for network in config.status_allow)
        found = {}
        if config.status_path:
            found[config.status_path.encode()] = lambda params: self._guarded(
                allowed, params, lambda params: self.status_page(params, pool))
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

    def snapshot(self, pool):
        """Everything the status page shows, as plain data."""
        metrics = self.metrics
        requests, failed, slow, active = metrics.totals()
        stuck = self.stuck()
        uptime = metrics.uptime()
        scripts = defaultdict(lambda: {"clones": 0, "requests": 0, "loaded_at": 0.0,
                                       "memory_kb": None})
        for state in pool.states():
            entry = scripts[state.path]
            entry["clones"] += 1
            entry["requests"] += state.requests
            entry["loaded_at"] = max(entry["loaded_at"], state.loaded_at)
            memory = pool.inspect(state, _memory_kb)
            if memory is not None:
                entry["memory_kb"] = (entry["memory_kb"] or 0.0) + memory
        data = {
            "pid": os.getpid(),
            "start_time": metrics.started,
            "uptime_seconds": round(uptime, 3),
            "requests": requests,
            "requests_per_second": round(requests / uptime, 3) if uptime > 0 else 0.0,
            "failed_requests": failed,
            "slow_requests": slow,
            "workers": {"total": len(metrics.workers), "active": active,
                        "idle": len(metrics.workers) - active, "stuck": len(stuck)},
            # workers given up on, stuck in Lua past request_timeout (deadline.py)
            "stuck": stuck,
            "states": pool.stats(),
            "scripts": [{"path": path, **entry} for path, entry in sorted(scripts.items())],
            # one store for every process: whichever answers shows the same
            "shared": self.dictionaries.stats() if self.dictionaries is not None else [],
        }
        queue = accept_queue(self.sock())
        if queue is not None:   # omitted where the system does not tell
            data["queue"] = queue
        if self.scoreboard is not None:
            self.publish()
            _whole_pool(data, self.scoreboard)
        return data

    def status_page(self, params, pool):
        query = params.get(b"QUERY_STRING", b"").split(b"&")
        data = self.snapshot(pool)
        if b"json" in query:
            body = json.dumps(data, indent=1).encode() + b"\n"
            return _plain("200 OK", body, "application/json")
        if b"openmetrics" in query:
            return _plain("200 OK", openmetrics(data).encode(), OPENMETRICS_TYPE)
        return _plain("200 OK", text(data).encode())


def text(data):
    workers = data["workers"]
    lines = [f"pid: {data['pid']}",
             f"start time: {time.strftime('%Y-%m-%dT%H:%M:%S%z', time.localtime(data['start_time']))}",
             f"uptime seconds: {data['uptime_seconds']}",
             f"requests: {data['requests']}",
             f"requests per second: {data['requests_per_second']}",
             f"failed requests: {data['failed_requests']}",
             f"slow requests: {data['slow_requests']}",
             f"active workers: {workers['active']}",
             f"idle workers: {workers['idle']}",
             f"total workers: {workers['total']}",
             f"stuck workers: {workers['stuck']}"]
    if "queue" in data:
        lines.append(f"listen queue: {data['queue']}")
    for slot in data.get("processes", ()):
        lines.append(f"process {slot['process']}: pid {slot['pid']} requests {slot['requests']} "
                     f"failed {slot['failed_requests']} slow {slot['slow_requests']} active "
                     f"workers {slot['active_workers']} of {slot['workers']} stuck "
                     f"{slot['stuck_workers']}")
    for stuck in data["stuck"]:
        lines.append(f"stuck: {stuck['worker']} running {stuck['request']} for "
                     f"{stuck['seconds']} s")
    lines.append(f"states: {data['states']['states']} (created {data['states']['created']}, "
                 f"evicted {data['states']['evicted']}, flushed {data['states']['flushed']})")
    for script in data["scripts"]:
        memory = "-" if script["memory_kb"] is None else f"{script['memory_kb']:.1f} KiB"
        loaded = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(script["loaded_at"]))
        lines.append(f"script: {script['path']} clones {script['clones']} requests "
                     f"{script['requests']} loaded {loaded} memory {memory}")
    for shared in data["shared"]:
        lines.append(f"shared: {shared['name']} capacity {shared['capacity']} free "
                     f"{shared['free_space']} keys {shared['keys']}")
    return "\n".join(lines) + "\n"


def _label(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def openmetrics(data):
    """OpenMetrics text: every family has # TYPE and # HELP; counters end in _total."""
    out = []

    def family(name, kind, help_text, samples):
        out.append(f"# TYPE luafcgid_{name} {kind}")
        out.append(f"# HELP luafcgid_{name} {help_text}")
        suffix = "_total" if kind == "counter" else ""
        for labels, value in samples:
            out.append(f"luafcgid_{name}{suffix}{labels} {value}")

    workers = data["workers"]
    family("start_time_seconds", "gauge", "Unix time the daemon started.",
           [("", data["start_time"])])
    family("uptime_seconds", "gauge", "Seconds since the daemon started.",
           [("", data["uptime_seconds"])])
    family("requests", "counter", "Requests answered.", [("", data["requests"])])
    family("failed_requests", "counter", "Requests answered with a 5xx status.",
           [("", data["failed_requests"])])
    family("slow_requests", "counter", "Requests that ran longer than slowlog_timeout.",
           [("", data["slow_requests"])])
    family("workers", "gauge", "Worker threads by activity.",
           [('{state="active"}', workers["active"]), ('{state="idle"}', workers["idle"])])
    family("stuck_workers", "gauge", "Workers stuck in Lua past request_timeout, which could "
           "not stop them.", [("", workers["stuck"])])
    if "queue" in data:
        family("listen_queue", "gauge", "Connections waiting to be accepted.",
               [("", data["queue"])])
    family("states", "gauge", "Lua states in the pool.", [("", data["states"]["states"])])
    scripts = data["scripts"]
    labels = [f'{{script="{_label(s["path"])}"}}' for s in scripts]
    family("script_clones", "gauge", "Lua states holding the script.",
           [(label, s["clones"]) for label, s in zip(labels, scripts)])
    family("script_requests", "counter", "Requests served by the script's loaded states.",
           [(label, s["requests"]) for label, s in zip(labels, scripts)])
    family("script_load_time_seconds", "gauge", "Unix time the script was last loaded.",
           [(label, s["loaded_at"]) for label, s in zip(labels, scripts)])
    family("script_memory_bytes", "gauge", "Lua memory of the script's idle states.",
           [(label, round(s["memory_kb"] * 1024)) for label, s in zip(labels, scripts)
            if s["memory_kb"] is not None])
    shared = data["shared"]
    labels = [f'{{dict="{_label(d["name"])}"}}' for d in shared]
    family("shared_capacity_bytes", "gauge", "Capacity of the shared dictionary.",
           [(label, d["capacity"]) for label, d in zip(labels, shared)])
    family("shared_free_bytes", "gauge", "Free space in the shared dictionary.",
           [(label, d["free_space"]) for label, d in zip(labels, shared)])
    family("shared_keys", "gauge", "Keys stored in the shared dictionary (expired ones "
           "until they are reclaimed).", [(label, d["keys"]) for label, d in zip(labels, shared)])
    out.append("# EOF")
    return "\n".join(out) + "\n"
