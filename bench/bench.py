#!/usr/bin/env python3
"""Benchmark luafcgid against its peers, all behind one nginx on loopback.

Peers: luafcgid, php-fpm (4 static children), the WSAPI FastCGI launcher (wsapi.fcgi under
spawn-fcgi -F 4), and as ceilings nginx itself (`return 200`) and nginx's embedded Lua
(content_by_lua_block). Workloads: hello, page, post, counter; each at 16 and 256 connections.
The peers run in alternation (round-robin per workload and connection count) so that drift of
the machine is shared. Load is generated with wrk. See bench/README.md.
"""

import argparse
import datetime
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

PEERS = ["luafcgid", "php-fpm", "wsapi", "nginx", "nginx-lua"]
WORKLOADS = ["hello", "page", "post", "counter"]
POST_BYTES = 1024
POST_BODY = ("data=" + "x" * (POST_BYTES - 5)).encode()  # same body as wrk/bench.lua sends
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# URL path of each workload for each peer; a peer without an entry does not run the workload.
PATHS = {
    "luafcgid": {w: "/%s.lua" % w for w in WORKLOADS},
    "php-fpm": {w: "/%s.php" % w for w in WORKLOADS},
    "wsapi": {w: "/%s.lua" % w for w in WORKLOADS},
    "nginx": {"hello": "/hello"},  # `return 200` can only answer the static hello
    "nginx-lua": {w: "/" + w for w in WORKLOADS},
}
PORT_KEYS = {"luafcgid": "PORT_LUAFCGID", "php-fpm": "PORT_PHP_FPM", "wsapi": "PORT_WSAPI",
             "nginx": "PORT_NGINX", "nginx-lua": "PORT_NGINX_LUA"}

START_TIMEOUT = 20.0   # seconds to wait for a server to accept connections
STOP_TIMEOUT = 5.0     # seconds between SIGTERM and SIGKILL
HTTP_TIMEOUT = 10.0    # seconds for one verification request


def log(msg):
    print("[bench] " + msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# processes


def proc_table():
    """{pid: (ppid, session, rss_bytes)} of every live (non-zombie) process."""
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
            table[int(name)] = (int(fields[1]), int(fields[3]), int(fields[21]) * PAGE_SIZE)
    return table


def tree_pids(sid, roots=(), table=None):
    """Pids of a server's process tree: its session (all it forked, even reparented), the extra
    root pids (e.g. children that spawn-fcgi detached into sessions of their own) and all their
    descendants."""
    table = proc_table() if table is None else table
    pids = {pid for pid, (ppid, s, rss) in table.items() if s == sid}
    pids |= {pid for pid in roots if pid in table}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, s, rss) in table.items():
            if ppid in pids and pid not in pids:
                pids.add(pid)
                changed = True
    return sorted(pids)


class Server:
    """A server process started in its own session, so that it and all it forks can be stopped."""

    def __init__(self, name, cmd, tmp, env=None, cwd=None, pidfile=None):
        self.name = name
        self.pidfile = pidfile  # file listing pids that left the session (spawn-fcgi children)
        self.cmd = cmd
        self.logpath = os.path.join(tmp, "%s.out" % name)
        self.logfile = open(self.logpath, "wb")
        log("start %s: %s" % (name, " ".join(shlex.quote(c) for c in cmd)))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env, cwd=cwd)
        self.sid = self.proc.pid

    def pids(self, table=None):
        roots = []
        if self.pidfile:
            try:
                with open(self.pidfile) as f:
                    roots = [int(x) for x in f.read().split() if x.isdigit()]
            except OSError:
                pass
        return tree_pids(self.sid, roots, table)

    def alive(self):
        return bool(self.pids())

    def rss(self):
        """Sum of the resident set size of the server's process tree, in MB."""
        table = proc_table()
        return sum(table[pid][2] for pid in self.pids(table)) / (1024.0 * 1024.0)

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
    for name in ("php-fpm",):
        p = shutil.which(name)
        if p:
            return p
    cands = sorted(glob_paths("/usr/sbin/php-fpm*") + glob_paths("/usr/bin/php-fpm*"))
    return cands[-1] if cands else None


def glob_paths(pattern):
    import glob
    return [p for p in glob.glob(pattern) if os.access(p, os.X_OK)]


def luafcgid_command():
    exe = shutil.which("luafcgid")
    if exe:
        return [exe]
    # not installed as a command: run the repo's source
    return [sys.executable, "-c",
            "import sys; sys.path.insert(0, %r); from luafcgid.cli import main; "
            "sys.argv[0] = 'luafcgid'; sys.exit(main())" % REPO]


