#!/usr/bin/env python3
"""Benchmark luafcgid against its peers, all behind one nginx on loopback.

FastCGI peers: luafcgid (this checkout), php-fpm, the WSAPI FastCGI launcher (wsapi.fcgi under
spawn-fcgi) and, when a built binary is given, the C original. Each runs in two modes, with
the same nginx lines for every peer: `plain`, a new connection per request (`fastcgi_pass
unix:...`, the README's snippet), and `keepalive`, an upstream block keeping connections open
(`keepalive N`, `fastcgi_keep_conn on`). Ceilings: nginx itself (`return 200`) and nginx's
embedded Lua (content_by_lua_block). Workloads: hello, page, post, counter; each at 16 and
256 connections. The peers run in alternation (round-robin per workload and connection
count) so that drift of the machine is shared. Load is generated with wrk. See
bench/README.md.
"""

import argparse
import datetime
import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)

PEERS = ["luafcgid", "php-fpm", "wsapi", "c-original", "nginx", "nginx-lua"]
FASTCGI = ("luafcgid", "php-fpm", "wsapi", "c-original")
MODES = ["plain", "keepalive"]
WORKLOADS = ["hello", "page", "post", "counter"]
POST_BYTES = 1024
POST_BODY = ("data=" + "x" * (POST_BYTES - 5)).encode()  # same body as wrk/bench.lua sends
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
C_ORIGINAL_ENV = "LUAFCGID_C_ORIGINAL"

# The peers that serve one connection per process or thread at a time (php-fpm children,
# wsapi.fcgi processes, the C original's libfcgi threads) get this many, the concurrency of
# luafcgid's shipped 2 processes x 2 workers. A connection such a peer keeps open holds one
# of them, so their keepalive mode keeps at most this many connections.
BLOCKING_WORKERS = 4

# URL path of each workload for each peer; a peer without an entry does not run the workload.
PATHS = {
    "luafcgid": {w: "/%s.lua" % w for w in WORKLOADS},
    "php-fpm": {w: "/%s.php" % w for w in WORKLOADS},
    "wsapi": {w: "/%s.lua" % w for w in WORKLOADS},
    "c-original": {w: "/%s.lua" % w for w in WORKLOADS},
    "nginx": {"hello": "/hello"},  # `return 200` can only answer the static hello
    "nginx-lua": {w: "/" + w for w in WORKLOADS},
}
# (peer, mode) pairs not measured, and why (shown in the notes)
UNSUPPORTED = {
    ("c-original", "keepalive"): "its worker threads take requests under one lock (libfcgi's "
                                 "accept serialization) and keep it while waiting for the next "
                                 "request on a kept connection, so one idle kept connection "
                                 "stops every other worker (requests time out)",
}
ROOTS = {"luafcgid": "www", "php-fpm": "www", "wsapi": "wsapi", "c-original": "www"}
EXTENSIONS = {"luafcgid": "lua", "php-fpm": "php", "wsapi": "lua", "c-original": "lua"}

START_TIMEOUT = 20.0   # seconds to wait for a server to accept connections
STOP_TIMEOUT = 5.0     # seconds between SIGTERM and SIGKILL
HTTP_TIMEOUT = 10.0    # seconds for one verification request


