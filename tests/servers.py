"""Web servers in front of luafcgid, each started from its Debian package on loopback with
the configuration luafcgid ships for it (examples/servers/, nginx/): the shipped file with
its socket, document root and port replaced by the test's, wrapped in a minimal main config
whose pid, log and state files live in the test's directory."""

import contextlib
import grp
import http.client
import os
import pwd
import shutil
import signal
import subprocess
import tempfile

import pytest
import yaml

from conftest import (ROOT, Daemon, Site, can_connect, free_port, nginx_main_conf,
                      skip_unless, stop_process, wait_for)

EXAMPLES = os.path.join(ROOT, "examples", "servers")
NGINX_FILES = os.path.join(ROOT, "nginx")

# What the shipped files name, replaced by the test's own paths.
SHIPPED_SOCKET = "/run/luafcgid/luafcgid.sock"
SHIPPED_ROOT = "/srv/www"

AS_ROOT = os.geteuid() == 0


def shipped(directory, name, socket, root):
    with open(os.path.join(directory, name)) as stream:
        return stream.read().replace(SHIPPED_SOCKET, socket).replace(SHIPPED_ROOT, root)


class WebServer:
    """One server process; a subclass writes its config and names its command."""

    name = binary = package = None
    # The user Debian's package runs it as: started as root, the server drops to this user,
    # which must reach the socket and the pages (None: it stays root).
    user = None
    stop_signal = signal.SIGTERM

    def __init__(self, workdir, root, socket):
        self.dir = str(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.root, self.socket = root, socket
        self.port = free_port()
        self.proc = None

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, text):
        with open(self.path(name), "w") as stream:
            stream.write(text)
        return self.path(name)

    @classmethod
    def executable(cls):
        path = shutil.which(cls.binary, path="/usr/sbin:/usr/bin:/sbin:/bin")
        skip_unless(path is not None, f"{cls.name} is not installed (Debian package "
                    f"{cls.package}; .ci/run installs it from .ci/packages-servers.txt)")
        return path

    def command(self, executable):
        raise NotImplementedError

    def environment(self):
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.dir}

    def start(self):
        argv = self.command(self.executable())
        with open(self.path("server.out"), "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.environment(), cwd=self.dir)
        wait_for(lambda: can_connect(("127.0.0.1", self.port)) or self.proc.poll() is not None,
                 what=f"{self.name} to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")
        return self

    def stop(self):
        stop_process(self.proc, self.stop_signal)

    def output(self):
        """What the server wrote to its console and its error log."""
        text = ""
        for name in ("server.out", "error.log"):
            if os.path.exists(self.path(name)):
                with open(self.path(name), errors="replace") as stream:
                    text += stream.read()
        return text

    def connection(self, timeout=30):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, path, method="GET", body=None, headers=None, encode_chunked=False):
        """(status, [(name, value), ...] in order with repeats, body bytes)."""
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {},
                         encode_chunked=encode_chunked)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()


class Nginx(WebServer):
    """nginx/luafcgid-upstream.conf in the http context, nginx/luafcgid.conf in a server."""

    name, binary, package = "nginx", "nginx", "nginx"
    stop_signal = signal.SIGQUIT

    def __init__(self, workdir, root, socket, locations=""):
        """`locations`: more of the server block, beside the shipped snippet's."""
        super().__init__(workdir, root, socket)
        self.locations = locations

    def command(self, executable):
        # the snippet's `include fastcgi_params` is relative to nginx.conf's directory
        shutil.copy("/etc/nginx/fastcgi_params", self.dir)
        upstream = self.write("luafcgid-upstream.conf", shipped(
            NGINX_FILES, "luafcgid-upstream.conf", self.socket, self.root))
        snippet = self.write("luafcgid.conf", shipped(
            NGINX_FILES, "luafcgid.conf", self.socket, self.root))
        conf = self.write("nginx.conf", nginx_main_conf(self.dir, f"""
    include {upstream};
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
        include {snippet};
        {self.locations}
    }}"""))
        return [executable, "-c", conf, "-p", self.dir]


class Lighttpd(WebServer):
    """examples/servers/lighttpd.conf, with the modules in Debian's order: mod_fastcgi
    (10-fastcgi.conf) before mod_staticfile, which lighttpd.conf loads last."""

    name, binary, package, user = "lighttpd", "lighttpd", "lighttpd", "www-data"

    def command(self, executable):
        example = self.write("luafcgid.conf", shipped(EXAMPLES, "lighttpd.conf", self.socket,
                                                      self.root))
        user = f'server.username = "{self.user}"\nserver.groupname = "{self.user}"' \
            if AS_ROOT else ""
        conf = self.write("lighttpd.conf", f"""
server.modules = ( "mod_access", "mod_fastcgi" )
server.document-root = "{self.root}"
server.bind = "127.0.0.1"
server.port = {self.port}
server.pid-file = "{self.path('lighttpd.pid')}"
server.errorlog = "{self.path('error.log')}"
server.upload-dirs = ( "{self.dir}" )
{user}
include "{example}"
server.modules += ( "mod_staticfile" )
""")
        return [executable, "-D", "-f", conf]


