"""Real parts for the tests: a luafcgid daemon process, a real nginx in front of it on
loopback, and clients (HTTP through nginx, libfcgi's cgi-fcgi, raw FastCGI records)."""

import errno
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
import yaml
from hypothesis import configuration as hypothesis_configuration

from luafcgid.request import fastcgi as fcgi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hypothesis keeps its example database and caches outside the checkout
hypothesis_configuration.set_hypothesis_home_dir(
    os.path.join(tempfile.gettempdir(), "luafcgid-tests-hypothesis"))


def skip_unless(available, reason):
    """Skip a test that needs something missing, visibly, with the reason. Under CI
    (CI=true), whose .ci/run installs everything the tests use, it fails instead: a skip
    there means an install step is missing."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; .ci/run should have installed it")
    pytest.skip(reason)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def can_connect(address):
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.connect(address)
            return True
        except OSError:
            return False


class Site:
    """A document root the test writes Lua scripts into."""

    def __init__(self, path):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)

    def write(self, name, code, mode="w"):
        target = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, mode) as stream:
            stream.write(textwrap.dedent(code) if isinstance(code, str) else code)
        return target

    def file(self, name):
        return os.path.join(self.path, name)


# The test suite runs as root (nginx and the other servers need it for their users) and
# its daemons serve pages from its temporary directories, which only root may read: they
# run pages as root on purpose, as luafcgid allows only with -R.
AS_ROOT = ["--allow-to-run-as-root"] if os.geteuid() == 0 else []


class Daemon:
    """`python -m luafcgid -c CONFIG` as a child process, run through `launcher` (a command
    prefix) if one is set."""

    launcher = ()

    def __init__(self, workdir, settings=(), args=()):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.settings = {"listen": os.path.join(self.workdir, "luafcgid.sock"),
                         "logfile": os.path.join(self.workdir, "luafcgid.log"),
                         "sweep": 100, **dict(settings)}
        self.config_path = os.path.join(self.workdir, "luafcgid.yaml")
        self.args = list(args)
        self.proc = None

    @property
    def address(self):
        listen = self.settings["listen"]
        if "/" in listen:
            return listen
        host, port = listen.rsplit(":", 1)
        return (host, int(port))

    def write_config(self, **changes):
        self.settings.update(changes)
        with open(self.config_path, "w") as stream:
            yaml.safe_dump(self.settings, stream)

    def start(self, wait=True):
        self.write_config()
        # standard output and error go to a file: a pipe nobody reads fills after 64 KiB
        # of log lines, and then every thread that logs blocks
        with open(self.output_path, "ab") as output:
            self.proc = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "luafcgid", "-c", self.config_path,
                 *AS_ROOT, *self.args], stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            wait_for(lambda: can_connect(self.address) or self.proc.poll() is not None,
                     what="luafcgid to listen")
            if self.proc.poll() is not None:
                raise AssertionError(f"luafcgid exited: {self.output()}")
        return self

    @property
    def output_path(self):
        return os.path.join(self.workdir, "output")

    def output(self):
        """What the daemon wrote to its standard output and error."""
        with open(self.output_path, encoding="utf-8", errors="replace") as stream:
            return stream.read()

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, timeout=15):
        """SIGTERM; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("luafcgid did not stop on SIGTERM")

    def log(self):
        try:
            with open(self.settings["logfile"], encoding="utf-8", errors="replace") as stream:
                return stream.read()
        except FileNotFoundError:
            return ""


def nginx_main_conf(directory, http_body):
    """A whole nginx.conf for a test: its pid, logs and temporary files under `directory`,
    `http_body` inside http { }."""
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""{user}
daemon off;
worker_processes 2;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    fastcgi_temp_path {directory}/fastcgi;
    proxy_temp_path {directory}/proxy;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    client_max_body_size 64m;
{http_body}
}}
"""


LUA_SERVER = """\
    {upstream}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ \\.lua$ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_pass {backend};
            {extra}
        }}
    }}"""


def stop_process(proc, signum, timeout=10):
    """Ask a server process to stop with `signum`; kill it if it has not within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signum)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def nginx_binary():
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if path is None:
        pytest.fail("nginx is not installed (.ci/run installs it: apt-get install -y nginx)")
    return path