def log(msg):
    print("[bench] " + msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def label(peer, mode):
    return peer if mode is None else "%s %s" % (peer, mode)


# ---------------------------------------------------------------------------------------------
# processes


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


def fill(template_path, values):
    with open(template_path) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("@@%s@@" % key, str(value))
    left = re.findall(r"@@[A-Z_]+@@", text)
    if left:
        raise BenchError("unfilled placeholders in %s: %s" % (template_path, left))
    return text


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------------
# peers


def find_nginx_module(name):
    for d in ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/usr/lib64/nginx/modules"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    return None


def find_php_fpm():
    p = shutil.which("php-fpm")
    if p:
        return p
    cands = sorted(glob_paths("/usr/sbin/php-fpm*") + glob_paths("/usr/bin/php-fpm*"))
    return cands[-1] if cands else None


def glob_paths(pattern):
    return [p for p in glob.glob(pattern) if os.access(p, os.X_OK)]


def luafcgid_env():
    """luafcgid runs from this checkout (`python -m luafcgid` with the checkout first on
    PYTHONPATH), not from whatever `luafcgid` command is installed, so that a branch measures
    its own code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def luafcgid_available():
    r = subprocess.run([sys.executable, "-c", "import luafcgid.cli, luafcgid; print(luafcgid.__file__)"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, cwd="/",
                       env=luafcgid_env())
    if r.returncode != 0:
        return "luafcgid.cli not importable (%s)" % (
            r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""])[0]
    where = r.stdout.decode().strip()
    if not where.startswith(REPO + os.sep):
        return "python imports luafcgid from %s, not from this checkout %s" % (where, REPO)
    return None


def c_original_binary(args):
    return args.c_original or os.environ.get(C_ORIGINAL_ENV)


def availability(args):
    """Which peers can run on this machine: {peer: None or reason it cannot}."""
    why = {"luafcgid": luafcgid_available(),
           "php-fpm": None if find_php_fpm() else "php-fpm not found",
           "nginx": None}
    if not shutil.which("spawn-fcgi"):
        why["wsapi"] = "spawn-fcgi not found"
    elif not wsapi_launcher():
        why["wsapi"] = "wsapi.fcgi launcher not found (lua-wsapi-fcgi)"
    else:
        why["wsapi"] = None
    binary = c_original_binary(args)
    if not binary:
        why["c-original"] = ("no binary given (build github.com/h0tw1r3/luafcgid outside this "
                             "repository, then --c-original PATH or %s=PATH)" % C_ORIGINAL_ENV)
    elif not os.access(binary, os.X_OK):
        why["c-original"] = "%s is not an executable" % binary
    else:
        why["c-original"] = None
    if not (find_nginx_module("ngx_http_lua_module.so") and find_nginx_module("ndk_http_module.so")):
        why["nginx-lua"] = "ngx_http_lua_module.so not found (libnginx-mod-http-lua)"
    else:
        why["nginx-lua"] = None
    return why


def wsapi_launcher():
    return shutil.which("wsapi.fcgi") or (os.path.exists("/usr/bin/wsapi.fcgi") and "/usr/bin/wsapi.fcgi")


def shipped_upstream_lines():
    """The keep-alive lines of the shipped upstream block (nginx/luafcgid-upstream.conf, for
    nginx's conf.d/), so that the benchmark measures what users get."""
    with open(os.path.join(REPO, "nginx", "luafcgid-upstream.conf")) as f:
        text = f.read()
    block = re.search(r"upstream\s+luafcgid\s*\{(.*?)\n\}", text, re.S).group(1)
    lines = re.findall(r"^\s*(keepalive(?:_\w+)?\s+[^;]+;)", block, re.M)
    if not any(l.startswith("keepalive ") for l in lines):
        raise BenchError("no `keepalive N;` in nginx/luafcgid-upstream.conf's upstream block")
    return lines


def keepalive_lines(peer):
    """A peer's upstream keep-alive lines: luafcgid's as shipped (it parks idle connections, so
    nginx may keep many); the blocking peers keep no more connections than they have workers,
    with the shipped keepalive_timeout."""
    lines = shipped_upstream_lines()
    if peer == "luafcgid":
        return lines
    return ["keepalive %d;" % BLOCKING_WORKERS] + [l for l in lines if not l.startswith("keepalive ")]


def luafcgid_config(directory, settings=()):
    """The shipped etc/luafcgid.yaml with its paths (listen, logfile, pidfile, roots) pointed
    at the benchmark's (and the settings given with --set, for scale runs). Pages run as the
    user running the benchmark, like php-fpm's here, which may read the checkout: no `user`
    (started as root, with -R: see start_backend)."""
    import yaml
    base_path = os.path.join(REPO, "etc", "luafcgid.yaml")
    with open(base_path) as f:
        base = yaml.safe_load(f)
    overrides = {"listen": os.path.join(directory, "luafcgid.sock"),
                 "logfile": os.path.join(directory, "luafcgid.log"),
                 "pidfile": os.path.join(directory, "luafcgid.pid"),
                 "roots": [os.path.join(BENCH, "www")], "user": None, **dict(settings)}
    base.update(overrides)
    path = write(os.path.join(directory, "luafcgid.yaml"),
                 "# generated by bench/bench.py from %s\n" % base_path
                 + yaml.safe_dump(base, default_flow_style=False, sort_keys=False))
    return path, overrides["listen"]


C_ORIGINAL_CONFIG = """\
-- generated by bench/bench.py: the C original with the concurrency of the other peers
listen = "{listen}"
workers = {workers}
states = workers * 2
clones = states
sweep = 1000
retries = 2
showerrors = true
buffering = true
headers = "X-Powered-By: Lua\\r\\n"
handler = "main"
finishhandler = ""
httpstatus = "200 OK"
contenttype = "text/html"
maxpost = 1024 * 1024
logfile = "{logfile}"
"""


def start_backend(peer, mode, tmp, servers, args):
    """Start one FastCGI backend (its own instance per mode, so that connections kept by one
    mode never hold the other's workers), appended to `servers` at once so that it is always
    stopped; returns (Server, socket path)."""
    name = label(peer, mode)
    directory = os.path.join(tmp, "%s-%s" % (peer, mode))
    os.makedirs(directory)
    if peer == "luafcgid":
        conf, sock = luafcgid_config(directory, args.set)
        cmd = [sys.executable, "-m", "luafcgid", "-c", conf]
        if os.geteuid() == 0:
            cmd.append("--allow-to-run-as-root")
        server = Server(name, cmd, tmp, env=luafcgid_env(), cwd=directory)
    elif peer == "php-fpm":
        sock = os.path.join(directory, "php-fpm.sock")
        conf = write(os.path.join(directory, "php-fpm.conf"),
                     fill(os.path.join(BENCH, "conf", "php-fpm.conf.in"),
                          {"TMP": directory, "CHILDREN": BLOCKING_WORKERS}))
        cmd = [find_php_fpm(), "--nodaemonize", "--fpm-config", conf, "--prefix", directory]
        if os.geteuid() == 0:
            cmd.append("--allow-to-run-as-root")
        server = Server(name, cmd, tmp)
    elif peer == "wsapi":
        sock = os.path.join(directory, "wsapi.sock")
        pidfile = os.path.join(directory, "wsapi.pid")
        cmd = ["spawn-fcgi", "-s", sock, "-M", "0666", "-F", str(BLOCKING_WORKERS), "-b", "1024",
               "-P", pidfile, "--", wsapi_launcher()]
        server = Server(name, cmd, tmp, cwd=os.path.join(BENCH, "wsapi"), roots=pidfile_roots(pidfile))
    else:   # c-original: it daemonizes (leaves our session), so it is found by its command line
        sock = os.path.join(directory, "luafcgid-c.sock")
        conf = write(os.path.join(directory, "config.lua"), C_ORIGINAL_CONFIG.format(
            listen=sock, workers=BLOCKING_WORKERS, logfile=os.path.join(directory, "luafcgid-c.log")))
        cmd = [os.path.abspath(c_original_binary(args)), conf]
        server = Server(name, cmd, tmp, cwd=directory, roots=lambda: pids_running(cmd))
    servers.append(server)
    wait_ready(server, [sock])
    return server, sock


def fastcgi_server(name, port, peer, mode, sock):
    """The nginx lines for one (peer, mode): identical for every peer but the root, the
    extension and, in keepalive mode, the upstream's keep-alive count."""
    root = os.path.join(BENCH, ROOTS[peer])
    lines = []
    if mode == "keepalive":
        lines.append("    upstream %s {\n        server unix:%s;\n%s\n    }"
                     % (name, sock, "\n".join("        " + l for l in keepalive_lines(peer))))
        passing = "fastcgi_keep_conn on;\n            fastcgi_pass %s;" % name
    else:
        passing = "fastcgi_pass unix:%s;" % sock
    lines.append("""    server {
        listen 127.0.0.1:%d;
        root %s;
        location ~ \\.%s$ {
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            %s
        }
    }""" % (port, root, EXTENSIONS[peer], passing))
    return "\n".join(lines)


def start_nginx(tmp, ports, sockets, with_lua, servers, workers):
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    if not os.path.exists("/etc/nginx/fastcgi_params"):
        raise BenchError("/etc/nginx/fastcgi_params not found")
    blocks = [fastcgi_server("%s_%s" % (peer.replace("-", "_"), mode), ports[(peer, mode)], peer, mode, sock)
              for (peer, mode), sock in sockets.items()]
    values = {"TMP": tmp, "WORKERS": workers, "PORT_NGINX": ports[("nginx", None)],
              "USER": "user root root;" if os.geteuid() == 0 else "",
              "LOAD_MODULES": "", "LUA_SERVER": "", "FASTCGI_SERVERS": "\n\n".join(blocks)}
    if with_lua:
        values["LOAD_MODULES"] = "load_module %s;\nload_module %s;" % (
            find_nginx_module("ndk_http_module.so"), find_nginx_module("ngx_http_lua_module.so"))
        values["LUA_SERVER"] = fill(os.path.join(BENCH, "conf", "nginx-lua.conf.in"),
                                    {"BENCH": BENCH, "PORT_NGINX_LUA": ports[("nginx-lua", None)]})
    conf = write(os.path.join(tmp, "nginx.conf"), fill(os.path.join(BENCH, "conf", "nginx.conf.in"), values))
    server = Server("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-p", tmp + "/", "-c", conf,
                              "-g", "daemon off;"], tmp)
    servers.append(server)
    waited = [p for key, p in ports.items() if key in sockets or key == ("nginx", None)
              or (key == ("nginx-lua", None) and with_lua)]
    wait_ready(server, [("127.0.0.1", p) for p in waited])
    return server


# ---------------------------------------------------------------------------------------------
# verification and load


def http(url, body=None):
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def verify(workload, url):
    """Check that the peer answers the workload correctly; returns None or a reason."""
    try:
        if workload == "post":
            status, body = http(url, POST_BODY)
            ok = body == POST_BODY
        else:
            status, body = http(url)
            text = body.decode("utf-8", "replace")
            if workload == "hello":
                ok = text == "Hello, world!\n"
            elif workload == "page":
                ok = text.count("<tr><td>") == 200 and "&lt;b&gt;7&lt;/b&gt; &amp; &quot;more&quot; &#39;text&#39;" in text
            else:
                status2, body2 = http(url)
                a, b = text.strip(), body2.decode("utf-8", "replace").strip()
                ok = status2 == 200 and a.isdigit() and b.isdigit()
        if status != 200 or not ok:
            return "HTTP %s, unexpected body %r" % (status, body[:160])
    except Exception as e:  # noqa: BLE001 - any failure means the peer is not usable
        return "%s: %s" % (type(e).__name__, e)
    return None


def run_wrk(url, connections, duration, workload, threads):
    env = dict(os.environ)
    env.pop("BENCH_POST_BYTES", None)
    if workload == "post":
        env["BENCH_POST_BYTES"] = str(POST_BYTES)
    cmd = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d", "%gs" % duration,
           "--timeout", "5s", "-s", os.path.join(BENCH, "wrk", "bench.lua"), url]
    try:
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish: %s" % " ".join(cmd))
    out = r.stdout.decode("utf-8", "replace")
    m = re.search(r"^BENCH_RESULT (.*)$", out, re.M)
    if r.returncode != 0 or not m:
        raise BenchError("wrk failed (%s):\n%s" % (r.returncode, out[-2000:]))
    res = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    seconds = max(res["duration_us"], 1) / 1e6
    return {
        "requests": res["requests"],
        "rps": res["requests"] / seconds,
        "p50_ms": res["p50_us"] / 1000.0,
        "p99_ms": res["p99_us"] / 1000.0,
        "errors": res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"],
        "error_detail": {k: res[k] for k in ("connect", "read", "write", "status", "timeout") if res[k]},
    }


