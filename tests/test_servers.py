"""luafcgid behind every common FastCGI front, each with the configuration luafcgid ships for
it (tests/servers.py): the requests a site makes, end to end through the real server."""

import errno
import os

import pytest

from conftest import RawClient, split_response, wait_for
from servers import SERVERS, server_stack  # noqa: F401, F811  (a fixture)

PAGES = {
    "hello.lua": """
        function main(env, con)
          con:header("Content-Type", "text/plain")
          con:puts("Hello from luafcgid\\n")
        end
    """,
    "query.lua": """
        local luafcgid = require("luafcgid")
        function main(env, con)
          local query = luafcgid.parse(env.QUERY_STRING)
          con:puts(env.QUERY_STRING, "|", query.b, "|", env.PATH_INFO or "")
        end
    """,
    "post.lua": """
        function main(env, con)
          con:puts(env.REQUEST_METHOD, "|", env.CONTENT_TYPE, "|", env.CONTENT_LENGTH, "|",
                   con:gets())
        end
    """,
    "cookies.lua": """
        function main(env, con)
          con:header("Set-Cookie", "a=1; Path=/")
          con:header("Set-Cookie", "b=2; Path=/; HttpOnly")
          con:puts("two cookies")
        end
    """,
    "redirect.lua": """
        function main(env, con)
          con:header("Status", "302 Found")
          con:header("Location", "/hello.lua")
        end
    """,
    # flushes its first piece, then waits until the test has received it
    "stream.lua": """
        function main(env, con)
          con:header("Content-Type", "text/plain")
          con:puts("first piece\\n")
          con:flush()
          local go = assert(io.open(env.HTTP_X_FIFO, "r"))
          go:read("*a")
          go:close()
          con:puts("second piece\\n")
        end
    """,
}


def header_values(headers, name):
    return [value for key, value in headers if key.lower() == name]


def open_fifo_for_writing(path):
    """A write end of the FIFO once the page has opened its read end, else None."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:   # no reader yet
            return None
        raise


def check_streaming(server, fifo):
    """The first piece arrives while the page still waits: the server passed it on as it
    was flushed. A server that holds the response never delivers it, and the read times
    out."""
    conn = server.connection()
    released = False
    try:
        conn.request("GET", "/stream.lua", headers={"X-Fifo": fifo})
        response = conn.getresponse()
        assert response.status == 200
        received = b""
        while b"first piece\n" not in received:
            chunk = response.read1(65536)
            assert chunk, f"the response ended early: {received!r}"
            received += chunk
        assert received == b"first piece\n"
        go = None

        def page_waits():
            nonlocal go
            go = open_fifo_for_writing(fifo)
            return go is not None

        wait_for(page_waits, what="the page to wait for its go")
        os.close(go)
        released = True
        assert response.read() == b"second piece\n"
    finally:
        conn.close()
        if not released:   # do not leave the page waiting on the FIFO
            fd = open_fifo_for_writing(fifo)
            if fd is not None:
                os.close(fd)


@pytest.mark.parametrize("server_class", SERVERS, ids=lambda c: c.binary)
def test_a_site_behind_the_server(server_stack, server_class, tmp_path):
    s = server_stack(server_class)
    server = s.server
    for name, code in PAGES.items():
        s.write(name, code)

    status, headers, body = server.request("/hello.lua")
    assert (status, body) == (200, b"Hello from luafcgid\n"), server.output()
    assert header_values(headers, "content-type") == ["text/plain"]

    status, _, body = server.request("/query.lua/some/path?a=1&b=two+words")
    assert (status, body) == (200, b"a=1&b=two+words|two words|/some/path")

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = server.request("/post.lua", "POST", b"name=Ann&note=hi", form)
    assert (status, body) == (200, b"POST|application/x-www-form-urlencoded|16|name=Ann&note=hi")
    # A chunked request body, large enough that Apache streams it: CONTENT_LENGTH is its
    # true length whatever the server sent (Caddy: -1; Apache: none).
    chunks = [b"name=Bob", b"&note=", b"x" * 100000]
    status, _, body = server.request("/post.lua", "POST", iter(chunks), form,
                                     encode_chunked=True)
    assert status == 200
    assert body == b"POST|application/x-www-form-urlencoded|100014|" + b"".join(chunks)

    status, headers, body = server.request("/cookies.lua")
    assert (status, body) == (200, b"two cookies")
    assert header_values(headers, "set-cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]

    status, headers, _ = server.request("/redirect.lua")
    assert status == 302
    assert header_values(headers, "location") in (["/hello.lua"],
                                                  [f"http://127.0.0.1:{server.port}/hello.lua"])

    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    check_streaming(server, fifo)

    status, _, _ = server.request("/missing.lua")
    assert status == 404
    assert "ERROR" not in s.daemon.log(), s.daemon.log()


@pytest.mark.parametrize("prefix", ["proxy:fcgi://localhost", "PROXY:FCGI://127.0.0.1:9000",
                                    "proxy:balancer://cluster"])
def test_apache_proxy_prefixes_are_stripped(daemon, site, prefix):
    """mod_proxy_fcgi (ProxyFCGIBackendType FPM, its default) and mod_proxy_balancer put
    "proxy:fcgi://HOST" or "proxy:balancer://NAME" before the path, and "?query" after it
    behind a RewriteRule; the test above covers the first through Apache itself."""
    d = daemon()
    script = site.write("who.lua", "function main(env, con) con:puts(env.SCRIPT_FILENAME) end")
    client = RawClient(d.address)
    try:
        client.request({b"SCRIPT_FILENAME": f"{prefix}{script}?a=1".encode(),
                        b"REQUEST_METHOD": b"GET"})
        status, _, body = split_response(client.response()[0])
    finally:
        client.close()
    assert (status, body) == ("200 OK", script.encode())
