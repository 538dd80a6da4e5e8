"""Requests through libfcgi's cgi-fcgi: a FastCGI client we did not write."""

from conftest import libfcgi_request


def test_get_with_headers(daemon, site):
    d = daemon()
    site.write("hi.lua", """
        function main(env, con)
          con:header("X-Method", env.REQUEST_METHOD)
          con:puts("hi ", env.QUERY_STRING)
        end
    """)
    status, headers, body = libfcgi_request(
        d.address, {"SCRIPT_FILENAME": site.file("hi.lua"), "QUERY_STRING": "q=1"})
    assert status == "200 OK"
    assert headers["x-method"] == "GET"
    assert body == b"hi q=1"


def test_post_body(daemon, site):
    d = daemon()
    site.write("echo.lua", "function main(env, con) con:puts(con:gets()) end")
    payload = bytes(range(256)) * 400
    status, _, got = libfcgi_request(
        d.address, {"SCRIPT_FILENAME": site.file("echo.lua"), "REQUEST_METHOD": "POST"}, payload)
    assert status == "200 OK" and got == payload


def test_404_and_500(daemon, site):
    d = daemon(showerrors=True)
    site.write("bad.lua", "function main() error('boom') end")
    assert libfcgi_request(d.address, {"SCRIPT_FILENAME": site.file("none.lua")})[0] == "404 Not Found"
    status, _, body = libfcgi_request(d.address, {"SCRIPT_FILENAME": site.file("bad.lua")})
    assert status == "500 Internal Server Error" and b"boom" in body


def test_tcp_listener(daemon, site):
    from conftest import free_port

    d = daemon(listen=f"127.0.0.1:{free_port()}")
    site.write("tcp.lua", "function main(env, con) con:puts('over tcp') end")
    assert libfcgi_request(d.address, {"SCRIPT_FILENAME": site.file("tcp.lua")})[2] == b"over tcp"