# ---------------------------------------------------------------------------------------------
# report


COLUMNS = ["peer", "mode", "workload", "conns", "req/s", "p50 ms", "p99 ms", "errors", "RSS MB",
           "CPU µs/req", "luafcgid/peer"]
RIGHT = {4, 5, 6, 7, 8, 9, 10}


def ok(results, key):
    r = results.get(key)
    return r if r is not None and "error" not in r else None


def table_rows(results, order):
    """One row per measured (peer, mode, workload, conns). The ratio compares luafcgid with a
    FastCGI peer behind the same nginx lines (same mode) only; none against the ceilings."""
    rows = []
    for key in order:
        peer, mode, workload, conns = key
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            rows.append([peer, mode or "-", workload, str(conns), "failed"] + ["-"] * 6)
            continue
        ratio = "-"
        ref = ok(results, ("luafcgid", mode, workload, conns))
        if peer in FASTCGI and ref and r["rps"] > 0:
            ratio = "%.2f" % (ref["rps"] / r["rps"])
        rows.append([peer, mode or "-", workload, str(conns), "%.0f" % r["rps"], "%.2f" % r["p50_ms"],
                     "%.2f" % r["p99_ms"], str(r["errors"]),
                     "%.1f" % r["rss_mb"], "%.0f" % r["cpu_us"], ratio])
    return rows


