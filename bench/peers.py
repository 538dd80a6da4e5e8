"""The peers luafcgid is measured against, how each is started, and the nginx in front of them.

FastCGI peers: luafcgid (this checkout, the shipped config), the floor (bench/floor.py), php-fpm,
the WSAPI FastCGI launcher (wsapi.fcgi under spawn-fcgi) and, when a built binary is given, the
C original. Each runs in two modes behind the same nginx lines: `plain`, a new connection per
request, and `keepalive`, an upstream block keeping connections open. Ceilings: nginx itself
(`return 200`) and nginx's embedded Lua (content_by_lua_block).
"""

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import yaml

from bench.common import BENCH, REPO, BenchError, fill, write
from bench.processes import Server, pidfile_roots, pids_running, wait_ready
from bench.workloads import BLOCKING, WORKLOADS

PEERS = ["luafcgid", "floor", "php-fpm", "wsapi", "c-original", "nginx", "nginx-lua"]
FASTCGI = ("luafcgid", "floor", "php-fpm", "wsapi", "c-original")
MODES = ["plain", "keepalive"]
C_ORIGINAL_ENV = "LUAFCGID_C_ORIGINAL"

# php-fpm children, wsapi.fcgi processes and the C original's libfcgi threads serve one
# connection at a time each; they get this many, the concurrency of luafcgid's shipped
# 2 processes x 2 workers. The floor gets luafcgid's processes, one thread each.
BLOCKING_WORKERS = 4

