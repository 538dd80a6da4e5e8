"""Running luafcgid as a service: systemd's notify protocol and socket activation, the
listening socket's mode, dropping root, the pidfile, --daemon, and the signals."""

import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import AS_ROOT, ROOT, Daemon, RawClient, Site, split_response, wait_for
from test_processes import _children

LAUNCH = """\
import os, sys
os.dup2(int(sys.argv[1]), 3)              # the passed socket is fd 3 (SD_LISTEN_FDS_START)
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid, so it matches
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.executable, [sys.executable, "-m", "luafcgid", *sys.argv[2:]])
"""


class Notifications:
    """A NOTIFY_SOCKET the test owns: the datagrams luafcgid sends, as field dicts."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(15)
        self.address = address

    def next(self):
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def wait(self, field):
        while True:
            message = self.next()
            if field in message:
                return message


def request(address, script, **params):
    client = RawClient(address)
    try:
        client.request({b"SCRIPT_FILENAME": script.encode(),
                        **{k.encode(): v.encode() for k, v in params.items()}})
        return split_response(client.response()[0])
    finally:
        client.close()


@pytest.fixture
def activated(tmp_path):
    """Start luafcgid the way systemd does with luafcgid.socket: a socket bound by the
    test passed as fd 3, and a NOTIFY_SOCKET to read."""
    started = []

    def start(notify_address, env=(), **settings):
        path = str(tmp_path / "systemd.sock")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(path)
        listening.listen(16)
        notifications = Notifications(notify_address)
        config = tmp_path / "luafcgid.yaml"
        config.write_text(yaml.safe_dump({"listen": str(tmp_path / "not-bound.sock"),
                                          "logfile": str(tmp_path / "luafcgid.log"),
                                          **settings}))
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(listening.fileno()), "-c", str(config),
             *AS_ROOT],
            pass_fds=(listening.fileno(),), cwd=ROOT,
            env={**os.environ, "NOTIFY_SOCKET": notify_address, **dict(env)})
        started.append((proc, listening, notifications))
        return proc, path, notifications

    yield start
    for proc, listening, notifications in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listening.close()
        notifications.sock.close()


def test_socket_activation_and_the_notify_protocol(activated, tmp_path, site):
    proc, path, notifications = activated(str(tmp_path / "notify.sock"))
    ready = notifications.wait("READY")
    assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
    assert ready["STATUS"].startswith("serving on the socket systemd passed")
    site.write("hi.lua", "function main(env, con) con:puts('hi') end")
    assert request(path, site.file("hi.lua"))[2] == b"hi"
    assert not os.path.exists(tmp_path / "not-bound.sock")   # `listen` is not bound

    proc.send_signal(signal.SIGHUP)
    reloading = notifications.wait("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert notifications.wait("READY")["STATUS"].endswith("workers busy")
    assert request(path, site.file("hi.lua"))[2] == b"hi"

    proc.send_signal(signal.SIGTERM)
    assert notifications.wait("STOPPING")["STOPPING"] == "1"
    assert proc.wait(15) == 0
    # the socket is systemd's: still there and still listening after luafcgid is gone
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)


def test_a_supervisor_serves_a_passed_socket_and_removes_no_socket_file(activated, tmp_path,
                                                                         site):
    # `listen` names another process's socket: with a passed socket it is not ours to remove
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(tmp_path / "not-bound.sock"))
    proc, path, notifications = activated(str(tmp_path / "notify.sock"), processes=2)
    assert notifications.wait("READY")["READY"] == "1"
    site.write("hi.lua", "function main(env, con) con:puts('hi') end")
    assert request(path, site.file("hi.lua"))[2] == b"hi"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)
    assert os.path.exists(tmp_path / "not-bound.sock")
    other.close()


def test_watchdog_pings_on_an_abstract_notify_socket(activated, tmp_path):
    address = f"@luafcgid-test-{os.getpid()}-{time.monotonic_ns()}"
    proc, _, notifications = activated(address, env={"WATCHDOG_USEC": "200000"})
    notifications.wait("READY")
    pings = [notifications.wait("WATCHDOG") for _ in range(3)]
    assert all(p["WATCHDOG"] == "1" and "requests" in p["STATUS"] for p in pings)


def test_listen_mode(daemon):
    d = daemon(listen_mode="0600")
    assert stat.S_IMODE(os.stat(d.address).st_mode) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the socket to another group needs root")
def test_listen_group(daemon):
    e = daemon(listen_mode="0660", listen_group="nogroup")
    st = os.stat(e.address)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == __import__("grp").getgrnam("nogroup").gr_gid


def _uid_of(pid):
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_root_drops_to_user_after_binding(open_dir):
    nobody = pwd.getpwnam("nobody")
    run = os.path.join(open_dir, "run")
    os.mkdir(run)
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    site = Site(os.path.join(open_dir, "www"))
    site.write("who.lua", "function main(env, con) con:puts('served') end")
    os.chmod(site.path, 0o755)
    d = Daemon(run, {"user": "nobody", "group": "nogroup",
                     "pidfile": os.path.join(run, "luafcgid.pid"),
                     "access_log": os.path.join(run, "access.log")}).start()
    try:
        wait_for(lambda: "running as nobody" in d.log(), what="the privilege drop")
        assert _uid_of(d.proc.pid) == [nobody.pw_uid] * 4
        assert request(d.address, site.file("who.lua"))[2] == b"served"
        pidfile = d.settings["pidfile"]
        with open(pidfile) as stream:
            assert stream.read() == f"{d.proc.pid}\n"
        assert os.stat(pidfile).st_uid == nobody.pw_uid
        for log in ("luafcgid.log", "access.log"):
            assert os.stat(os.path.join(run, log)).st_uid == nobody.pw_uid
        # as nobody, SIGUSR1 still reopens the logs
        os.rename(d.settings["logfile"], d.settings["logfile"] + ".1")
        d.signal(signal.SIGUSR1)
        wait_for(lambda: "log files reopened" in d.log(), what="the reopened log")
    finally:
        assert d.stop() == 0
    assert not os.path.exists(d.settings["pidfile"])
    assert not os.path.exists(d.address)


def test_pidfile_is_written_and_removed(daemon, tmp_path):
    (tmp_path / "run").mkdir()   # as the rc.d script does: luafcgid creates no directory
    pidfile = str(tmp_path / "run" / "luafcgid.pid")
    d = daemon(pidfile=pidfile)
    # the socket listens a moment before the pidfile is written
    wait_for(lambda: os.path.exists(pidfile), what="the pidfile")
    with open(pidfile) as stream:
        assert int(stream.read()) == d.proc.pid
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith(".tmp")]
    assert d.stop() == 0
    assert not os.path.exists(pidfile)


def test_daemon_mode_detaches_and_writes_its_pid(tmp_path, site):
    d = Daemon(tmp_path / "d", {"pidfile": str(tmp_path / "d" / "luafcgid.pid")},
               args=["--daemon"])
    d.start(wait=False)
    assert d.proc.wait(15) == 0   # the launching process returns at once
    pidfile = d.settings["pidfile"]
    wait_for(lambda: os.path.exists(pidfile) and os.path.exists(d.address),
             what="the detached daemon")
    with open(pidfile) as stream:
        pid = int(stream.read())
    assert pid != d.proc.pid
    with open(f"/proc/{pid}/stat") as stream:   # not a session leader: no terminal
        fields = stream.read().rsplit(")", 1)[1].split()
    assert int(fields[3]) != pid   # session id
    site.write("hi.lua", "function main(env, con) con:puts('detached') end")
    assert request(d.address, site.file("hi.lua"))[2] == b"detached"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(pidfile), what="the pidfile to go")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="the daemon to exit")


def test_sighup_applies_new_headers_without_failing_a_request(stack):
    s = stack(headers=["X-Version: 1"])
    s.write("v.lua", "function main(env, con) con:puts('v') end")
    assert s.get("/v.lua")[1]["x-version"] == "1"
    seen, failures, done = [], [], threading.Event()

    def client():
        while not done.is_set():
            status, headers, body = s.get("/v.lua")
            if status != 200 or body != b"v":
                failures.append((status, body))
            seen.append(headers.get("x-version"))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_for(lambda: len(seen) > 5, what="requests before the reload")
        s.daemon.write_config(headers=["X-Version: 2"])
        s.daemon.signal(signal.SIGHUP)
        wait_for(lambda: seen and seen[-1] == "2", what="the new header")
        count = len(seen)
        wait_for(lambda: len(seen) > count + 5, what="requests after the reload")
    finally:
        done.set()
        thread.join()
    assert failures == []
    first = seen.index("2")
    assert set(seen[:first]) == {"1"} and set(seen[first:]) == {"2"}


@pytest.mark.parametrize("processes", [1, 2])
def test_sighup_changing_lua_keeps_it_and_applies_the_live_settings(stack, processes):
    # memory_limit is set by default: checking it must not try to load the other VM
    s = stack(processes=processes, headers=["X-Version: 1"])
    s.write("v.lua", "function main(env, con) con:puts(_VERSION) end")
    assert s.get("/v.lua")[1]["x-version"] == "1"
    s.daemon.write_config(lua="5.4", headers=["X-Version: 2"])
    s.daemon.signal(signal.SIGHUP)
    wait_for(lambda: s.daemon.log().count("reloaded ") == processes, what="the reload")
    log = s.daemon.log()
    assert "reload refused" not in log
    assert log.count("reload: lua changed; restart luafcgid to apply it") == processes
    for _ in range(4):
        status, headers, body = s.get("/v.lua")
        assert (status, headers["x-version"], body) == (200, "2", b"Lua 5.1")   # LuaJIT's


def _proc_status(pid):
    """/proc/PID/status as a dict; {} once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as stream:
            return dict(line.rstrip("\n").split(":\t", 1) for line in stream)
    except FileNotFoundError:
        return {}