def summary(results, connections):
    """luafcgid against the targets of issue 13, from this run's figures: lines of text."""
    def rps(peer, mode, workload, conns=16):
        r = ok(results, (peer, mode, workload, conns))
        return r["rps"] if r else None

    def ratio(a, b):
        return "%.2f" % (a / b) if a and b else "n/a"

    lines = []
    for workload, goal in (("hello", ">= 1.0, aim 1.25"), ("page", ">= 1.0")):
        lines.append("plain, %s, 16 conns: luafcgid/php-fpm %s (target %s)" % (
            workload, ratio(rps("luafcgid", "plain", workload), rps("php-fpm", "plain", workload)), goal))
    lines.append("plain, page, 16 conns: luafcgid/wsapi %s (target >= 1.6)" % ratio(
        rps("luafcgid", "plain", "page"), rps("wsapi", "plain", "page")))
    for workload, goal in (("hello", ">= 1.5"), ("page", ">= 1.2")):
        fpm = {m: rps("php-fpm", m, workload) for m in MODES}
        best = max((m for m in MODES if fpm[m]), key=lambda m: fpm[m], default=None)
        lines.append("at their best, %s, 16 conns: luafcgid keepalive/php-fpm %s %s (target %s)" % (
            workload, best or "-", ratio(rps("luafcgid", "keepalive", workload), fpm.get(best)), goal))
    for conns in [c for c in connections if c != 16]:
        for mode in MODES:
            errors, worst = 0, None
            for workload in WORKLOADS:
                ours = ok(results, ("luafcgid", mode, workload, conns))
                theirs = ok(results, ("php-fpm", mode, workload, conns))
                if ours:
                    errors += ours["errors"]
                if ours and theirs and theirs["p99_ms"] > 0:
                    p99 = ours["p99_ms"] / theirs["p99_ms"]
                    worst = p99 if worst is None else max(worst, p99)
            lines.append("%s, %d conns: luafcgid errors %d (target 0); worst p99 luafcgid/php-fpm %s "
                         "(target <= 1)" % (mode, conns, errors, "%.2f" % worst if worst else "n/a"))
    for mode in MODES:
        lines.append("%s, page, 16 conns: luafcgid's share of nginx-lua's pages/s %s" % (
            mode, ratio(rps("luafcgid", mode, "page"), rps("nginx-lua", None, "page"))))
    return lines