class Apache(WebServer):
    """examples/servers/apache2.conf in a main config that loads the event MPM, mod_proxy
    and mod_proxy_fcgi, as Debian's a2enmod proxy_fcgi does."""

    name, binary, package, user = "Apache httpd", "apache2", "apache2", "www-data"
    MODULES = "/usr/lib/apache2/modules"

    def command(self, executable):
        example = self.write("luafcgid.conf", shipped(EXAMPLES, "apache2.conf", self.socket,
                                                      self.root))
        modules = "\n".join(f"LoadModule {name}_module {self.MODULES}/mod_{name}.so"
                            for name in ("mpm_event", "authz_core", "proxy", "proxy_fcgi"))
        user = f"User {self.user}\nGroup {self.user}" if AS_ROOT else ""
        conf = self.write("apache2.conf", f"""
ServerRoot "{self.dir}"
ServerName 127.0.0.1
Listen 127.0.0.1:{self.port}
PidFile "{self.path('apache2.pid')}"
DefaultRuntimeDir "{self.dir}"
Mutex file:{self.dir} default
ErrorLog "{self.path('error.log')}"
LogLevel warn
{modules}
{user}
DocumentRoot "{self.root}"
<Directory "{self.root}">
    Require all granted
</Directory>
Include "{example}"
""")
        return [executable, "-f", conf, "-DFOREGROUND"]


class Caddy(WebServer):
    """examples/servers/Caddyfile for http://127.0.0.1:PORT, without Caddy's admin endpoint,
    with its data and config directories in the test's."""

    name, binary, package = "Caddy", "caddy", "caddy"

    def command(self, executable):
        site = shipped(EXAMPLES, "Caddyfile", self.socket, self.root)
        assert "\n:80 {" in site
        conf = self.write("Caddyfile", "{\n\tadmin off\n}\n"
                          + site.replace("\n:80 {", f"\nhttp://127.0.0.1:{self.port} {{"))
        return [executable, "run", "--adapter", "caddyfile", "--config", conf]

    def environment(self):
        return {**super().environment(), "XDG_DATA_HOME": self.path("data"),
                "XDG_CONFIG_HOME": self.path("config")}


class H2O(WebServer):
    """examples/servers/h2o.conf with its listen port, pid file and error log moved."""

    name, binary, package, user = "h2o", "h2o", "h2o", "debian-h2o"

    def command(self, executable):
        conf = yaml.safe_load(shipped(EXAMPLES, "h2o.conf", self.socket, self.root))
        conf.update({"listen": {"host": "127.0.0.1", "port": self.port},
                     "pid-file": self.path("h2o.pid"), "error-log": self.path("error.log")})
        if not AS_ROOT:
            del conf["user"]
        with open(self.path("h2o.conf"), "w") as stream:
            yaml.safe_dump(conf, stream)
        return [executable, "-c", self.path("h2o.conf")]


SERVERS = (Nginx, Lighttpd, Apache, Caddy, H2O)


def group_of(user):
    try:
        return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    except KeyError:
        skip_unless(False, f"user {user} does not exist (created by the server's Debian package)")


class ServerStack:
    """A luafcgid daemon behind one of SERVERS. As root, the server drops to its Debian user,
    so the pages and the socket sit in a directory every user may traverse, and the daemon
    gives the socket that user's group (listen_group), as a production setup would."""

    def __init__(self, server_class, base, settings=(), **options):
        self.base = base
        os.chmod(base, 0o755)
        self.site = Site(os.path.join(base, "www"))
        socket = os.path.join(base, "luafcgid.sock")
        settings = {"listen": socket, **dict(settings)}
        if AS_ROOT and server_class.user:
            settings["listen_group"] = group_of(server_class.user)
        self.daemon = Daemon(os.path.join(base, "daemon"), settings)
        self.server = server_class(os.path.join(base, "server"), self.site.path, socket,
                                   **options)
        if AS_ROOT and server_class.user:   # its logs and pid file, written as that user
            account = pwd.getpwnam(server_class.user)
            os.chown(self.server.dir, account.pw_uid, account.pw_gid)

    def start(self):
        self.server.executable()   # skips before anything starts when it is missing
        self.daemon.start()
        self.server.start()
        return self

    def stop(self):
        self.server.stop()
        self.daemon.stop()

    def write(self, name, code):
        return self.site.write(name, code)


@contextlib.contextmanager
def started(server_class, settings=(), **options):
    """A ServerStack, started; stopped and removed on leaving."""
    # not under pytest's base directory, which is private to its user
    base = tempfile.mkdtemp(prefix=f"luafcgid-{server_class.binary}-")
    s = ServerStack(server_class, base, settings, **options)
    try:
        yield s.start()
    finally:
        s.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def server_stack():
    """Factory: server_stack(ServerClass, settings) starts a daemon behind that server."""
    with contextlib.ExitStack() as stacks:
        yield lambda *args, **options: stacks.enter_context(started(*args, **options))