STARTS = {
    "os.execute": 'os.execute("sleep 1000 >/dev/null 2>&1 & echo $! > {pidfile}")',
    "io.popen": """
        local started = io.popen("sleep 1000 >/dev/null 2>&1 & echo $!")
        local pid = started:read("*l")
        started:close()
        local out = io.open("{pidfile}", "w")
        out:write(pid)
        out:close()""",
}


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("start", STARTS)
def test_a_process_a_page_starts_can_be_signalled(stack, start, processes):
    s = stack(processes=processes)
    pidfile = s.site.file("started.pid")
    s.write("start.lua", f"""
        function main(env, con)
          {STARTS[start].format(pidfile=pidfile)}
          con:puts("started")
        end
    """)
    assert s.get("/start.lua")[::2] == (200, b"started")
    with open(pidfile) as stream:
        pid = int(stream.read())
    try:
        status = _proc_status(pid)
        assert int(status["SigBlk"], 16) == 0
        assert int(status["SigIgn"], 16) & (1 << (signal.SIGTERM - 1)) == 0
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: _proc_status(pid).get("State", "Z").startswith("Z"),
                 what="the page's process to die of SIGTERM")
    finally:
        if _proc_status(pid).get("State", "Z")[0] != "Z":
            os.kill(pid, signal.SIGKILL)


