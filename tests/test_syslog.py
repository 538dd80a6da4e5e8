"""logfile: syslog sends the error log to the system logger, received here by a Unix datagram
socket the test listens on (syslog_address), as journald and rsyslog listen on /dev/log."""

import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import AS_ROOT, ROOT

LOCAL3 = 19
ERR, WARNING, INFO = 3, 4, 6


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log.sock"))
    sock.settimeout(10)
    yield sock
    sock.close()


def _until(receiver, pattern):
    """Datagrams received until one matches `pattern`: (that match, every line before)."""
    seen = []
    while True:
        try:
            line = receiver.recv(65536).decode()
        except socket.timeout:
            raise AssertionError(f"no line matching {pattern!r}; received {seen}") from None
        match = re.fullmatch(pattern, line)
        if match:
            return match, seen
        seen.append(line)


def test_the_log_goes_to_the_system_logger(daemon, site, receiver, tmp_path):
    d = daemon(logfile="syslog", syslog_address=str(tmp_path / "log.sock"),
               syslog_facility="local3", syslog_ident="lua-site", workers=2, states=2)
    pid = d.proc.pid
    started, _ = _until(receiver, r"<(\d+)>lua-site\[(\d+)\]: \[MainThread\] luafcgid serving "
                                  r"on .* with 2 workers.*")
    assert started.groups() == (str(LOCAL3 * 8 + INFO), str(pid))
    site.write("boom.lua", "function main(env, con) error('kaboom') end")
    from test_ops_status import run
    assert run(d.address, site, "boom.lua")[0].startswith("500")
    failed, _ = _until(receiver, r"<(\d+)>lua-site\[(\d+)\]: \[worker-\d\] Runtime Error in "
                                 r"(\S+): .*kaboom")
    assert failed.groups() == (str(LOCAL3 * 8 + ERR), str(pid), site.file("boom.lua"))
    assert not os.path.exists(os.path.join(d.workdir, "syslog"))   # not a file name
    d.stop()
    _until(receiver, rf"<{LOCAL3 * 8 + INFO}>lua-site\[{pid}\]: \[MainThread\] stopped")


def test_serving_processes_send_their_own_pid(daemon, receiver, tmp_path):
    d = daemon(logfile="syslog", syslog_address=str(tmp_path / "log.sock"), processes=2,
               workers=1, states=1)
    pids = set()
    for _ in range(2):
        match, _ = _until(receiver, r"<30>luafcgid\[(\d+)\]: \[MainThread\] luafcgid serving "
                                    r"on .* with 1 workers.*")
        pids.add(int(match.group(1)))
    assert len(pids) == 2 and d.proc.pid not in pids   # daemon (3) at info (6): <30>


def test_no_system_logger_there_is_a_clear_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: {tmp_path / 's.sock'}\nlogfile: syslog\n"
                      f"syslog_address: {tmp_path / 'nobody.sock'}\n")
    started = subprocess.run([sys.executable, "-m", "luafcgid", "-c", str(config), *AS_ROOT],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert started.returncode == 1
    assert f"cannot reach the system logger at {tmp_path / 'nobody.sock'}: No such file" \
        in started.stderr


def test_a_bad_facility_is_refused():
    from luafcgid import config
    with pytest.raises(config.ConfigError, match="syslog_facility: expected one of kern, user, mail, daemon, "):
        config.defaults(syslog_facility="local9")


def test_a_logger_that_goes_away_is_reported_once_and_taken_up_again(daemon, site, tmp_path):
    address = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(10)
    d = daemon(logfile="syslog", syslog_address=address)
    _until(receiver, r".*luafcgid serving on .*")
    receiver.close()
    os.unlink(address)   # the system logger stops
    site.write("boom.lua", "function main(env, con) error('kaboom') end")
    from test_ops_status import run
    for _ in range(3):
        assert run(d.address, site, "boom.lua")[0].startswith("500")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)   # and is back
    receiver.settimeout(10)
    try:
        assert run(d.address, site, "boom.lua")[0].startswith("500")
        _until(receiver, r".*Runtime Error in .*kaboom")
        d.stop()   # while the logger is there
    finally:
        receiver.close()
    output = d.output()
    assert output.count(f"cannot send the log to {address}") == 1
    assert f"sending the log to {address} again" in output
