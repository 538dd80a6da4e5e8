"""Process management (pm), recycling and crash-loop throttling, through nginx; and the
policy itself (procman) in isolation."""

import os
import re
import threading
from datetime import datetime, timedelta

import pytest

from conftest import Fifo, InThread, wait_for
from luafcgid import config, procman
from test_processes import _children

PID_PAGE = """
    local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
    function main(env, con) con:puts(pid) end
"""

# held at the FIFO until the test releases it, after leaving a file named for its process
HELD_PAGE = """
    local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
    function main(env, con)
      io.open("{marks}/" .. pid, "w"):close()
      io.open("{fifo}"):read("*a")
      con:puts(pid)
    end
"""


def _hold(s, tmp_path, count):
    """`count` requests held in the page at once, each on a process of its own (1 worker
    each); returns (their InThreads, the Fifo releasing them)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    fifo = Fifo(tmp_path / "fifo")
    s.write("held.lua", HELD_PAGE.format(marks=marks, fifo=fifo.path))
    # one at a time, each once the one before is held: a process whose worker is free
    # accepts two connections that arrive together when the first is parked before its
    # request arrived and the second run, and the first then waits until that process hands
    # it to an idle one (request/handoff.py), or, with no process idle, for that worker
    held = []
    for n in range(1, count + 1):
        held.append(InThread(s.get, "/held.lua"))
        wait_for(lambda: len(os.listdir(marks)) == n, timeout=30,
                 what=f"{n} requests held, each in a process of its own")
    return held, fifo


def _release(held, fifo):
    def released():
        fifo.release()   # again, for a request that opens the FIFO after the last release
        return all(h.done() for h in held)

    wait_for(released, what="the held requests to finish")
    return [h.result() for h in held]


@pytest.mark.parametrize("processes, keepalive", [(2, 0), (1, 128)])
def test_recycling_loses_no_request(stack, processes, keepalive):
    """Each process is replaced after about 20 requests: its successor starts first, then
    it drains. POSTs (which nginx passes to no other connection when one fails) keep coming
    from 4 clients meanwhile; every one is answered 200 with its own body. With
    processes: 1 a supervisor runs, for the recycling."""
    s = stack(processes=processes, workers=2, process_max_requests=20, keepalive=keepalive)
    s.write("echo.lua", """
        local pid = io.open("/proc/self/stat"):read("*l"):match("^(%d+)")
        function main(env, con) con:puts(pid, " ", con:gets()) end
    """)
    answers, stop = [], threading.Event()

    def client(number):
        sent = 0
        while not stop.is_set():
            sent += 1
            body = f"{number}.{sent}".encode()
            status, _, answer = s.get("/echo.lua", method="POST", body=body)
            pid, _, echoed = answer.partition(b" ")
            answers.append((status, pid))
            assert echoed == body

    def replaced():
        return len(re.findall(r"is replaced by process \d+ \(pid \d+\); stopping it",
                              s.daemon.log()))

    clients = [InThread(client, number) for number in range(4)]
    try:
        wait_for(lambda: len(answers) >= 300 and replaced() >= 3, timeout=60,
                 what="300 requests across 3 replacements")
    finally:
        stop.set()
        for c in clients:
            c.result()
    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:3]
    assert len({body for _, body in answers}) >= processes + 2   # successors answered
    assert "asking the supervisor for a successor" in s.daemon.log()
    wait_for(lambda: len(_children(s.daemon.proc.pid)) == processes, timeout=30,
             what="the replaced processes to drain and exit")


def test_a_process_past_process_max_memory_is_replaced(stack):
    s = stack(processes=1, workers=1, process_max_memory="100M", memory_limit="512M")
    s.write("pid.lua", PID_PAGE)
    s.write("grow.lua", """
        function main(env, con) big = string.rep("x", 96 * 2^20) con:puts("grown") end
    """)
    first = s.get("/pid.lua")[2]
    assert s.get("/grow.lua")[::2] == (200, b"grown")
    wait_for(lambda: s.get("/pid.lua")[2] != first, timeout=30,
             what="the grown process to be replaced")
    assert re.search(r"process 1 uses \d+ MiB \(process_max_memory: 100 MiB\)", s.daemon.log())


def test_ondemand_starts_processes_as_requests_wait_and_stops_them_idle(stack, tmp_path):
    s = stack(pm="ondemand", processes=3, workers=1, process_idle_timeout=1)
    s.write("pid.lua", PID_PAGE)
    parent = s.daemon.proc.pid
    # the daemon's start was awaited by connecting, which started a process: it goes idle
    wait_for(lambda: _children(parent) == [], timeout=20, what="no process while idle")
    held, fifo = _hold(s, tmp_path, 3)
    assert len(_children(parent)) == 3
    answers = _release(held, fifo)
    assert [status for status, _, _ in answers] == [200] * 3
    wait_for(lambda: _children(parent) == [], timeout=20, what="the idle processes to stop")
    log = s.daemon.log()
    assert log.count("(pm ondemand); stopping it") == log.count("started: a request was waiting")
    # the first request after idle starts a process again
    status, _, pid = s.get("/pid.lua")
    assert status == 200 and _children(parent) == [int(pid)]


def test_dynamic_keeps_spare_processes(stack, tmp_path):
    s = stack(pm="dynamic", processes=4, workers=1, min_spare_processes=1,
              max_spare_processes=2, start_processes=1)
    parent = s.daemon.proc.pid
    wait_for(lambda: len(_children(parent)) == 1, what="start_processes")
    held, fifo = _hold(s, tmp_path, 2)
    wait_for(lambda: len(_children(parent)) == 3, timeout=20,
             what="a spare beside the two busy processes")
    answers = _release(held, fifo)
    assert [status for status, _, _ in answers] == [200] * 2
    wait_for(lambda: len(_children(parent)) == 2, timeout=20,
             what="the third idle process to stop (two spare at most)")
    assert s.daemon.log().count("(pm dynamic); stopping it") == 1


def _logged_at(line):
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def test_a_crash_loop_is_throttled_with_growing_delays(stack):
    """A page that kills its own process: after emergency_restart_threshold exits within
    emergency_restart_interval, no process starts for 1 s, then 2, then 4, logged; the
    delays are kept; afterwards the site serves again."""
    s = stack(processes=2, workers=1, emergency_restart_threshold=3,
              emergency_restart_interval=30)
    s.write("crash.lua", 'function main(env, con) os.execute("kill -9 $PPID") end')
    s.write("pid.lua", PID_PAGE)
    stop = threading.Event()

    def crasher():
        while not stop.is_set():
            s.get("/crash.lua")

    clients = [InThread(crasher) for _ in range(2)]
    try:
        wait_for(lambda: "no process starts for 4 s" in s.daemon.log(), timeout=60,
                 what="the third delay")
    finally:
        stop.set()
        # the requests still queued do not crash the next processes
        s.write("crash.lua", "function main(env, con) con:puts('fixed') end")
        for c in clients:
            c.result()
    lines = s.daemon.log().splitlines()
    delays = [(int(m.group(1)), _logged_at(line)) for line in lines
              for m in [re.search(r"no process starts for (\d+) s", line)] if m]
    assert [d for d, _ in delays[:3]] == [1, 2, 4]
    starts = [_logged_at(line) for line in lines if re.search(r"\(pid \d+\) started", line)]
    for delay, at in delays:
        assert not [t for t in starts if at < t < at + timedelta(seconds=delay)]
    wait_for(lambda: s.get("/pid.lua")[0] == 200, timeout=60, what="the site to serve again")


def test_pm_settings_are_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pm: dynamic\nprocesses: 2\nmin_spare_processes: 3\n"
                    "max_spare_processes: 1\nstart_processes: 5\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert info.value.problems == [
        "min_spare_processes: must be at most processes (2), got 3",
        "max_spare_processes: must be at least min_spare_processes (3), got 1",
        "start_processes: must be at most processes (2), got 5"]
    path.write_text("pm: sometimes\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert info.value.problems == [
        "pm: expected one of static, ondemand, dynamic, got 'sometimes'"]


# -- the policy alone -------------------------------------------------------------------------

def _config(**settings):
    return config.defaults(**settings)


def test_the_policies_plan():
    P = procman.Process
    static = _config(processes=3)
    assert procman.initial(static) == 3
    assert procman.plan(static, [P(1, 0.0)], waiting=True) == (2, [])
    ondemand = _config(pm="ondemand", processes=2, process_idle_timeout=5)
    assert procman.initial(ondemand) == 0
    assert procman.plan(ondemand, [], waiting=False) == (0, [])
    assert procman.plan(ondemand, [], waiting=True) == (1, [])
    assert procman.plan(ondemand, [P(1, None)], waiting=True) == (0, [])   # one is starting
    assert procman.plan(ondemand, [P(1, 0.0), P(2, 6.0), P(3, 7.0)], waiting=True) == (0, [3, 2])
    dynamic = _config(pm="dynamic", processes=5, min_spare_processes=1, max_spare_processes=3)
    assert procman.initial(dynamic) == 2
    assert procman.plan(dynamic, [P(1, 0.0, True), P(2, 0.5, True)], waiting=False) == (1, [])
    assert procman.plan(dynamic, [P(1, 0.0, True), P(2, 9.0)], waiting=False) == (0, [])
    assert procman.plan(dynamic, [P(1, None), P(2, 0.0, True)], waiting=True) == (0, [])
    assert procman.plan(dynamic, [P(n, float(n)) for n in range(2, 7)],
                        waiting=False) == (0, [6, 5])
    assert procman.plan(dynamic, [P(n, 0.0, True) for n in range(5)], waiting=True) == (0, [])


def test_the_restart_throttle_grows_and_resets():
    throttle = procman.RestartThrottle()
    delays = [throttle.exited(t, threshold=3, interval=10) for t in (0.0, 0.1, 0.2, 1.3, 3.4)]
    assert delays == [0, 0, 1, 2, 4]
    assert [throttle.exited(t, 3, 10) for t in (8.0, 16.5, 33.0, 66.0, 100.0)] == [
        8, 16, 30, 30, 30]
    # processes ran 10 s after the last restart (at 130) without exiting: the loop is over
    assert throttle.exited(140.0, 3, 10) == 0
    assert procman.RestartThrottle().exited(0.0, threshold=0, interval=10) == 0


def test_recycling_draws_its_limit_with_jitter():
    limits = {procman.Recycling(100, None).max_requests for _ in range(200)}
    assert min(limits) >= 100 and max(limits) <= 110 and len(limits) > 1
    recycling = procman.Recycling(0, 2**20)
    assert recycling.due(10**6).startswith("uses ")   # any Python process is over 1 MiB
    assert procman.Recycling(0, None).due(10**6) is None
