"""The servers of a benchmark run: each started in its own session so that it and all it forks
can be found (for CPU and memory) and stopped."""

import os
import shlex
import signal
import socket
import subprocess
import time

from bench.common import BenchError, log

START_TIMEOUT = 20.0   # seconds to wait for a server to accept connections
STOP_TIMEOUT = 5.0     # seconds between SIGTERM and SIGKILL
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_table():
    """{pid: (ppid, session, rss_bytes, cpu_seconds)} of every live (non-zombie) process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(")") + 2:].split()
        if len(fields) > 21 and fields[0] not in ("Z", "X"):
            table[int(name)] = (int(fields[1]), int(fields[3]), int(fields[21]) * PAGE_SIZE,
                                (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def pids_running(argv):
    """Pids whose command line is exactly `argv` (a daemon that left our session)."""
    wanted = "\0".join(argv) + "\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/cmdline" % name) as f:
                    if f.read() == wanted:
                        found.append(int(name))
            except OSError:
                continue
    return found


def tree_pids(sid, roots=(), table=None):
    """Pids of a server's process tree: its session (all it forked, even reparented), the extra
    root pids (e.g. children that spawn-fcgi detached into sessions of their own) and all their
    descendants."""
    table = proc_table() if table is None else table
    pids = {pid for pid, (ppid, s, rss, cpu) in table.items() if s == sid}
    pids |= {pid for pid in roots if pid in table}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, s, rss, cpu) in table.items():
            if ppid in pids and pid not in pids:
                pids.add(pid)
                changed = True
    return sorted(pids)


class Server:
    """A server process started in its own session, so that it and all it forks can be stopped.
    `roots()` lists pids that left the session (spawn-fcgi's children, a daemon that detached)."""

    def __init__(self, name, cmd, tmp, env=None, cwd=None, roots=None):
        self.name = name
        self.cmd = cmd
        self.roots = roots or (lambda: [])
        self.logpath = os.path.join(tmp, "%s.out" % name.replace(" ", "-"))
        self.logfile = open(self.logpath, "wb")
        log("start %s: %s" % (name, " ".join(shlex.quote(c) for c in cmd)))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env, cwd=cwd)
        self.sid = self.proc.pid

    def pids(self, table=None):
        return tree_pids(self.sid, self.roots(), table)

    def alive(self):
        return bool(self.pids())

    def usage(self):
        """(resident set size in MB, CPU seconds used) summed over the server's process tree."""
        table = proc_table()
        pids = self.pids(table)
        return (sum(table[pid][2] for pid in pids) / (1024.0 * 1024.0),
                sum(table[pid][3] for pid in pids))

    def tail(self, n=15):
        try:
            with open(self.logpath, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and (self.proc.poll() is None or self.pids()):
            time.sleep(0.05)
        left = self.pids()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if left:
            log("killed %s (pids %s) after SIGTERM timeout" % (self.name, left))
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        self.logfile.close()


def pidfile_roots(path):
    def roots():
        try:
            with open(path) as f:
                return [int(x) for x in f.read().split() if x.isdigit()]
        except OSError:
            return []
    return roots


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_connect(address):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
            return True
        except OSError:
            return False


def wait_ready(server, addresses, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(can_connect(a) for a in addresses):
            return
        if server.proc.poll() is not None and (server.proc.returncode != 0 or not server.alive()):
            raise BenchError("%s exited with %s:\n%s" % (server.name, server.proc.returncode, server.tail()))
        time.sleep(0.1)
    raise BenchError("%s did not accept connections on %s within %.0fs:\n%s"
                     % (server.name, addresses, timeout, server.tail()))


