"""Reload and stop under load, through nginx: SIGHUP while a client runs loses no request;
SIGTERM lets a request in flight finish, then the daemon exits 0."""

import os
import signal
import threading

import pytest

from conftest import (Daemon, Fifo, Nginx, RawClient, Site, can_connect, free_port,
                      split_response, wait_for)


def hammer(s, path, stop, results):
    """Requests through nginx, one after another, until `stop` is set: (status, body,
    X-Generation header) each."""
    while not stop.is_set():
        try:
            status, headers, body = s.get(path, timeout=30)
            results.append((status, body, headers.get("x-generation")))
        except Exception as exc:   # a failed request is a result too
            results.append((None, repr(exc).encode(), None))


@pytest.mark.parametrize("keepalive", [0, 8], ids=["new-connections", "kept-alive"])
def test_sighup_under_load_fails_no_request(stack, keepalive):
    s = stack(workers=3, states=6, keepalive=keepalive)
    s.write("count.lua", """
        count = 0
        function main(env, con) count = count + 1; con:puts("n=", count) end
    """)
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=hammer, args=(s, "/count.lua", stop, results))
               for _ in range(4)]
    for client in clients:
        client.start()
    try:
        for n in range(10):
            # a live setting changes every time, so each reload really applies something;
            # the next signal waits for this reload and a request answered under it
            # (identical pending signals would merge)
            s.daemon.write_config(headers=[f"X-Generation: {n}"])
            s.daemon.signal(signal.SIGHUP)
            wait_for(lambda: s.daemon.log().count("reloaded ") == n + 1, timeout=30,
                     what=f"reload {n + 1}")
            wait_for(lambda: any(r[2] == str(n) for r in results), timeout=30,
                     what=f"a request answered after reload {n + 1}")
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    failed = [r for r in results if r[0] != 200 or not r[1].startswith(b"n=")]
    assert failed == []
    assert s.get("/count.lua")[1]["x-generation"] == "9"
    assert s.stop() == 0


@pytest.mark.parametrize("keepalive", [0, 8], ids=["new-connections", "kept-alive"])
def test_sigterm_drains_a_request_in_flight_then_exits_0(stack, keepalive, tmp_path):
    s = stack(keepalive=keepalive)
    started, fifo = s.site.file("started"), Fifo(tmp_path / "fifo")
    s.write("slow.lua", f"""
        function main(env, con)
          io.open("{started}", "w"):close()
          io.open("{fifo.path}"):read(2)   -- until the test lets it go on
          con:puts("finished")
        end
    """)
    results = []
    client = threading.Thread(target=lambda: results.append(s.get("/slow.lua", timeout=30)))
    client.start()
    wait_for(lambda: os.path.exists(started), what="the request to run")
    s.daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stopping: draining" in s.daemon.log(), what="the drain to begin")
    # draining: the daemon waits for the request, which is still held
    assert client.is_alive() and s.daemon.proc.poll() is None
    wait_for(fifo.release, what="the page to read its FIFO")
    client.join(30)
    status, _, body = results[0]
    assert (status, body) == (200, b"finished")
    assert s.daemon.proc.wait(30) == 0
    log = s.daemon.log()
    assert "busy=0" in log


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("listen", ["unix", "tcp"])
def test_a_draining_daemon_refuses_new_connections_at_once(tmp_path, listen, processes):
    """Two daemons in one nginx upstream: while one drains a request in flight, new
    connections to it are refused, so nginx moves on to the other at once."""
    site = Site(tmp_path / "www")
    started, held = site.file("started"), Fifo(tmp_path / "held")
    site.write("hold.lua", f"""
        function main(env, con)
          io.open("{started}", "w"):close()
          io.open("{held.path}"):read()
          con:puts("held")
        end
    """)
    site.write("who.lua", "function main(env, con) con:puts(con:config('listen')) end")
    addresses = [f"127.0.0.1:{free_port()}" if listen == "tcp" else str(tmp_path / f"{n}.sock")
                 for n in ("draining", "serving")]
    draining = Daemon(tmp_path / "draining", {"listen": addresses[0], "processes": processes})
    serving = Daemon(tmp_path / "serving", {"listen": addresses[1]})
    servers = " ".join(f"server {'unix:' if listen == 'unix' else ''}{a};" for a in addresses)
    nginx = Nginx(tmp_path / "nginx", site.path, "luafcgid",
                  upstream=f"upstream luafcgid {{ {servers} }}")
    try:
        draining.start()
        serving.start()
        nginx.start()
        in_flight = RawClient(draining.address, timeout=30)
        in_flight.request({b"SCRIPT_FILENAME": site.file("hold.lua").encode()})
        wait_for(lambda: os.path.exists(started), what="the request to run")
        draining.signal(signal.SIGTERM)
        wait_for(lambda: draining.log().count("stopping: draining") == processes,
                 what="the drain to begin")
        assert not can_connect(draining.address)
        for _ in range(4):
            assert nginx.get("/who.lua", timeout=10)[::2] == (200, addresses[1].encode())
        assert held.release()
        assert split_response(in_flight.response()[0])[2] == b"held"
        assert draining.proc.wait(30) == 0
    finally:
        held.release()
        nginx.stop()
        draining.stop()
        serving.stop()