def test_a_sigterm_during_start_up_waits_for_the_main_loop(tmp_path):
    d = Daemon(tmp_path / "d")
    os.mkfifo(d.settings["logfile"])   # start-up waits where it opens its log
    d.start(wait=False)
    wait_for(lambda: open(f"/proc/{d.proc.pid}/wchan").read() == "wait_for_partner",
             what="start-up to reach the log")
    d.signal(signal.SIGTERM)
    with open(d.settings["logfile"]) as log:   # start-up goes on, and logs here to its exit
        lines = log.read()
    assert d.proc.wait(15) == 0
    assert "luafcgid serving on" in lines and "stopped" in lines
    assert not os.path.exists(d.address)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("unbuffered", [False, True], ids=["", "PYTHONUNBUFFERED"])
def test_what_a_page_prints_goes_to_the_error_log_line_by_line(stack, monkeypatch,
                                                               unbuffered, processes):
    # Python's -u makes the C library's standard output unbuffered; it is line-buffered
    # either way
    if unbuffered:
        monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    else:
        monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    s = stack(processes=processes)
    s.write("say.lua", """
        function main(env, con)
          print("from print", 42)
          io.write("from io.write ", "in pieces", "\\n")
          os.execute("echo from a process the page started")
          io.write("the last words, with no line end")
          con:puts("said")
        end
    """)
    assert s.get("/say.lua")[::2] == (200, b"said")
    said = ["from print\\x0942",   # print's tab, as the log escapes it
            "from io.write in pieces", "from a process the page started"]

    def lines():
        return [line.split("] ", 1)[-1] for line in s.daemon.log().splitlines()]

    wait_for(lambda: all(line in lines() for line in said), what="the lines, while serving")
    assert s.stop() == 0
    assert "the last words, with no line end" in lines()   # flushed at stop
    # (standard error has the log lines too, when not detached)
    assert not [line for line in s.daemon.output().splitlines() if line.startswith("from ")]


