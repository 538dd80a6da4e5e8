"""What --check and the start refuse before anything starts (issue 18): pages as root, users
and groups that do not exist, missing directories (none is created), TCP on every
interface; and the sample config says which of its values are examples."""

import os
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, can_connect, libfcgi_request, wait_for

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root checks need root")


def luafcgid(tmp_path, settings, *args):
    """Run `luafcgid -c CONFIG ARGS` (without -R) to its end."""
    config = tmp_path / "luafcgid.yaml"
    config.write_text(yaml.safe_dump({"listen": str(tmp_path / "l.sock"),
                                      "logfile": str(tmp_path / "l.log"), **settings}))
    return subprocess.run([sys.executable, "-m", "luafcgid", "-c", str(config), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


@as_root
def test_root_without_user_is_refused_unless_allowed(tmp_path):
    for args in ((), ("--check",)):
        result = luafcgid(tmp_path, {}, *args)
        assert result.returncode == 2, result.stderr
        assert "user: not set, and luafcgid was started as root: every page would run as " \
               "root" in result.stderr
        assert "-R (--allow-to-run-as-root)" in result.stderr
    assert not os.path.exists(tmp_path / "l.sock")
    assert luafcgid(tmp_path, {}, "--check", "-R").returncode == 0
    assert luafcgid(tmp_path, {"user": "nobody"}, "--check").returncode == 0


@as_root
def test_check_and_start_name_every_problem(tmp_path):
    missing = tmp_path / "missing"
    settings = {"user": "nobody", "group": "no-such-group-luafcgid",
                "listen": str(missing / "sock" / "l.sock"),
                "listen_group": "no-such-group-luafcgid",
                "logfile": str(missing / "log" / "l.log"),
                "access_log": str(missing / "access" / "a.log"),
                "slowlog": str(missing / "slow" / "s.log"),
                "pidfile": str(missing / "run" / "l.pid"),
                "roots": [str(missing / "www")]}
    expected = ["group: no such group 'no-such-group-luafcgid'",
                "listen_group: no such group 'no-such-group-luafcgid'",
                f"listen: the directory {missing}/sock does not exist",
                f"logfile: the directory {missing}/log does not exist",
                f"access_log: the directory {missing}/access does not exist",
                f"slowlog: the directory {missing}/slow does not exist",
                f"pidfile: the directory {missing}/run does not exist",
                f"roots: no such directory: {missing}/www"]
    for args in (("--check",), ()):
        result = luafcgid(tmp_path, settings, *args)
        assert result.returncode == 2
        for problem in expected:
            assert problem in result.stderr, (problem, result.stderr)
    assert not missing.exists()   # the start created no directory
    result = luafcgid(tmp_path, {"user": "no-such-user-luafcgid"}, "--check")
    assert result.returncode == 2
    assert "user: no such user 'no-such-user-luafcgid'" in result.stderr


def test_a_missing_socket_directory_is_an_error_not_created(tmp_path):
    settings = {"listen": str(tmp_path / "nonexistent" / "a"),
                "user": "nobody" if os.geteuid() == 0 else None}
    for args in (("--check",), ()):
        result = luafcgid(tmp_path, settings, *args)
        assert result.returncode == 2
        assert f"listen: the directory {tmp_path}/nonexistent does not exist" in result.stderr
    assert not (tmp_path / "nonexistent").exists()
    assert not can_connect(str(tmp_path / "nonexistent" / "a"))


def test_the_sample_config_marks_its_examples():
    with open(os.path.join(ROOT, "etc", "luafcgid.yaml")) as stream:
        lines = stream.read().splitlines()
    assert not any("every setting is listed with its default." in line for line in lines)
    for name, default in (("workers", 3), ("processes", 1), ("roots", "[]"), ("user", "null")):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        assert lines[at - 1] == f"# example; the default is {default}", name
    # a value shown as itself is the default: no example line before it
    at = next(i for i, line in enumerate(lines) if line.startswith("states: "))
    assert not lines[at - 1].startswith("# example")


def test_a_reload_is_refused_for_what_the_start_would_refuse(daemon, site, tmp_path):
    site.write("hi.lua", "function main(env, con) con:puts('hi') end")
    d = daemon(roots=[site.path])
    d.write_config(roots=[str(tmp_path / "no-such-root")])
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in d.log(), what="the refused reload")
    assert f"roots: no such directory: {tmp_path}/no-such-root" in d.log()
    status, _, body = libfcgi_request(d.address, {"SCRIPT_FILENAME": site.file("hi.lua")})
    assert (status, body) == ("200 OK", b"hi")   # still serving with the running config
