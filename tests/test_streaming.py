"""Unbuffered output, large bodies and kept-alive FastCGI connections."""

import http.client
import os
import socket
import threading

import pytest

from conftest import Fifo, InThread, RawClient, split_response, wait_for


def _peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_unbuffered_puts_go_out_at_once(stack, tmp_path):
    s = stack(buffering=False)
    go = Fifo(tmp_path / "go")
    s.write("stream.lua", f"""
        function main(env, con)
          con:puts("first chunk\\n")
          io.open("{go.path}"):read(2)
          con:puts("second chunk\\n")
        end
    """)
    client = RawClient(s.daemon.address)
    client.request({b"SCRIPT_FILENAME": s.site.file("stream.lua").encode()})
    rtype, _, content = client.read_record()   # arrives while the handler still waits
    assert b"first chunk" in content and b"Status: 200 OK" in content
    wait_for(go.release, what="the page to read its FIFO")
    data, app_status, _ = client.response()
    assert data == b"second chunk\n" and app_status == 0


def test_a_64_mib_unbuffered_response_uses_bounded_memory(stack):
    s = stack(buffering=False)
    s.write("big.lua", """
        local chunk = string.rep("0123456789abcdef", 4096)   -- 64 KiB
        function main(env, con)
          con:header("Content-Type", "application/octet-stream")
          for i = 1, 1024 do con:puts(chunk) end
        end
    """)
    s.write("warm.lua", "function main(env, con) con:puts('warm') end")
    s.get("/warm.lua")
    before = _peak_rss_kb(s.daemon.proc.pid)
    status, _, body = s.get("/big.lua", timeout=120)
    assert status == 200 and len(body) == 64 * 1024 * 1024
    assert body[:16] == b"0123456789abcdef" and body[-16:] == b"0123456789abcdef"
    grown_mib = (_peak_rss_kb(s.daemon.proc.pid) - before) / 1024
    assert grown_mib < 32, f"peak RSS grew by {grown_mib:.0f} MiB for a 64 MiB response"


BIG_PAGE = """
local mib = string.rep("0123456789abcdef", 65536)
function main(env, con)
  con:header("Content-Type", "application/octet-stream")
  for i = 1, 64 do con:puts(mib) end
  con:flush()                                    -- the first 64 MiB go out now
  local f = assert(io.open("{marker}", "w")); f:close()
  local fifo = assert(io.open("{fifo}", "r")); fifo:read("*a"); fifo:close()
  for i = 1, 64 do con:puts(mib) end             -- the last 64 MiB with the response's end
end
"""