class Nginx:
    """A real nginx on 127.0.0.1, passing *.lua under `root` to a FastCGI backend."""

    def __init__(self, workdir, root, backend, extra="", upstream=""):
        self.dir = str(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        if isinstance(backend, str) and "/" in backend and not backend.startswith("unix:"):
            backend = f"unix:{backend}"
        conf = nginx_main_conf(self.dir, LUA_SERVER.format(
            upstream=upstream, port=self.port, root=root, backend=backend, extra=extra))
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as stream:
            stream.write(conf)
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([nginx_binary(), "-c", self.conf, "-p", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: can_connect(("127.0.0.1", self.port)) or self.proc.poll() is not None,
                 what="nginx to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"nginx failed: {self.proc.stderr.read().decode()}")
        return self

    def stop(self):
        stop_process(self.proc, signal.SIGQUIT)

    def request(self, path, method="GET", body=None, headers=None, timeout=30):
        """(status, headers dict with lower-case names, body bytes) through nginx."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read())
        finally:
            conn.close()

    def get(self, path, **kwargs):
        return self.request(path, **kwargs)

    def error_log(self):
        with open(os.path.join(self.dir, "error.log"), errors="replace") as stream:
            return stream.read()


class Stack:
    """A site, a daemon serving it and nginx in front."""

    def __init__(self, tmp_path, settings=(), args=(), nginx_extra="", keepalive=0):
        """keepalive > 0 puts an upstream block with that many cached connections per
        nginx worker in front, with fastcgi_keep_conn on."""
        self.site = Site(tmp_path / "www")
        self.daemon = Daemon(tmp_path / "daemon", settings, args)
        backend, upstream = self.daemon.settings["listen"], ""
        if keepalive:
            upstream = (f"upstream luafcgid {{ server unix:{backend}; keepalive {keepalive}; }}")
            backend = "luafcgid"
            nginx_extra += " fastcgi_keep_conn on;"
        self.nginx = Nginx(tmp_path / "nginx", self.site.path, backend, extra=nginx_extra,
                           upstream=upstream)

    def start(self):
        self.daemon.start()
        self.nginx.start()
        return self

    def stop(self):
        self.nginx.stop()
        return self.daemon.stop()

    def write(self, name, code, mode="w"):
        return self.site.write(name, code, mode)

    def get(self, path, **kwargs):
        return self.nginx.request(path, **kwargs)


@pytest.fixture
def stack(tmp_path):
    """Factory: stack(**settings) starts a daemon with those settings behind nginx."""
    stacks = []

    def make(settings=None, args=(), nginx_extra="", keepalive=0, **kw):
        s = Stack(tmp_path / f"stack{len(stacks)}", {**(settings or {}), **kw}, args,
                  nginx_extra, keepalive)
        stacks.append(s)
        return s.start()

    yield make
    for s in stacks:
        s.stop()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory):
    """One daemon behind nginx for a whole module of tests that only add scripts. It shows
    errors on its 500 pages: its tests read there what failed."""
    s = Stack(tmp_path_factory.mktemp("shared"), {"showerrors": True}).start()
    yield s
    s.stop()


class Fifo:
    """Holds a page where it reads the FIFO, until release(): an event, not a delay."""

    def __init__(self, path):
        self.path = str(path)
        os.mkfifo(self.path)

    def release(self):
        """Let the page go on; False if no page was waiting (nothing to release)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:   # no reader
                return False
            raise
        os.write(fd, b"go")
        os.close(fd)
        return True


class InThread:
    """function(*args) running on a thread of its own; result() joins it."""

    def __init__(self, function, *args):
        self._outcome = {}
        self._thread = threading.Thread(target=self._run, args=(function, args))
        self._thread.start()

    def _run(self, function, args):
        try:
            self._outcome["value"] = function(*args)
        except BaseException as exc:   # re-raised by result()
            self._outcome["error"] = exc

    def done(self):
        return not self._thread.is_alive()

    def result(self, timeout=60):
        """The function's return value, or its exception raised here."""
        self._thread.join(timeout)
        assert self.done(), "the function did not finish"
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


# A page that marks itself in flight (a file "in-NAME", NAME its query string), waits at its
# FIFO "gate-NAME", then answers how many of the X-Requests requests of its batch it saw in
# flight.
GATED_PAGE = """
function main(env, con)
  local name = env.QUERY_STRING:match("^(.*)-%d+$")
  io.open("in-" .. env.QUERY_STRING, "w"):close()
  local gate = io.open("gate-" .. env.QUERY_STRING); gate:read("*a"); gate:close()
  local seen = 0
  for i = 1, tonumber(env.HTTP_X_REQUESTS) do
    if io.open("in-" .. name .. "-" .. i) then seen = seen + 1 end
  end
  con:puts(seen)
end
"""


def all_in_flight_at_once(s, page, count, batch="batch"):
    """`count` concurrent GETs of `page` (a GATED_PAGE in the site's root) through `s`'s
    nginx, each held in the page until every one of them is in it: fails (in 10 s) when they
    cannot all be in the page at once. Then each is let go and must answer that it saw all
    `count` in flight."""
    names = [f"{batch}-{n}" for n in range(1, count + 1)]
    gates = [Fifo(s.site.file(f"gate-{name}")) for name in names]
    requests = [InThread(lambda name=name: s.get(f"/{page}?{name}",
                                                 headers={"X-Requests": str(count)}))
                for name in names]

    def release_all():
        for gate in gates:
            gate.release()
        return all(r.done() for r in requests)

    try:
        wait_for(lambda: all(os.path.exists(s.site.file(f"in-{name}")) for name in names),
                 what=f"{count} requests in {page} at once")
    finally:
        # each let go as it arrives, also where they queue one after another
        wait_for(release_all, timeout=60, what="the requests to finish")
    for r in requests:
        status, _, body = r.result()
        assert (status, body) == (200, str(count).encode())


# -- FastCGI clients ---------------------------------------------------------------------

def libfcgi_request(address, params, body=b""):
    """One request through cgi-fcgi, the client of libfcgi (the FastCGI library the C
    original was built on): an implementation we did not write. flup6's client cannot
    serve here: on Python 3 it mixes str and bytes and fails on its first send.
    Returns (status line, {lower-case name: value}, body bytes)."""
    connect = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "REQUEST_METHOD": "GET",
           **params, "CONTENT_LENGTH": str(len(body))}
    result = subprocess.run(["cgi-fcgi", "-bind", "-connect", connect], input=body,
                            env=env, capture_output=True, timeout=30, check=True)
    status, headers, data = split_response(result.stdout)
    return status, headers, data


class RawClient:
    """FastCGI records by hand, for the protocol tests."""

    def __init__(self, address, timeout=10, source=None):
        """`source`: the loopback address to connect from (TCP)."""
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect(address)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    @staticmethod
    def request_bytes(params, body=b"", request_id=1, keep_conn=False):
        return (fcgi.begin_request(request_id, flags=fcgi.KEEP_CONN if keep_conn else 0)
                + fcgi.record(fcgi.PARAMS, request_id, fcgi.encode_params(params))
                + fcgi.record(fcgi.PARAMS, request_id)
                + fcgi.stream(fcgi.STDIN, request_id, body)
                + fcgi.record(fcgi.STDIN, request_id))

    def request(self, params, body=b"", request_id=1, keep_conn=False):
        self.send(self.request_bytes(params, body, request_id, keep_conn))

    def read_record(self):
        """(type, request_id, content) or None at EOF."""
        while len(self.buf) < fcgi.HEADER_LEN or len(self.buf) < self._total():
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        _, rtype, rid, length, padding = fcgi.HEADER.unpack_from(self.buf)
        content = self.buf[fcgi.HEADER_LEN:fcgi.HEADER_LEN + length]
        self.buf = self.buf[fcgi.HEADER_LEN + length + padding:]
        return rtype, rid, content

    def _total(self):
        _, _, _, length, padding = fcgi.HEADER.unpack_from(self.buf)
        return fcgi.HEADER_LEN + length + padding

    def response(self):
        """(stdout bytes, app_status, protocol_status) of the next request's response."""
        out = []
        while True:
            record = self.read_record()
            if record is None:
                raise AssertionError("connection closed before END_REQUEST")
            rtype, _, content = record
            if rtype == fcgi.STDOUT:
                out.append(content)
            elif rtype == fcgi.END_REQUEST:
                app_status, protocol_status = fcgi.END_BODY.unpack(content)
                return b"".join(out), app_status, protocol_status

    def closed(self):
        """True when the server closed the connection (reads EOF)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def split_response(data):
    """CGI response bytes to (status, {lower-case name: value}, body)."""
    head, _, body = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers.get("status", "200 OK"), headers, body


@pytest.fixture
def daemon(tmp_path):
    """Factory: daemon(**settings) starts a bare daemon (no nginx)."""
    started = []

    def make(settings=None, args=(), **kw):
        d = Daemon(tmp_path / f"daemon{len(started)}", {**(settings or {}), **kw}, args)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def open_dir():
    """A directory every user may read (pytest's tmp_path is root's alone), for a daemon
    that runs as another user (`user:`)."""
    path = tempfile.mkdtemp(prefix="luafcgid-ops-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def site(tmp_path):
    return Site(tmp_path / "www")
