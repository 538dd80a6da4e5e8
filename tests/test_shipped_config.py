"""The shipped etc/luafcgid.yaml behind Debian's nginx, as the README's "Behind nginx"
steps run it (issue 18): started as root, it serves a page to nginx's www-data workers and
runs it as the dedicated luafcgid user, not as root. Only its paths move into a temporary
directory: the socket and log directories (created as the steps create them) and roots."""

import grp
import http.client
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest
import yaml

from conftest import (ROOT, can_connect, free_port, nginx_binary, nginx_main_conf, skip_unless,
                      wait_for)

PAGE = """
function main(env, con)
  local status = io.open("/proc/self/status"):read("*a")
  con:puts("uid ", status:match("\\nUid:%s*(%d+)"), "\\n")
  con:puts("shadow ", tostring(io.open("/etc/shadow") ~= nil), "\\n")
end
"""


def _user(name):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _uid(pid):
    with open(f"/proc/{pid}/status") as stream:
        return next(int(line.split()[1]) for line in stream if line.startswith("Uid:"))


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stream:
                if int(stream.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.fixture
def install():
    """The README's install steps in a directory every user may traverse (pytest's tmp_path
    is root's alone): run/ and log/ owned by luafcgid, www/ with a page."""
    luafcgid = _user("luafcgid")
    skip_unless(luafcgid is not None, "no luafcgid user (INSTALL: adduser --system --group "
                                      "--no-create-home --home /nonexistent luafcgid)")
    base = tempfile.mkdtemp(prefix="luafcgid-shipped-")
    os.chmod(base, 0o755)
    for name in ("run", "log"):
        os.mkdir(os.path.join(base, name))
        os.chown(os.path.join(base, name), luafcgid.pw_uid, luafcgid.pw_gid)
    os.mkdir(os.path.join(base, "www"))
    with open(os.path.join(base, "www", "index.lua"), "w") as stream:
        stream.write(PAGE)
    yield base, luafcgid
    shutil.rmtree(base, ignore_errors=True)


def nginx_conf(base, socket_path, port):
    """nginx with Debian's user for its workers, the shipped upstream and the shipped
    location snippet."""
    with open(os.path.join(ROOT, "nginx", "luafcgid-upstream.conf")) as stream:
        upstream = stream.read().replace("/run/luafcgid/luafcgid.sock", socket_path)
    directory = os.path.join(base, "nginx")
    os.mkdir(directory)
    shutil.copy("/etc/nginx/fastcgi_params", directory)
    server = (f"server {{ listen 127.0.0.1:{port}; root {base}/www; "
              f"include {ROOT}/nginx/luafcgid.conf; }}")
    conf = nginx_main_conf(directory, upstream + "\n" + server).replace("user root;",
                                                                          "user www-data;")
    assert "user www-data;" in conf
    path = os.path.join(directory, "nginx.conf")
    with open(path, "w") as stream:
        stream.write(conf)
    return path, directory


@pytest.mark.skipif(os.geteuid() != 0, reason="the README starts luafcgid and nginx as root")
def test_the_shipped_config_serves_behind_debian_nginx_as_its_own_user(install):
    base, luafcgid = install
    with open(os.path.join(ROOT, "etc", "luafcgid.yaml")) as stream:
        shipped = yaml.safe_load(stream)
    socket_path = os.path.join(base, "run", "luafcgid.sock")
    config = os.path.join(base, "luafcgid.yaml")
    with open(config, "w") as stream:
        yaml.safe_dump({**shipped, "listen": socket_path,
                        "logfile": os.path.join(base, "log", "luafcgid.log"),
                        "roots": [os.path.join(base, "www")]}, stream)
    daemon = subprocess.Popen([sys.executable, "-m", "luafcgid", "-c", config], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    port = free_port()
    conf, prefix = nginx_conf(base, socket_path, port)
    nginx = None
    try:
        wait_for(lambda: can_connect(socket_path) or daemon.poll() is not None,
                 what="luafcgid to listen")
        assert daemon.poll() is None, daemon.stdout.read().decode()
        info = os.stat(socket_path)
        assert (stat.S_IMODE(info.st_mode), grp.getgrgid(info.st_gid).gr_name) == (0o660,
                                                                                  "www-data")
        nginx = subprocess.Popen([nginx_binary(), "-c", conf, "-p", prefix],
                                 stderr=subprocess.PIPE)
        wait_for(lambda: can_connect(("127.0.0.1", port)) or nginx.poll() is not None,
                 what="nginx to listen")
        assert nginx.poll() is None, nginx.stderr.read().decode()
        # the master listens before it starts its workers, which then drop root
        www_data = pwd.getpwnam("www-data").pw_uid
        wait_for(lambda: {_uid(pid) for pid in _children(nginx.pid)} == {www_data},
                 what="nginx's workers, running as www-data")

        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/index.lua")
        response = connection.getresponse()
        body = response.read().decode()
        connection.close()
        assert response.status == 200, (body, open(os.path.join(prefix, "error.log")).read())
        assert body == f"uid {luafcgid.pw_uid}\nshadow false\n"
    finally:
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            nginx.wait(15)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert not os.path.exists(socket_path)   # luafcgid could remove it from its directory
