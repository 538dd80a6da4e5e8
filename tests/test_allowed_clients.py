"""allowed_clients (issue 18): a TCP listener serves only the peers it lists; others are
closed at accept and logged once a minute per address, and a listener on an address other
than loopback does not start without it. Tests only ever listen on loopback: the refusal of
0.0.0.0 is shown by --check and by a start that refuses before binding."""

import logging
import socket
import subprocess
import sys

import pytest

from conftest import AS_ROOT, ROOT, Daemon, RawClient, free_port, split_response
from luafcgid.request.clients import AllowedClients, admission

REFUSED = "127.0.0.1: not in allowed_clients; connection closed"


def fetch(address, script, source=None):
    """The body a request gets, from `source` (an address on loopback), or None when the
    connection is closed without an answer."""
    client = RawClient(address, source=source)
    try:
        client.request({b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET"})
        return split_response(client.response()[0])[2]
    except (AssertionError, ConnectionError):   # closed before END_REQUEST
        return None
    finally:
        client.close()


def test_only_allowed_clients_are_served_and_a_refusal_is_logged_once(daemon, site):
    site.write("hi.lua", "function main(env, con) con:puts('hi') end")
    d = daemon(listen=f"127.0.0.1:{free_port()}", allowed_clients=["127.0.0.2", "10.0.0.0/8"])
    assert fetch(d.address, site.file("hi.lua"), source="127.0.0.2") == b"hi"
    assert fetch(d.address, site.file("hi.lua")) is None   # from 127.0.0.1
    assert fetch(d.address, site.file("hi.lua")) is None
    assert d.log().count(REFUSED) == 1
    assert fetch(d.address, site.file("hi.lua"), source="127.0.0.2") == b"hi"


def check(tmp_path, **settings):
    d = Daemon(tmp_path, settings)
    d.write_config()
    return subprocess.run([sys.executable, "-m", "luafcgid", "-c", d.config_path, "--check",
                           *AS_ROOT], capture_output=True, text=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("listen", ["0.0.0.0:9000", ":9000", "[::]:9000"])
def test_every_interface_without_allowed_clients_is_refused(tmp_path, listen):
    result = check(tmp_path, listen=listen)
    assert result.returncode == 2
    assert "is not loopback, and allowed_clients is not set" in result.stderr
    # and the start refuses the same, before binding anything
    d = Daemon(tmp_path, {"listen": listen})
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "allowed_clients is not set" in d.output()


def test_allowed_clients_any_or_a_list_passes_check(tmp_path):
    assert check(tmp_path, listen="0.0.0.0:9000", allowed_clients="any").returncode == 0
    assert check(tmp_path, listen="0.0.0.0:9000", allowed_clients=["10.0.0.5"]).returncode == 0
    assert check(tmp_path, listen="127.0.0.1:9000").returncode == 0   # loopback needs none


# The policy object alone, with its clock in the test's hands

def test_the_policy_admits_networks_and_mapped_addresses_and_logs_once_a_minute(caplog):
    now = [1000.0]
    admit = AllowedClients(["192.0.2.0/24", "2001:db8::1"], clock=lambda: now[0])
    assert admit(("192.0.2.7", 5000)) and admit(("::ffff:192.0.2.7", 5000, 0, 0))
    assert admit(("2001:db8::1", 5000, 0, 0))
    with caplog.at_level(logging.WARNING, logger="luafcgid"):
        assert not admit(("198.51.100.1", 5000))
        now[0] += 59
        assert not admit(("198.51.100.1", 5001))
        assert not admit(("198.51.100.2", 5000))
        now[0] += 2
        assert not admit(("198.51.100.1", 5002))
    refused = [r.getMessage().split(":")[0] for r in caplog.records]
    assert refused == ["198.51.100.1", "198.51.100.2", "198.51.100.1"]


def test_a_unix_socket_has_no_policy_to_pay_for(tmp_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.sock"))
        assert admission(["192.0.2.1"], sock) is None
