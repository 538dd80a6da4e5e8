"""processes > 1: several serving processes share one listening socket."""

import os
import re
import signal
import threading

import pytest

from conftest import Daemon, wait_for


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as stream:
        return [int(p) for p in stream.read().split()]


def test_processes_share_the_socket_and_restart_when_one_dies(stack):
    s = stack(processes=2, workers=2, states=2)
    s.write("pid.lua", """
        local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
        function main(env, con)
          local t = os.clock() + 0.05   -- long enough that 6 clients need both processes
          while os.clock() < t do end
          con:puts(pid)
        end
    """)
    parent = s.daemon.proc.pid
    wait_for(lambda: len(_children(parent)) == 2, what="two serving processes")
    children = set(_children(parent))
    answers = []

    def client():
        for _ in range(10):
            status, _, body = s.get("/pid.lua")
            answers.append((status, int(body) if status == 200 else body))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(60)
    assert len(answers) == 60 and {status for status, _ in answers} == {200}
    assert {pid for _, pid in answers} == children, "both processes answer"

    victim = children.pop()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(_children(parent)) == 2 and victim not in _children(parent),
             what="the dead process to be replaced")
    assert f"(pid {victim}) exited with status -9" in s.daemon.log()
    assert all(s.get("/pid.lua")[0] == 200 for _ in range(20))


def test_sighup_reloads_every_process_and_sigterm_stops_them_all(stack):
    s = stack(processes=2, workers=1, states=1, headers=["X-Version: 1"])
    s.write("v.lua", "function main(env, con) con:puts('v') end")
    parent = s.daemon.proc.pid
    wait_for(lambda: len(_children(parent)) == 2, what="two serving processes")
    assert s.get("/v.lua")[1]["x-version"] == "1"
    s.daemon.write_config(headers=["X-Version: 2"])
    s.daemon.signal(signal.SIGHUP)
    wait_for(lambda: all(s.get("/v.lua")[1]["x-version"] == "2" for _ in range(10)),
             what="every process to reload")
    children = _children(parent)
    assert s.daemon.stop() == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children)
    assert not os.path.exists(s.daemon.address)


PID_PAGE = """
    local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
    function main(env, con) os.execute("sleep 0.2") con:puts(pid) end
"""


def test_a_child_started_after_a_reload_serves_the_reloaded_config(stack):
    s = stack(processes=2, workers=1, states=1, headers=["X-Version: 1"])
    s.write("slow_pid.lua", PID_PAGE)
    parent = s.daemon.proc.pid
    wait_for(lambda: len(_children(parent)) == 2, what="two serving processes")
    s.daemon.write_config(headers=["X-Version: 2"])
    s.daemon.signal(signal.SIGHUP)
    wait_for(lambda: s.daemon.log().count("reloaded ") == 2, what="both processes to reload")
    victim = _children(parent)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(_children(parent)) == 2 and victim not in _children(parent),
             what="the dead process to be replaced")
    replaced = set(_children(parent))
    answers = []

    def newcomer_answered():
        # two requests at once, each holding its process's one worker for a moment, so
        # that both processes answer
        threads = [threading.Thread(target=lambda: answers.append(s.get("/slow_pid.lua")))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return {int(body) for _, _, body in answers} == replaced

    wait_for(newcomer_answered, timeout=30, what="both processes, the new one too, to answer")
    assert {(status, headers["x-version"]) for status, headers, _ in answers} == {(200, "2")}


def test_children_stop_when_the_supervisor_dies(stack, daemon):
    s = stack(processes=2, workers=1, states=1)
    parent = s.daemon.proc.pid
    wait_for(lambda: len(_children(parent)) == 2, what="two serving processes")
    children = _children(parent)
    os.kill(parent, signal.SIGKILL)
    s.daemon.proc.wait(10)
    wait_for(lambda: not any(_running(pid) for pid in children), what="the children to exit")
    # nothing serves on the socket any more, so a new daemon takes it over
    again = daemon(listen=s.daemon.settings["listen"])
    assert again.proc.poll() is None


def _running(pid):
    """Whether `pid` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_status_page_reports_every_process(daemon, site):
    import json

    from conftest import RawClient, split_response

    d = daemon(processes=2, workers=2, states=2, status_path="/status")
    site.write("n.lua", "function main(env, con) con:puts('n') end")
    wait_for(lambda: len(_children(d.proc.pid)) == 2, what="two serving processes")

    def get(script_name, script=b""):
        client = RawClient(d.address)
        client.request({b"SCRIPT_NAME": script_name, b"SCRIPT_FILENAME": script,
                        b"REMOTE_ADDR": b"127.0.0.1", b"QUERY_STRING": b"json"})
        status, _, body = split_response(client.response()[0])
        client.close()
        return status, body

    for _ in range(30):
        assert get(b"/n.lua", site.file("n.lua").encode())[0] == "200 OK"

    def pool_wide():
        data = json.loads(get(b"/status")[1])
        return len(data["serving_processes"]) == 2 and data["accepted conn"] >= 30 and data

    wait_for(pool_wide, what="both processes on the scoreboard")
    data = pool_wide()
    slots = data["serving_processes"]
    assert {slot["pid"] for slot in slots} == set(_children(d.proc.pid))
    assert data["total processes"] == 4
    # php-fpm counts the requests accepted: the ones answered and the ones running
    assert sum(slot["requests"] for slot in slots) + data["active processes"] == \
        data["accepted conn"]


def test_a_hung_process_is_replaced(stack):
    s = stack(processes=2, workers=1, states=1, process_timeout=2)
    s.write("pid.lua", PID_PAGE)
    parent = s.daemon.proc.pid
    wait_for(lambda: len(_children(parent)) == 2, what="two serving processes")
    hung = _children(parent)[0]
    os.kill(hung, signal.SIGSTOP)   # its main loop stops reporting on the scoreboard
    wait_for(lambda: not _running(hung) and len(_children(parent)) == 2, timeout=30,
             what="the hung process to be replaced")
    assert f"(pid {hung}) has not reported for" in s.daemon.log()
    assert all(s.get("/pid.lua")[0] == 200 for _ in range(10))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run the daemon as nobody")
def test_a_process_that_fails_at_boot_is_given_up_on(tmp_path):
    """Past its user's process limit (RLIMIT_NPROC, which counts threads and binds once root
    is dropped) a serving process cannot start its threads, every time: the supervisor
    backs off, then gives up and exits with the process's status instead of restarting it
    every second for ever."""
    d = Daemon(tmp_path, {"processes": 2, "workers": 2, "user": "nobody", "group": "nogroup"})
    d.launcher = ("prlimit", "--nproc=2")
    d.start(wait=False)
    assert d.proc.wait(60) == 1
    log = d.log()
    assert "before it was ready" in log or "cannot start process" in log
    assert re.search(r"process \d failed at boot 4 times in a row; giving up", log)
