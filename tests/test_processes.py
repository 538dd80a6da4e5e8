"""processes > 1: several serving processes share one listening socket."""

import os
import signal
import threading

from conftest import wait_for


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
    seen = set()

    def client():
        for _ in range(10):
            status, _, body = s.get("/pid.lua")
            assert status == 200
            seen.add(int(body))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(60)
    assert seen == children, "both processes answer"

    victim = children.pop()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(_children(parent)) == 2 and victim not in _children(parent),
             what="the dead process to be replaced")
    assert "starting it again" in s.daemon.log()
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
        return len(data["processes"]) == 2 and data["requests"] >= 30 and data

    wait_for(pool_wide, what="both processes on the scoreboard")
    data = pool_wide()
    assert {slot["pid"] for slot in data["processes"]} == set(_children(d.proc.pid))
    assert data["workers"]["total"] == 4
    assert sum(slot["requests"] for slot in data["processes"]) == data["requests"]