@pytest.mark.parametrize("processes", [1, 2])
def test_what_a_page_writes_to_standard_error_goes_to_the_error_log_tagged(stack, processes):
    s = stack(processes=processes)
    s.write("complain.lua", """
        function main(env, con)
          io.stderr:write("from io.stderr ", "in pieces", "\\n")
          os.execute("echo from a process the page started >&2")
          con:puts("complained")
        end
    """)
    assert s.get("/complain.lua")[::2] == (200, b"complained")
    said = ["from a process the page started", "from io.stderr in pieces"]   # sorted
    tag = "[stderr]" if processes == 1 else "[stderr-"

    def tagged():
        return sorted(line.split("] ", 1)[1] for line in s.daemon.log().splitlines()
                      if tag in line)

    wait_for(lambda: tagged() == said, what="the lines, while serving")
    assert s.stop() == 0
    # the daemon's own log lines still reach its standard error, as they are in the log
    # and only once: through the pipe each would come back as a [stderr] line
    assert tagged() == said
    assert sorted(s.daemon.output().splitlines()) == sorted(s.daemon.log().splitlines())


def _stopped(pid):
    """Whether every thread of process `pid` is stopped (SIGSTOP)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stream:
            states.append(stream.read().rsplit(")", 1)[1].split()[0])
    return set(states) == {"T"}


def _captured(pid, supervisor):
    """Whether process `pid`'s standard error is a pipe whose read end `supervisor` holds."""
    ends = set()
    for fd in os.listdir(f"/proc/{supervisor}/fd"):
        try:
            ends.add(os.readlink(f"/proc/{supervisor}/fd/{fd}"))
        except FileNotFoundError:   # closed meanwhile
            pass
    stderr = os.readlink(f"/proc/{pid}/fd/2")
    return stderr.startswith("pipe:") and stderr in ends


def test_what_a_process_writes_as_it_ends_is_logged_by_the_supervisor(stack):
    # as a process that aborts writes to its standard error: its threads cannot log it
    s = stack(processes=2)
    supervisor = s.daemon.proc.pid

    def descriptors():
        return len(os.listdir(f"/proc/{supervisor}/fd"))

    def started():
        return re.findall(r"process (\d+) \(pid (\d+)\) started", s.daemon.log())

    wait_for(lambda: len(started()) == 2 and len(_children(supervisor)) == 2,
             what="two processes")
    before = descriptors()
    number, pid = started()[0]
    # "started" is logged at the fork: until the process makes the supervisor's pipe its
    # standard error, what it writes there goes to the daemon's (and it is not logged)
    wait_for(lambda: _captured(pid, supervisor), what="the process's standard error captured")
    os.kill(int(pid), signal.SIGSTOP)   # its capture threads read no more
    wait_for(lambda: _stopped(pid), what="the process to stop")
    with open(f"/proc/{pid}/fd/2", "w") as stderr:
        stderr.write("free(): invalid pointer\nthe last words, with no line end")
    os.kill(int(pid), signal.SIGKILL)
    said = [f"[stderr-{number}] process {number} (pid {pid}) wrote as it ended: {line}"
            for line in ("free(): invalid pointer", "the last words, with no line end")]
    wait_for(lambda: all(line in s.daemon.log() for line in said),
             what="the last words, tagged")
    wait_for(lambda: len(started()) == 3, what="a process in its place")
    wait_for(lambda: descriptors() == before, what="the supervisor's descriptors as before")


