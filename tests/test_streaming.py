"""Unbuffered output, large bodies and kept-alive FastCGI connections."""

import os
import threading

from conftest import RawClient, split_response, wait_for


def _peak_rss_kb(pid):
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_unbuffered_puts_go_out_at_once(stack, tmp_path):
    s = stack(buffering=False)
    go = tmp_path / "go"
    s.write("stream.lua", f"""
        function main(env, con)
          con:puts("first chunk\\n")
          local deadline = os.time() + 20
          while not io.open("{go}") and os.time() < deadline do end
          con:puts("second chunk\\n")
        end
    """)
    client = RawClient(s.daemon.address)
    client.request({b"SCRIPT_FILENAME": s.site.file("stream.lua").encode()})
    rtype, _, content = client.read_record()   # arrives while the handler still waits
    assert b"first chunk" in content and b"Status: 200 OK" in content
    go.write_text("")
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
