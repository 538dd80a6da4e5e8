"""request_timeout, memory_limit, max_requests and client_timeout, through nginx, on LuaJIT
(the default VM) and on PUC Lua; the descriptor limit."""

import errno
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, RawClient, skip_unless, split_response, wait_for

from luafcgid import config as configuration
from luafcgid.request import acceptor as acceptor_module
from luafcgid.request import fastcgi as fcgi
from luafcgid.settings import LUA_CHOICES
from luafcgid.states import vm

VMS = ["luajit", "5.4"]


@pytest.fixture(params=VMS)
def lua(request):
    return request.param


def test_a_runaway_handler_is_stopped_and_its_state_discarded(stack, lua):
    s = stack(lua=lua, request_timeout=0.3, showerrors=True)
    s.write("spin.lua", """
        count = 0
        function main(env, con)
          count = count + 1
          if env.QUERY_STRING == "spin" then while true do end end
          con:puts(count, " ", tostring(jit and jit.status()))
        end
    """)
    assert s.get("/spin.lua")[2] in (b"1 nil", b"1 false")   # LuaJIT's compiler is off
    status, _, body = s.get("/spin.lua?spin", timeout=60)
    assert status == 500 and b"Timeout Error" in body
    assert s.get("/spin.lua")[2].startswith(b"1 ")   # a fresh state
    assert "Timeout Error" in s.daemon.log()


@pytest.mark.parametrize("code", [
    "while true do pcall(function() while true do end end) end",
    "local ok = 0 while true do ok = select('#', pcall(error, 'x')) end",
    "local co = coroutine.wrap(function() while true do end end) co()",
    "resume_later()",
], ids=["pcall-loop", "pcall-error-loop", "coroutine", "coroutine-made-at-load"])
def test_catching_the_timeout_does_not_evade_it(stack, lua, code):
    s = stack(lua=lua, request_timeout=0.3, showerrors=True)
    s.write("evade.lua", f"""
        local co = coroutine.create(function() while true do end end)
        function resume_later() coroutine.resume(co) while true do end end
        function main(env, con) {code} end
    """)
    status, _, body = s.get("/evade.lua", timeout=60)
    assert status == 500 and b"Timeout Error" in body


def test_a_runaway_script_top_level_is_stopped(stack, lua):
    s = stack(lua=lua, request_timeout=0.3, showerrors=True)
    s.write("load.lua", "while true do end\nfunction main(env, con) con:puts('never') end\n")
    status, _, body = s.get("/load.lua", timeout=60)
    assert status == 500 and b"Timeout Error" in body
    s.write("fine.lua", "function main(env, con) con:puts('fine') end")
    assert s.get("/fine.lua")[2] == b"fine"


def test_a_runaway_finishhandler_is_stopped(stack):
    s = stack(request_timeout=0.3, finishhandler="after")
    s.write("after.lua", """
        count = 0
        function main(env, con) count = count + 1; con:puts(count) end
        function after(env, con) if count == 1 then while true do end end end
    """)
    assert s.get("/after.lua")[2] == b"1"
    wait_for(lambda: "Timeout Error in after()" in s.daemon.log(), timeout=30,
             what="the finish handler to be stopped")
    assert s.get("/after.lua")[2] == b"1"   # the state was discarded


def test_a_request_within_the_timeout_is_not_stopped(stack, lua):
    s = stack(lua=lua, request_timeout=3)
    s.write("work.lua", """
        function main(env, con)
          local x = 0
          for i = 1, 3e6 do x = x + i % 7 end
          con:puts(x)
        end
    """)
    assert s.get("/work.lua", timeout=60)[0] == 200


def test_a_memory_bomb_is_stopped_and_its_state_discarded(stack, lua):
    s = stack(lua=lua, memory_limit="32M", showerrors=True)
    s.write("bomb.lua", """
        count = 0
        function main(env, con)
          count = count + 1
          if env.QUERY_STRING == "bomb" then
            local t = {}
            while true do t[#t + 1] = string.rep("x", 100000) .. #t end
          end
          con:puts(count)
        end
    """)
    assert s.get("/bomb.lua")[2] == b"1"
    status, _, body = s.get("/bomb.lua?bomb", timeout=60)
    assert status == 500 and b"Memory Error" in body
    assert s.get("/bomb.lua")[2] == b"1"