def luafcgid_available():
    code = "import luafcgid.cli" if shutil.which("luafcgid") else \
        "import sys; sys.path.insert(0, %r); import luafcgid.cli" % REPO
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60, cwd="/")
    return r.returncode == 0, r.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]


def availability():
    """Which peers can run on this machine: {peer: None or reason it cannot}."""
    why = {}
    ok, err = luafcgid_available()
    why["luafcgid"] = None if ok else "luafcgid.cli not importable (%s)" % err[0]
    why["php-fpm"] = None if find_php_fpm() else "php-fpm not found"
    if not shutil.which("spawn-fcgi"):
        why["wsapi"] = "spawn-fcgi not found"
    elif not wsapi_launcher():
        why["wsapi"] = "wsapi.fcgi launcher not found (lua-wsapi-fcgi)"
    else:
        why["wsapi"] = None
    why["nginx"] = None
    if not (find_nginx_module("ngx_http_lua_module.so") and find_nginx_module("ndk_http_module.so")):
        why["nginx-lua"] = "ngx_http_lua_module.so not found (libnginx-mod-http-lua)"
    else:
        why["nginx-lua"] = None
    return why


def wsapi_launcher():
    return shutil.which("wsapi.fcgi") or (os.path.exists("/usr/bin/wsapi.fcgi") and "/usr/bin/wsapi.fcgi")


def luafcgid_config(tmp, settings=()):
    """The shipped etc/luafcgid.yaml with its paths (listen, logfile, pidfile, roots) pointed
    at the benchmark's (and the settings given with --set, for scale runs)."""
    base_path = os.path.join(REPO, "etc", "luafcgid.yaml")
    overrides = {"listen": os.path.join(tmp, "luafcgid.sock"),
                 "logfile": os.path.join(tmp, "luafcgid.log"),
                 "pidfile": os.path.join(tmp, "luafcgid.pid"),
                 "roots": [os.path.join(BENCH, "www")], **dict(settings)}
    base = {}
    base_text = ""
    if os.path.exists(base_path):
        with open(base_path) as f:
            base_text = f.read()
    else:
        log("no %s: luafcgid runs with its built-in defaults" % base_path)
    path = os.path.join(tmp, "luafcgid.yaml")
    try:
        import yaml
        base = yaml.safe_load(base_text) or {} if base_text else {}
        if not isinstance(base, dict):
            raise BenchError("%s is not a YAML mapping" % base_path)
        base.update(overrides)
        write(path, "# generated by bench/bench.py from %s\n" % base_path
              + yaml.safe_dump(base, default_flow_style=False, sort_keys=False))
    except ImportError:  # keep the shipped text, replace the three keys
        lines = [l for l in base_text.splitlines()
                 if not re.match(r"\s*(listen|logfile|pidfile|roots)\s*:", l)]
        lines += ["%s: %s" % (k, v) for k, v in overrides.items()]
        write(path, "\n".join(lines) + "\n")
    return path, overrides["listen"]


def start_backend(peer, tmp, servers, luafcgid_settings=()):
    """Start one FastCGI backend, appended to `servers` at once so that it is always stopped;
    returns the Server (the nginx peers have none of their own)."""
    if peer == "luafcgid":
        conf, sock = luafcgid_config(tmp, luafcgid_settings)
        server = Server("luafcgid", luafcgid_command() + ["-c", conf], tmp, cwd=tmp)
        servers.append(server)
        wait_ready(server, [sock])
        return server
    if peer == "php-fpm":
        conf = write(os.path.join(tmp, "php-fpm.conf"),
                     fill(os.path.join(BENCH, "conf", "php-fpm.conf.in"), {"TMP": tmp}))
        cmd = [find_php_fpm(), "--nodaemonize", "--fpm-config", conf, "--prefix", tmp]
        if os.geteuid() == 0:
            cmd.append("--allow-to-run-as-root")
        server = Server("php-fpm", cmd, tmp)
        servers.append(server)
        wait_ready(server, [os.path.join(tmp, "php-fpm.sock")])
        return server
    if peer == "wsapi":
        sock = os.path.join(tmp, "wsapi.sock")
        pidfile = os.path.join(tmp, "wsapi.pid")
        cmd = ["spawn-fcgi", "-s", sock, "-M", "0666", "-F", "4", "-b", "1024", "-P", pidfile,
               "--", wsapi_launcher()]
        server = Server("wsapi", cmd, tmp, cwd=os.path.join(BENCH, "wsapi"), pidfile=pidfile)
        servers.append(server)
        wait_ready(server, [sock])
        return server
    return None