def text_table(rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown(rows, targets, args, notes, argv):
    lines = ["# luafcgid benchmark", "",
             "- date: %s" % datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"),
             "- nproc: %d" % os.cpu_count(),
             "- command: `%s`" % " ".join(shlex.quote(a) for a in argv),
             "- duration per run: %gs, rounds: %d, wrk threads: %d, nginx workers: %d"
             % (args.duration, args.rounds, args.threads, args.nginx_workers),
             ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---:" if i in RIGHT else "---" for i in range(len(COLUMNS))) + "|")
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    lines.append("mode: plain = a new connection per request (`fastcgi_pass unix:...`); keepalive = an "
                 "upstream block with `keepalive N` and `fastcgi_keep_conn on`. req/s: requests per "
                 "second; p50/p99: latency percentiles from wrk; errors: non-2xx/3xx responses + socket "
                 "errors; RSS: resident memory of the backend's process tree after the run (nginx itself "
                 "for the nginx peers); CPU µs/req: the CPU time the backend's process tree used during "
                 "the run per request answered (on a busy machine the steadier measure); luafcgid/peer: luafcgid's req/s divided by the peer's, same mode.")
    lines += ["", "Against the targets:", ""] + ["- " + t for t in targets]
    if notes:
        lines += ["", "Notes:", ""] + ["- " + n for n in notes]
    return "\n".join(lines) + "\n"


def plot(results, order, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, series = [], []
    for peer, mode, workload, conns in order:
        if (workload, conns) not in groups:
            groups.append((workload, conns))
        if (peer, mode) not in series:
            series.append((peer, mode))
    fig, ax = plt.subplots(figsize=(max(8, 2.0 * len(groups)), 5))
    width = 0.8 / max(1, len(series))
    for i, (peer, mode) in enumerate(series):
        xs, ys = [], []
        for g, (workload, conns) in enumerate(groups):
            r = ok(results, (peer, mode, workload, conns))
            if r:
                xs.append(g + (i - (len(series) - 1) / 2.0) * width)
                ys.append(r["rps"])
        ax.bar(xs, ys, width, label=label(peer, mode), hatch="//" if mode == "keepalive" else None)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["%s\n%d conns" % g for g in groups])
    ax.set_ylabel("requests/s")
    ax.set_yscale("log")
    ax.set_title("luafcgid benchmark (nproc %d)" % os.cpu_count(), pad=40)
    ax.legend(ncol=min(5, len(series)), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
              fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# main


def split_list(value, allowed, what):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit("unknown %s: %s (choose from %s)" % (what, ", ".join(bad), ", ".join(allowed)))
    return items


def setting(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, got %r" % text)
    import yaml
    return key, yaml.safe_load(value)


def parse_args(argv):
    p = argparse.ArgumentParser(description="luafcgid benchmark: luafcgid vs php-fpm, WSAPI, the C original "
                                            "and nginx, via wrk")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--smoke", action="store_true", help="quick check for CI: 1s runs, 16 connections only, no warm-up")
    p.add_argument("--peers", default=",".join(PEERS), help="comma list of peers (default all: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of FastCGI modes (default %(default)s)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of workloads (default %(default)s)")
    p.add_argument("--connections", default="16,256", help="comma list of connection counts (default %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each run (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole alternation N times, report the median run")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)")
    p.add_argument("--c-original", metavar="PATH",
                   help="a built binary of the C original (default: $%s; skipped when neither is set)"
                   % C_ORIGINAL_ENV)
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--plot", metavar="FILE.png", help="also write a bar chart (needs matplotlib)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], type=setting,
                   help="override a luafcgid setting (YAML value), e.g. processes=2; repeatable")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration = 1.0
        args.connections = "16"
        args.warmup = 0.0
    args.peers = split_list(args.peers, PEERS, "peers")
    args.modes = split_list(args.modes, MODES, "modes")
    args.workloads = split_list(args.workloads, WORKLOADS, "workloads")
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        raise SystemExit("--connections takes a comma list of integers")
    if args.duration <= 0 or args.duration > 600 or args.rounds < 1 or args.rounds > 20 or not args.connections:
        raise SystemExit("--duration must be in (0, 600], --rounds in [1, 20]")
    return args


def targets_of(peers, modes):
    """(peer, mode) pairs to measure: every FastCGI peer in every mode it supports, the
    ceilings once."""
    return [(peer, mode) for peer in peers for mode in (modes if peer in FASTCGI else [None])
            if (peer, mode) not in UNSUPPORTED]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found (apt-get install wrk, or use bench/run)")
    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        raise SystemExit("nginx not found (apt-get install nginx, or use bench/run)")

    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored

    notes = []
    failed = []
    why = availability(args)
    peers = []
    for peer in args.peers:
        if why[peer] and peer == "c-original" and not c_original_binary(args):
            log("skip c-original: %s" % why[peer])   # optional: noted, not a failure
            notes.append("c-original skipped: %s" % why[peer])
        elif why[peer]:
            log("skip %s: %s" % (peer, why[peer]))
            notes.append("%s skipped: %s" % (peer, why[peer]))
            failed.append(peer)
        else:
            peers.append(peer)

    tmp = tempfile.mkdtemp(prefix="luafcgid-bench-")
    os.chmod(tmp, 0o755)
    servers = []
    backends = {}
    sockets = {}
    results = {}
    runs = {}
    total = 0
    t0 = time.monotonic()
    targets = targets_of(peers, args.modes)
    for (peer, mode), why_not in UNSUPPORTED.items():
        if peer in peers and mode in args.modes:
            notes.append("%s not measured: %s" % (label(peer, mode), why_not))
    try:
        for peer, mode in list(targets):
            if peer not in FASTCGI:
                continue
            try:
                backends[(peer, mode)], sockets[(peer, mode)] = start_backend(peer, mode, tmp, servers, args)
            except BenchError as e:
                log("cannot start %s: %s" % (label(peer, mode), e))
                notes.append("%s did not start: %s" % (label(peer, mode), str(e).splitlines()[0]))
                failed.append(label(peer, mode))
                targets.remove((peer, mode))
        ports = {key: free_port() for key in targets_of(PEERS, MODES)}
        with_lua = ("nginx-lua", None) in targets
        try:
            nginx = start_nginx(tmp, ports, sockets, with_lua, servers, args.nginx_workers)
        except BenchError as e:
            if not with_lua:
                raise
            # the Lua module may not load: drop that peer rather than every peer
            log("nginx with the Lua module failed, retrying without nginx-lua: %s" % e)
            notes.append("nginx-lua skipped: nginx did not start with the Lua module")
            failed.append("nginx-lua")
            targets.remove(("nginx-lua", None))
            servers.pop().stop()
            nginx = start_nginx(tmp, ports, sockets, False, servers, args.nginx_workers)
        backends[("nginx", None)] = backends[("nginx-lua", None)] = nginx

        # verify every (peer, mode, workload) once before measuring anything
        plan = []
        for workload in args.workloads:
            for peer, mode in targets:
                path = PATHS[peer].get(workload)
                if not path:
                    continue
                url = "http://127.0.0.1:%d%s" % (ports[(peer, mode)], path)
                err = verify(workload, url)
                if err:
                    log("%s %s fails verification: %s" % (label(peer, mode), workload, err))
                    notes.append("%s/%s failed verification: %s" % (label(peer, mode), workload, err))
                    failed.append("%s/%s" % (label(peer, mode), workload))
                    for c in args.connections:
                        results[(peer, mode, workload, c)] = {"error": err}
                    continue
                plan.append((peer, mode, workload, url))

        order = [(peer, mode, workload, conns) for workload in args.workloads for conns in args.connections
                 for peer, mode in sorted(targets, key=lambda t: (MODES.index(t[1]) if t[1] else 2))
                 if PATHS[peer].get(workload)]
        total = len([k for k in order if k not in results]) * args.rounds
        log("%d runs of %gs (+%gs warm-up) each, peers in alternation" % (total, args.duration, args.warmup))
        done = 0
        for _ in range(args.rounds):
            for workload in args.workloads:
                for conns in args.connections:
                    for peer, mode, wl, url in plan:
                        if wl != workload:
                            continue
                        key = (peer, mode, workload, conns)
                        done += 1
                        try:
                            if args.warmup > 0:
                                run_wrk(url, conns, args.warmup, workload, args.threads)
                            srv = backends.get((peer, mode))
                            cpu_before = srv.usage()[1]
                            r = run_wrk(url, conns, args.duration, workload, args.threads)
                        except BenchError as e:
                            log("%s %s c=%d: %s" % (label(peer, mode), workload, conns, e))
                            runs.setdefault(key, []).append({"error": str(e)})
                            continue
                        r["rss_mb"], cpu_after = srv.usage()
                        r["cpu_us"] = (cpu_after - cpu_before) / max(r["requests"], 1) * 1e6
                        if not srv.alive():  # noted, the next runs will show errors
                            log("%s died:\n%s" % (label(peer, mode), srv.tail()))
                        runs.setdefault(key, []).append(r)
                        log("[%d/%d] %-19s %-7s c=%-3d %8.0f req/s  p50 %.2f ms  p99 %.2f ms  "
                            "%.0f CPU us/req  errors %d %s"
                            % (done, total, label(peer, mode), workload, conns, r["rps"], r["p50_ms"],
                               r["p99_ms"], r["cpu_us"], r["errors"], r["error_detail"] or ""))
        for key, lst in runs.items():
            good = sorted((r for r in lst if "error" not in r), key=lambda r: r["rps"])
            results[key] = good[len(good) // 2] if good else lst[-1]
            if not good:
                failed.append("%s/%s/%s/%d" % key)
    finally:
        for srv in reversed(servers):  # nginx first, then the backends
            srv.stop()
        if args.keep:
            log("temporary directory kept: %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = table_rows(results, order)
    targets_met = summary(results, args.connections)
    print()
    print(text_table(rows))
    print()
    for line in targets_met:
        print(line)
    for n in notes:
        print("note: " + n)
    print("(%d runs in %.0fs; duration %gs per run; wrk threads %d; nginx workers %d; nproc %d)"
          % (total, time.monotonic() - t0, args.duration, args.threads, args.nginx_workers, os.cpu_count()))
    if args.markdown:
        write(args.markdown, markdown(rows, targets_met, args, notes, ["bench/run"] + argv))
        log("wrote %s" % args.markdown)
    if args.plot:
        try:
            plot(results, order, args.plot)
            log("wrote %s" % args.plot)
        except ImportError as e:
            log("cannot plot: %s (pip install matplotlib, or use bench/run --plot)" % e)
            failed.append("plot")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log("error: %s" % e)
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