def test_one_huge_allocation_is_refused(stack, lua):
    s = stack(lua=lua, memory_limit="32M", showerrors=True)
    s.write("huge.lua", """
        function main(env, con) local s = string.rep("x", 2^30 - 1); con:puts(#s) end
    """)
    status, _, body = s.get("/huge.lua", timeout=60)
    assert status == 500 and b"Memory Error" in body


@pytest.mark.parametrize("choice", LUA_CHOICES)
def test_memory_limit_holds_on_every_supported_vm(choice):
    # The settings check refuses memory_limit where it would not hold; with the lupa we
    # install it must hold everywhere. One VM per process, so each in its own.
    skip_unless(vm.available(choice), f"this lupa has no {vm.MODULES[choice]}")
    probe = subprocess.run(
        [sys.executable, "-c", f"from luafcgid.states import vm; print(vm.limits_memory({choice!r}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "True", probe.stderr


def test_the_check_refuses_memory_limit_where_the_vm_cannot_hold_it(monkeypatch):
    monkeypatch.setitem(vm._memory_checked, "5.1", False)
    # as in a process that runs no VM yet (this one may: routing a request reads its params
    # in Lua, request/params.py)
    monkeypatch.setattr(vm, "_loaded", None)
    config = configuration.defaults(lua="5.1", memory_limit="64M")
    (problem,) = vm.problems(config)
    assert problem.startswith("memory_limit: the installed lupa.lua51 cannot limit")
    assert vm.problems(configuration.defaults(lua="5.1", memory_limit=None)) == []


def test_max_requests_recycles_states(stack):
    s = stack(max_requests=2, workers=1, states=1)
    s.write("count.lua", """
        count = 0
        function main(env, con) count = count + 1; con:puts(count) end
    """)
    assert [s.get("/count.lua")[2] for _ in range(5)] == [b"1", b"2", b"1", b"2", b"1"]
    assert s.stop() == 0
    assert "recycled=2" in s.daemon.log()


@pytest.mark.parametrize("keepalive", [0, 8], ids=["new-connections", "kept-alive"])
def test_requests_waiting_for_a_worker_longer_than_client_timeout_are_served(stack, keepalive):
    """client_timeout is for a client slow to send; time a complete request spends waiting
    for the daemon's own busy workers must not count against it."""
    s = stack(workers=1, client_timeout=1, keepalive=keepalive)
    s.write("slow.lua", """
        function main(env, con) os.execute("sleep 1.5") con:puts(env.QUERY_STRING) end
    """)
    results = {}

    def client(n):
        try:
            results[n] = s.get(f"/slow.lua?{n}", timeout=60)[::2]
        except Exception as exc:   # recorded, and asserted on below
            results[n] = repr(exc)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    assert results == {n: (200, str(n).encode()) for n in range(4)}


def _half_request(s, query):
    """The first bytes of a request for hello.lua: BEGIN_REQUEST and half its PARAMS record;
    and the rest."""
    data = RawClient.request_bytes({b"SCRIPT_FILENAME": s.site.file("hello.lua").encode(),
                                    b"QUERY_STRING": query.encode()})
    cut = len(fcgi.begin_request(1)) + 20
    return data[:cut], data[cut:]


def test_fifty_stalled_half_requests_do_not_hold_up_a_good_one(stack):
    # One worker and a client_timeout far beyond the test's patience: a worker that waited
    # for the rest of any of these requests would never answer nginx's.
    s = stack(workers=1, client_timeout=3600)
    s.write("hello.lua", "function main(env, con) con:puts('served ', env.QUERY_STRING) end")
    stalled = []
    for n in range(50):
        client = RawClient(s.daemon.address, timeout=60)
        first, rest = _half_request(s, str(n))
        client.send(first)
        stalled.append((client, rest))
    status, _, body = s.get("/hello.lua?good", timeout=60)
    assert (status, body) == (200, b"served good")
    # the stalled requests were kept with their bytes: each completes when the rest arrives
    for n, (client, rest) in enumerate(stalled):
        client.send(rest)
        assert split_response(client.response()[0])[2] == f"served {n}".encode()
        client.close()


def test_a_stalled_request_is_closed_after_client_timeout(daemon):
    d = daemon(client_timeout=1)
    client = RawClient(d.address, timeout=60)
    client.send(b"\x01\x01\x00")   # half a record header, then nothing
    assert client.closed()
    assert ("1 connection(s) closed: request not complete within client_timeout (1 s)"
            in d.log())


def test_stalled_clients_are_summed_up_in_one_line_per_sweep(daemon):
    d = daemon(client_timeout=1)
    clients = [RawClient(d.address, timeout=60) for _ in range(100)]
    for client in clients:
        client.send(b"\x01\x01\x00")
    assert all(client.closed() for client in clients)
    closed = [int(n) for n in re.findall(
        r"(\d+) connection\(s\) closed: request not complete within client_timeout", d.log())]
    # they stalled within a second of each other: one sweep closed them, or two
    assert sum(closed) == 100 and len(closed) <= 2, closed


def _post_head(script, **params):
    """A POST's BEGIN_REQUEST and params, its body to follow."""
    return (fcgi.begin_request(1) + fcgi.record(fcgi.PARAMS, 1, fcgi.encode_params(
        {b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"POST",
         **{k.encode(): v.encode() for k, v in params.items()}})) + fcgi.record(fcgi.PARAMS, 1))


def test_a_body_is_answered_413_and_closed_as_soon_as_it_passes_maxpost(daemon, site):
    d = daemon(maxpost=1 << 20)
    script = site.write("post.lua", "function main(env, con) con:puts(#con:gets()) end")
    client = RawClient(d.address, timeout=30)
    client.send(_post_head(script))   # no CONTENT_LENGTH: the body is a stream
    piece = fcgi.record(fcgi.STDIN, 1, b"x" * 65535)
    sent = 0
    with pytest.raises(OSError):   # BrokenPipeError: the daemon closed the connection
        while sent < 1 << 30:
            client.send(piece)
            sent += len(piece)
    assert sent < 16 << 20, "the daemon read on far beyond maxpost"
    assert split_response(client.response()[0])[0] == "413 Content Too Large"
    assert client.closed()


def test_a_content_length_over_maxpost_is_answered_413_before_any_body(daemon, site):
    d = daemon(maxpost=1 << 20)
    script = site.write("post.lua", "function main(env, con) con:puts(#con:gets()) end")
    client = RawClient(d.address, timeout=10)
    client.send(_post_head(script, CONTENT_LENGTH=str(1 << 40)))
    assert split_response(client.response()[0])[0] == "413 Content Too Large"
    assert client.closed()


@pytest.mark.parametrize("keepalive", [0, 8])
def test_a_large_body_through_nginx_is_answered_413_every_time(stack, keepalive):
    """nginx sends the body on while luafcgid answers 413: closing at once made nginx fail
    its next write and answer 502 (19 times in 30); the connection lingers unread instead."""
    s = stack(maxpost=1 << 20, keepalive=keepalive)
    s.write("post.lua", "function main(env, con) con:puts(#con:gets()) end")
    body = b"x" * (32 << 20)   # within the test nginx's client_max_body_size (64m)
    assert [s.get("/post.lua", method="POST", body=body)[0] for _ in range(10)] == [413] * 10
    assert s.get("/post.lua", method="POST", body=b"abc")[::2] == (200, b"3")
    assert "[error]" not in s.nginx.error_log()


def test_a_trickling_connection_is_closed_after_client_timeout(daemon):
    d = daemon(client_timeout=1)
    client = RawClient(d.address, timeout=30)
    # a valid request whose PARAMS record (64 KiB) cannot arrive whole before the deadline
    # (100 of its bytes do), so that only client_timeout may close the connection: a record
    # completed (a BEGIN_REQUEST of an unknown role) is answered, and closes it at once
    trickle = (fcgi.begin_request(1)
               + fcgi.HEADER.pack(fcgi.VERSION, fcgi.PARAMS, 1, fcgi.MAX_CONTENT, 0))
    closed = False
    deadline = time.monotonic() + 20
    for byte in trickle + b"x" * fcgi.MAX_CONTENT:
        if time.monotonic() > deadline:
            break
        try:
            client.send(bytes((byte,)))
        except OSError:
            closed = True
            break
        time.sleep(0.2)
    if not closed:
        client.sock.settimeout(5)
        try:
            closed = client.closed()
        except socket.timeout:
            closed = False
    assert closed
    assert "not complete within client_timeout" in d.log()


def test_accept_failing_now_and_then_is_one_episode_until_it_works_for_an_interval(
        tmp_path, monkeypatch, caplog):
    # At the descriptor limit each connection closed lets one more be accepted: failures and
    # successes alternate. Each success used to end the episode, and the next failure was
    # logged as a new first one, a line per connection.
    monkeypatch.setattr(acceptor_module, "_REPORT_EVERY", 0.5)
    path = str(tmp_path / "l.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    acceptor = acceptor_module.Acceptor(listener)
    full = OSError(errno.EMFILE, "Too many open files")
    try:
        with caplog.at_level(logging.INFO, logger="luafcgid"):
            for _ in range(5):
                acceptor._accept_failed(full)
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(path)
                    acceptor.discard(acceptor.next())   # a real accept, which succeeds
                acceptor.close_idle(60)
            assert [r.getMessage() for r in caplog.records].count(
                "accept failed: [Errno 24] Too many open files; retrying (reported every "
                "0.5 s while it lasts)") == 1
            assert "accept works again" not in caplog.text
            wait_for(lambda: acceptor.close_idle(60) or "accept works again" in caplog.text,
                     what="the end of the failures reported")
            assert "accept works again (4 failure(s) since the last report)" in caplog.text
    finally:
        acceptor.close()
        listener.close()


def test_at_the_descriptor_limit_accept_failures_are_logged_once_per_interval(daemon, site):
    d = daemon(workers=3, states=3, client_timeout=60)
    site.write("hi.lua", "function main(env, con) con:puts('hi') end")
    # two descriptors to spare, once started: two connections are accepted, the rest wait
    # in the backlog (the socket listens before the workers start)
    wait_for(lambda: "luafcgid serving on" in d.log(), what="the start")
    in_use = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    limit = resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (in_use + 2, limit[1]))
    # more clients than the daemon can ever accept: a descriptor it held for a moment when
    # `in_use` was counted (the file watcher's, a stat) lets it accept one more now and then,
    # and with only a few clients the backlog emptied and the failures stopped before the
    # second report
    clients = [socket.socket(socket.AF_UNIX) for _ in range(64)]
    try:
        for client in clients:
            client.connect(d.address)
        # failing all along (each worker ten times a second), it is reported once per interval
        wait_for(lambda: re.search(r"accept failed (\d+) more time", d.log()), timeout=30,
                 what="the second report")
        reports = [line for line in d.log().splitlines() if "accept failed" in line]
        assert "Too many open files" in reports[0]
        counted = re.search(r"accept failed (\d+) more time", "\n".join(reports))
        assert int(counted.group(1)) > 1
        assert len(reports) < int(counted.group(1))   # fewer lines than failures
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, limit)
        wait_for(lambda: "accept works again" in d.log(), what="accepting again")
    finally:
        for client in clients:
            client.close()
    client = RawClient(d.address)
    client.request({b"SCRIPT_FILENAME": site.file("hi.lua").encode()})
    assert split_response(client.response()[0])[2] == b"hi"
    assert d.log().count("accept failed") == 2