def start_nginx(tmp, ports, with_lua, servers):
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    values = {"TMP": tmp, "BENCH": BENCH, "FASTCGI_PARAMS": "/etc/nginx/fastcgi_params",
              "USER": "user root root;" if os.geteuid() == 0 else "",
              "LOAD_MODULES": "", "LUA_SERVER": ""}
    if not os.path.exists(values["FASTCGI_PARAMS"]):
        raise BenchError("/etc/nginx/fastcgi_params not found")
    for peer, key in PORT_KEYS.items():
        values[key] = ports[peer]
    if with_lua:
        values["LOAD_MODULES"] = "load_module %s;\nload_module %s;" % (
            find_nginx_module("ndk_http_module.so"), find_nginx_module("ngx_http_lua_module.so"))
        values["LUA_SERVER"] = fill(os.path.join(BENCH, "conf", "nginx-lua.conf.in"),
                                    {"BENCH": BENCH, "PORT_NGINX_LUA": ports["nginx-lua"]})
    conf = write(os.path.join(tmp, "nginx.conf"), fill(os.path.join(BENCH, "conf", "nginx.conf.in"), values))
    server = Server("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-p", tmp + "/", "-c", conf,
                              "-g", "daemon off;"], tmp)
    servers.append(server)
    waited = [p for peer, p in ports.items() if peer != "nginx-lua" or with_lua]
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


def verify(peer, workload, url):
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


COLUMNS = ["peer", "workload", "conns", "req/s", "p50 ms", "p99 ms", "errors", "RSS MB", "luafcgid/peer"]


def table_rows(results, order):
    rows = []
    for key in order:
        peer, workload, conns = key
        r = results.get(key)
        if r is None:
            continue
        ref = results.get(("luafcgid", workload, conns))
        if "error" in r:
            rows.append([peer, workload, str(conns), "failed", "-", "-", "-", "-", "-"])
            continue
        ratio = "-"
        if ref and "error" not in ref and r["rps"] > 0:
            ratio = "%.2f" % (ref["rps"] / r["rps"])
        rows.append([peer, workload, str(conns), "%.0f" % r["rps"], "%.2f" % r["p50_ms"],
                     "%.2f" % r["p99_ms"], str(r["errors"]),
                     "%.1f" % r["rss_mb"] if r.get("rss_mb") is not None else "-", ratio])
    return rows