# URL path of each workload for each peer; a peer without an entry does not run the workload.
PATHS = {
    **{peer: {w: "/%s.lua" % w for w in WORKLOADS} for peer in ("floor", "wsapi", "c-original")},
    "luafcgid": {w: "/%s.lua" % w for w in WORKLOADS + BLOCKING},
    "php-fpm": {w: "/%s.php" % w for w in WORKLOADS + BLOCKING},
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
ROOTS = {"luafcgid": "www", "floor": "www", "php-fpm": "www", "wsapi": "wsapi", "c-original": "www"}
EXTENSIONS = {"luafcgid": "lua", "floor": "lua", "php-fpm": "php", "wsapi": "lua", "c-original": "lua"}

# The shipped config's settings naming files the daemon creates, pointed into the run's
# directory, and those naming who it runs as, cleared: the benchmark runs as whoever starts it.
CREATED_FILES = ("listen", "logfile", "pidfile", "access_log", "slowlog")
IDENTITY = ("user", "group", "listen_owner", "listen_group")


def label(peer, mode):
    return peer if mode is None else "%s %s" % (peer, mode)


def targets_of(peers, modes):
    """(peer, mode) pairs to measure: every FastCGI peer in every mode it supports, the
    ceilings once."""
    return [(peer, mode) for peer in peers for mode in (modes if peer in FASTCGI else [None])
            if (peer, mode) not in UNSUPPORTED]


# ---------------------------------------------------------------------------------------------
# what is installed


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
    cands = sorted(p for p in glob.glob("/usr/sbin/php-fpm*") + glob.glob("/usr/bin/php-fpm*")
                   if os.access(p, os.X_OK))
    return cands[-1] if cands else None


def wsapi_launcher():
    return shutil.which("wsapi.fcgi") or (os.path.exists("/usr/bin/wsapi.fcgi") and "/usr/bin/wsapi.fcgi")


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


@functools.lru_cache(maxsize=None)
def luafcgid_help():
    return subprocess.run([sys.executable, "-m", "luafcgid", "--help"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60, cwd="/", env=luafcgid_env()).stdout.decode()


def luafcgid_command(conf):
    """The daemon with `conf` (luafcgid_config, which sets no user: the benchmark runs as
    whoever starts it, and another user may not read the checkout's pages); as root with -R
    where this checkout's daemon has it, since such a daemon refuses to run pages as root
    without it."""
    cmd = [sys.executable, "-m", "luafcgid", "-c", conf]
    if os.geteuid() == 0 and "--allow-to-run-as-root" in luafcgid_help():
        cmd.append("-R")
    return cmd


def c_original_binary(args):
    return args.c_original or os.environ.get(C_ORIGINAL_ENV)


def availability(args):
    """Which peers can run on this machine: {peer: None or reason it cannot}."""
    why = {"luafcgid": luafcgid_available(),
           "floor": None if importlib.util.find_spec("lupa") else "lupa not installed",
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


# ---------------------------------------------------------------------------------------------
# configs


def shipped_settings(overrides=()):
    """The shipped etc/luafcgid.yaml's settings, with those given by --set."""
    with open(os.path.join(REPO, "etc", "luafcgid.yaml")) as f:
        return {**yaml.safe_load(f), **dict(overrides)}


def luafcgid_config(directory, settings):
    """`settings` (shipped_settings) written for a run in `directory`: the files the daemon
    creates in it, the benchmark's pages as its root, no user to switch to."""
    run = {name: os.path.join(directory, os.path.basename(settings[name]))
           for name in CREATED_FILES if settings.get(name)}
    run.setdefault("listen", os.path.join(directory, "luafcgid.sock"))
    run.update({name: None for name in IDENTITY}, roots=[os.path.join(BENCH, "www")])
    path = write(os.path.join(directory, "luafcgid.yaml"),
                 "# generated by bench/ from etc/luafcgid.yaml\n"
                 + yaml.safe_dump({**settings, **run}, default_flow_style=False, sort_keys=False))
    return path, run["listen"]


def shipped_upstream_lines():
    """The keep-alive lines of the shipped upstream block (nginx/luafcgid-upstream.conf, for
    nginx's conf.d/), so that the benchmark measures what users get."""
    with open(os.path.join(REPO, "nginx", "luafcgid-upstream.conf")) as f:
        text = f.read()
    block = re.search(r"upstream\s+luafcgid\s*\{(.*?)\n\}", text, re.S).group(1)
    lines = re.findall(r"^\s*(keepalive(?:_\w+)?\s+[^;]+;)", block, re.M)
    if not any(line.startswith("keepalive ") for line in lines):
        raise BenchError("no `keepalive N;` in nginx/luafcgid-upstream.conf's upstream block")
    return lines


def keepalive_lines(backend):
    """A peer's upstream keep-alive lines: luafcgid's as shipped (it parks idle connections, so
    nginx may keep many); a peer serving one connection per worker keeps no more connections
    than it has workers, with the shipped keepalive_timeout."""
    lines = shipped_upstream_lines()
    if backend.workers is None:
        return lines
    return ["keepalive %d;" % backend.workers] + [line for line in lines if not line.startswith("keepalive ")]


C_ORIGINAL_CONFIG = """\
-- generated by bench/: the C original with the concurrency of the other peers
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


# ---------------------------------------------------------------------------------------------
# starting them


class Backend:
    """A started FastCGI peer: its process tree, its socket, and how many connections it
    serves at once when it serves one per worker (None: it parks idle connections)."""

    def __init__(self, server, socket, workers=None):
        self.server, self.socket, self.workers = server, socket, workers


def start_backend(peer, mode, tmp, servers, args, settings):
    """Start one FastCGI peer (its own instance per mode, so that connections kept by one mode
    never hold the other's workers), appended to `servers` at once so that it is always
    stopped; returns its Backend."""
    name = label(peer, mode)
    directory = os.path.join(tmp, "%s-%s" % (peer, mode))
    os.makedirs(directory)
    workers = BLOCKING_WORKERS
    if peer == "luafcgid":
        conf, sock = luafcgid_config(directory, settings)
        server = Server(name, luafcgid_command(conf), tmp, env=luafcgid_env(), cwd=directory)
        workers = None
    elif peer == "floor":
        sock = os.path.join(directory, "floor.sock")
        workers = settings["processes"]
        server = Server(name, [sys.executable, os.path.join(BENCH, "floor.py"), sock, str(workers)], tmp)
    elif peer == "php-fpm":
        sock = os.path.join(directory, "php-fpm.sock")
        conf = write(os.path.join(directory, "php-fpm.conf"),
                     fill(os.path.join(BENCH, "conf", "php-fpm.conf.in"),
                          {"TMP": directory, "CHILDREN": workers}))
        cmd = [find_php_fpm(), "--nodaemonize", "--fpm-config", conf, "--prefix", directory]
        if os.geteuid() == 0:
            cmd.append("--allow-to-run-as-root")
        server = Server(name, cmd, tmp)
    elif peer == "wsapi":
        sock = os.path.join(directory, "wsapi.sock")
        pidfile = os.path.join(directory, "wsapi.pid")
        cmd = ["spawn-fcgi", "-s", sock, "-M", "0666", "-F", str(workers), "-b", "1024",
               "-P", pidfile, "--", wsapi_launcher()]
        server = Server(name, cmd, tmp, cwd=os.path.join(BENCH, "wsapi"), roots=pidfile_roots(pidfile))
    else:   # c-original: it daemonizes (leaves our session), so it is found by its command line
        sock = os.path.join(directory, "luafcgid-c.sock")
        conf = write(os.path.join(directory, "config.lua"), C_ORIGINAL_CONFIG.format(
            listen=sock, workers=workers, logfile=os.path.join(directory, "luafcgid-c.log")))
        cmd = [os.path.abspath(c_original_binary(args)), conf]
        server = Server(name, cmd, tmp, cwd=directory, roots=lambda: pids_running(cmd))
    servers.append(server)
    wait_ready(server, [sock])
    return Backend(server, sock, workers)


def fastcgi_server(port, peer, mode, backend):
    """The nginx lines for one (peer, mode): identical for every peer but the root, the
    extension and, in keepalive mode, the upstream's keep-alive count."""
    name = "%s_%s" % (peer.replace("-", "_"), mode)
    root = os.path.join(BENCH, ROOTS[peer])
    lines = []
    if mode == "keepalive":
        lines.append("    upstream %s {\n        server unix:%s;\n%s\n    }"
                     % (name, backend.socket, "\n".join("        " + line for line in keepalive_lines(backend))))
        passing = "fastcgi_keep_conn on;\n            fastcgi_pass %s;" % name
    else:
        passing = "fastcgi_pass unix:%s;" % backend.socket
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


def start_nginx(tmp, ports, backends, with_lua, servers, workers):
    """One nginx in front of every started FastCGI peer (`backends`: {(peer, mode): Backend}),
    one port each, and the two ceilings."""
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    if not os.path.exists("/etc/nginx/fastcgi_params"):
        raise BenchError("/etc/nginx/fastcgi_params not found")
    blocks = [fastcgi_server(ports[(peer, mode)], peer, mode, backend)
              for (peer, mode), backend in backends.items()]
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
    waited = [p for key, p in ports.items() if key in backends or key == ("nginx", None)
              or (key == ("nginx-lua", None) and with_lua)]
    wait_ready(server, [("127.0.0.1", p) for p in waited])
    return server