def _read_counting(port, path):
    """(status, length, first 16 bytes, last 16 bytes) of a response read in pieces."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        length, first, last = 0, b"", b""
        while True:
            piece = response.read(1 << 20)
            if not piece:
                return response.status, length, first, last
            first = first or piece[:16]
            last = (last + piece)[-16:]
            length += len(piece)
    finally:
        conn.close()


@pytest.mark.parametrize("vm", ["luajit", "5.4"])
def test_a_128_mib_buffered_response_is_never_copied_whole(stack, tmp_path, vm):
    """The body crosses from Lua to the socket in bounded pieces: the daemon's peak memory
    grows by far less than the response, while a neighbour page keeps being served."""
    s = stack(lua=vm, workers=2, shutdown_timeout=5)
    marker, fifo = tmp_path / "half-sent", Fifo(tmp_path / "fifo")
    s.write("big.lua", BIG_PAGE.format(marker=marker, fifo=fifo.path))
    s.write("hello.lua", "function main(env, con) con:puts('hello') end")
    assert s.get("/hello.lua")[0] == 200
    before = _peak_rss_kb(s.daemon.proc.pid)
    big = InThread(_read_counting, s.nginx.port, "/big.lua")
    try:
        wait_for(lambda: marker.exists() or big.done(), timeout=60,
                 what="the first half to be sent")
        assert marker.exists(), f"the page ended early: {big.result()[:2]}"
        neighbours = [s.get("/hello.lua")[0] for _ in range(20)]
        assert neighbours == [200] * 20
    finally:
        released = fifo.release()
    status, length, first, last = big.result()
    assert released and (status, length) == (200, 128 << 20)
    assert first == last == b"0123456789abcdef"
    grown_mib = (_peak_rss_kb(s.daemon.proc.pid) - before) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB for a 128 MiB response"
    assert s.daemon.proc.poll() is None and s.get("/hello.lua")[0] == 200


def test_a_5_mib_buffered_response_and_request_body(stack):
    s = stack(maxpost=8 * 1024 * 1024)
    s.write("echo.lua", "function main(env, con) con:puts(con:gets()) end")
    payload = os.urandom(5 * 1024 * 1024)
    status, _, body = s.get("/echo.lua", method="POST", body=payload, timeout=120)
    assert status == 200 and body == payload


def test_several_requests_on_one_kept_connection(daemon, site):
    d = daemon()
    site.write("kc.lua", "n = 0 function main(env, con) n = n + 1 con:puts(n) end")
    client = RawClient(d.address)
    for n in range(1, 4):
        client.request({b"SCRIPT_FILENAME": site.file("kc.lua").encode()}, request_id=n,
                       keep_conn=True)
        data, _, _ = client.response()
        assert split_response(data)[2] == str(n).encode()
    client.close()


def test_nginx_upstream_keepalive_with_more_cached_connections_than_workers(stack):
    s = stack(keepalive=8, workers=2, states=2)
    s.write("ka.lua", "function main(env, con) con:puts(env.REQUEST_URI) end")
    results = []

    def client(n):
        for i in range(30):
            results.append(s.get(f"/ka.lua?{n}-{i}"))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 180 and all(r[0] == 200 for r in results)


def test_stop_removes_the_socket_and_exits_zero(daemon, site):
    d = daemon()
    site.write("x.lua", "function main(env, con) con:puts('x') end")
    assert os.path.exists(d.address)
    assert d.stop() == 0
    assert not os.path.exists(d.address)
    wait_for(lambda: "stopped" in d.log(), what="the stop log line")


# Pages that send for ever unless stopped, one for each way of writing; `?count` answers
# how many requests the state served, which tells whether it was kept.
CON_PAGE = """
    served = 0
    function main(env, con)
      served = served + 1
      if env.QUERY_STRING == "count" then return con:puts("served ", served) end
      local chunk = string.rep("x", 65536)
      %s
    end
"""
ENDLESS = {
    "puts": ({"buffering": False}, CON_PAGE % "while true do con:puts(chunk) end"),
    "flush": ({}, CON_PAGE % "while true do con:puts(chunk); con:flush() end"),
    # the body goes out after main returned, in pieces: the next piece finds the client gone
    "buffered": ({}, CON_PAGE % "for _ = 1, 512 do con:puts(chunk) end"),
    "wsapi": ({}, """
        served = 0
        return function(wsapi_env)
          served = served + 1
          if wsapi_env.QUERY_STRING == "count" then return 200, {}, {"served " .. served} end
          local chunk = string.rep("x", 65536)
          return 200, {}, coroutine.wrap(function() while true do coroutine.yield(chunk) end end)
        end
    """),
}


@pytest.mark.parametrize("writes", ENDLESS)
def test_a_client_that_hangs_up_stops_the_page_at_its_next_write(stack, tmp_path, writes):
    settings, page = ENDLESS[writes]
    access = tmp_path / "access.log"
    # nginx buffers no more than in memory: reading on into a temporary file, it could
    # take the whole of a finite response before the client left
    s = stack(workers=1, states=1, access_log=str(access), shutdown_timeout=2,
              nginx_extra="fastcgi_max_temp_file_size 0;", **settings)
    s.write("endless.lua", page)
    with socket.create_connection(("127.0.0.1", s.nginx.port)) as client:
        client.sendall(b"GET /endless.lua HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = 0
        while received < 1 << 20:   # 1 MiB into the response, the client hangs up
            received += len(client.recv(65536))
    # the page's one worker is free again for the next request, on the state it had
    assert s.get("/endless.lua?count", timeout=20)[::2] == (200, b"served 2")
    log = s.daemon.log()
    (gone,) = [line for line in log.splitlines() if "client went away" in line]
    assert " INFO " in gone and "Error" not in log   # once, and not as a script error
    wait_for(lambda: " 499 " in access.read_text(), what="the access log line")
    assert "/endless.lua " in [line for line in access.read_text().splitlines()
                               if " 499 " in line][0]