def text_table(rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    right = {3, 4, 5, 6, 7, 8}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(COLUMNS), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown(rows, args, notes, argv):
    lines = ["# luafcgid benchmark", "",
             "- date: %s" % datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z"),
             "- nproc: %d" % os.cpu_count(),
             "- command: `%s`" % " ".join(shlex.quote(a) for a in argv),
             "- duration per run: %gs, rounds: %d, wrk threads: %d" % (args.duration, args.rounds, args.threads),
             ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|")
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    lines.append("")
    lines.append("req/s: requests per second; p50/p99: latency percentiles from wrk; errors: non-2xx/3xx "
                 "responses + socket errors; RSS: resident memory of the backend's process tree after the run "
                 "(nginx itself for the nginx peers); luafcgid/peer: luafcgid's req/s divided by the peer's.")
    if notes:
        lines.append("")
        lines += ["- " + n for n in notes]
    return "\n".join(lines) + "\n"


def plot(results, order, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for peer, workload, conns in order:
        if (workload, conns) not in groups:
            groups.append((workload, conns))
    peers = [p for p in PEERS if any(k[0] == p for k in order)]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        xs, ys = [], []
        for g, (workload, conns) in enumerate(groups):
            r = results.get((peer, workload, conns))
            if r and "error" not in r:
                xs.append(g + (i - (len(peers) - 1) / 2.0) * width)
                ys.append(r["rps"])
        ax.bar(xs, ys, width, label=peer)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["%s\n%d conns" % g for g in groups])
    ax.set_ylabel("requests/s")
    ax.set_yscale("log")
    ax.set_title("luafcgid benchmark (nproc %d)" % os.cpu_count(), pad=28)
    ax.legend(ncol=len(peers), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
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
    p = argparse.ArgumentParser(description="luafcgid benchmark: luafcgid vs php-fpm, WSAPI and nginx, via wrk")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--smoke", action="store_true", help="quick check for CI: 1s runs, 16 connections only, no warm-up")
    p.add_argument("--peers", default=",".join(PEERS), help="comma list of peers (default all: %(default)s)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of workloads (default %(default)s)")
    p.add_argument("--connections", default="16,256", help="comma list of connection counts (default %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each run (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole alternation N times, report the median run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="wrk threads (default nproc)")
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
    args.workloads = split_list(args.workloads, WORKLOADS, "workloads")
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        raise SystemExit("--connections takes a comma list of integers")
    if args.duration <= 0 or args.duration > 600 or args.rounds < 1 or args.rounds > 20 or not args.connections:
        raise SystemExit("--duration must be in (0, 600], --rounds in [1, 20]")
    return args


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
    why = availability()
    peers = []
    for peer in args.peers:
        if why[peer]:
            log("skip %s: %s" % (peer, why[peer]))
            notes.append("%s skipped: %s" % (peer, why[peer]))
            failed.append(peer)
        else:
            peers.append(peer)

    tmp = tempfile.mkdtemp(prefix="luafcgid-bench-")
    os.chmod(tmp, 0o755)
    servers = []
    backends = {}
    results = {}
    runs = {}
    t0 = time.monotonic()
    try:
        for peer in list(peers):
            try:
                srv = start_backend(peer, tmp, servers, args.set)
            except BenchError as e:
                log("cannot start %s: %s" % (peer, e))
                notes.append("%s did not start: %s" % (peer, str(e).splitlines()[0]))
                failed.append(peer)
                peers.remove(peer)
                continue
            if srv:
                backends[peer] = srv
        ports = {p: free_port() for p in PEERS}
        try:
            nginx = start_nginx(tmp, ports, "nginx-lua" in peers, servers)
        except BenchError as e:
            if "nginx-lua" not in peers:
                raise
            # the Lua module may not load: drop that peer rather than every peer
            log("nginx with the Lua module failed, retrying without nginx-lua: %s" % e)
            notes.append("nginx-lua skipped: nginx did not start with the Lua module")
            failed.append("nginx-lua")
            peers.remove("nginx-lua")
            servers.pop().stop()
            nginx = start_nginx(tmp, ports, False, servers)
        backends["nginx"] = backends["nginx-lua"] = nginx

        # verify every (peer, workload) once before measuring anything
        plan = []
        for workload in args.workloads:
            for peer in peers:
                path = PATHS[peer].get(workload)
                if not path:
                    continue
                url = "http://127.0.0.1:%d%s" % (ports[peer], path)
                err = verify(peer, workload, url)
                if err:
                    log("%s %s fails verification: %s" % (peer, workload, err))
                    notes.append("%s/%s failed verification: %s" % (peer, workload, err))
                    failed.append("%s/%s" % (peer, workload))
                    for c in args.connections:
                        results[(peer, workload, c)] = {"error": err}
                    continue
                plan.append((peer, workload, url))

        order = []
        for workload in args.workloads:
            for conns in args.connections:
                for peer in peers:
                    if PATHS[peer].get(workload):
                        order.append((peer, workload, conns))
        total = len([k for k in order if k not in results]) * args.rounds
        log("%d runs of %gs (+%gs warm-up) each, peers in alternation" % (total, args.duration, args.warmup))
        done = 0
        for rnd in range(args.rounds):
            for workload in args.workloads:
                for conns in args.connections:
                    for peer, wl, url in plan:
                        if wl != workload:
                            continue
                        key = (peer, workload, conns)
                        done += 1
                        try:
                            if args.warmup > 0:
                                run_wrk(url, conns, args.warmup, workload, args.threads)
                            r = run_wrk(url, conns, args.duration, workload, args.threads)
                        except BenchError as e:
                            log("%s %s c=%d: %s" % (peer, workload, conns, e))
                            runs.setdefault(key, []).append({"error": str(e)})
                            continue
                        srv = backends.get(peer)
                        r["rss_mb"] = srv.rss() if srv else None
                        if srv and not srv.alive():  # noted, the next runs will show errors
                            log("%s died:\n%s" % (peer, srv.tail()))
                        runs.setdefault(key, []).append(r)
                        log("[%d/%d] %-9s %-7s c=%-3d %8.0f req/s  p50 %.2f ms  p99 %.2f ms  errors %d %s"
                            % (done, total, peer, workload, conns, r["rps"], r["p50_ms"], r["p99_ms"],
                               r["errors"], r["error_detail"] or ""))
        for key, lst in runs.items():
            good = sorted((r for r in lst if "error" not in r), key=lambda r: r["rps"])
            results[key] = good[len(good) // 2] if good else lst[-1]
            if not good:
                failed.append("%s/%s/%d" % key)
    finally:
        for srv in reversed(servers):  # nginx first, then the backends
            srv.stop()
        if args.keep:
            log("temporary directory kept: %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = table_rows(results, order)
    print()
    print(text_table(rows))
    for n in notes:
        print("note: " + n)
    print("(%d runs in %.0fs; duration %gs per run; nproc %d)" % (total, time.monotonic() - t0, args.duration,
                                                                   os.cpu_count()))
    if args.markdown:
        write(args.markdown, markdown(rows, args, notes, ["bench/run"] + argv))
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