def test_what_a_page_writes_is_logged_under_its_pool(daemon, tmp_path):
    from test_pools import _get, _two_pools
    d, shop, _, b_page = _two_pools(daemon, tmp_path)
    said = os.path.join(os.path.dirname(b_page), "say.lua")
    with open(said, "w") as stream:
        stream.write('function run(env, con) print("to stdout"); io.stderr:write("to stderr\\n"); '
                     'con:puts("said") end\n')
    assert _get(shop, said) == ("200 OK", "said")

    def tagged():   # (the thread but its process number, the line)
        return sorted(re.findall(r"\[([\w/]+)-\d+\] (to std\w+)$", d.log(), re.M))

    wait_for(lambda: tagged() == [("shop/stderr", "to stderr"), ("shop/stdout", "to stdout")],
             what="the lines, named for the pool")


def test_faulthandler_still_writes_to_the_original_standard_error(stack, monkeypatch):
    # Python's fatal-error traceback: had it gone into the pipe, the dying process could
    # not have logged it
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    s = stack()
    s.write("crash.lua", """
        function main(env, con)
          os.execute("kill -SEGV $PPID")
        end
    """)
    s.get("/crash.lua")
    assert s.daemon.proc.wait(10) == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in s.daemon.output()


def test_sigusr1_reopens_a_rotated_log(daemon, site):
    d = daemon(access_log=None)
    logfile = d.settings["logfile"]
    os.rename(logfile, logfile + ".1")
    d.signal(signal.SIGUSR1)
    wait_for(lambda: os.path.exists(logfile), what="the log to be reopened")
    site.write("log.lua", "function main(env, con) con:log('after rotation'); con:puts('ok') end")
    assert request(d.address, site.file("log.lua"))[2] == b"ok"
    wait_for(lambda: "after rotation" in d.log(), what="the line in the new log")
    with open(logfile + ".1") as stream:
        assert "after rotation" not in stream.read()


@pytest.mark.parametrize("processes", [1, 2])
def test_a_full_disk_under_the_log_stops_no_serving(daemon, site, tmp_path, processes):
    """SIGUSR1 and SIGHUP while the log cannot be written (here: it is /dev/full) keep the
    daemon serving and report the failure on standard error; once the log can be written
    again, SIGUSR1 brings it back."""
    logfile = str(tmp_path / "full.log")
    os.symlink("/dev/full", logfile)
    d = daemon(processes=processes, logfile=logfile)
    site.write("log.lua", "function main(env, con) con:log(env.QUERY_STRING); con:puts('ok') end")
    script = site.file("log.lua")
    assert request(d.address, script, QUERY_STRING="before")[2] == b"ok"
    d.signal(signal.SIGUSR1)
    assert request(d.address, script, QUERY_STRING="after-usr1")[2] == b"ok"
    d.signal(signal.SIGHUP)
    assert request(d.address, script, QUERY_STRING="after-hup")[2] == b"ok"
    os.unlink(logfile)   # room again: a new, ordinary file
    d.signal(signal.SIGUSR1)

    def logged_again():
        request(d.address, script, QUERY_STRING="logged-again")
        return "logged-again" in d.log()

    wait_for(logged_again, what="lines in the reopened log")
    assert d.proc.poll() is None
    assert d.stop() == 0
    stderr = d.output()
    assert f"cannot write to {logfile}: [Errno 28] No space left on device" in stderr
