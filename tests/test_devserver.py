"""`luafcgid serve`: the development HTTP front over the same pool."""

import glob
import http.client
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, can_connect, free_port, skip_unless, wait_for


@pytest.fixture
def devserver(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "luafcgid", "serve", str(root), "--http",
                             f"127.0.0.1:{port}", "-s", "sweep=100", "-s", "showerrors=true"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: can_connect(("127.0.0.1", port)) or proc.poll() is not None,
             what="the development server")

    def request(path, method="GET", body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, body=body)
        response = conn.getresponse()
        result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        conn.close()
        return result

    yield root, request
    proc.send_signal(signal.SIGINT)
    proc.wait(15)


def test_serves_lua_pages_static_files_and_errors(devserver):
    root, request = devserver
    (root / "index.lua").write_text(
        'n = 0 function main(env, con) n = n + 1 con:header("Status", "201 Created") '
        'con:header("X-N", n) con:puts(env.REQUEST_METHOD, " ", env.QUERY_STRING, " ", '
        'con:gets()) end')
    (root / "style.css").write_text("body {}")
    (root / "broken.lua").write_text("function main() error('oops') end")

    status, headers, body = request("/?a=1", method="POST", body=b"payload")
    assert (status, headers["x-n"], body) == (201, "1", b"POST a=1 payload")
    assert request("/index.lua")[1]["x-n"] == "2"   # the same persistent state
    assert request("/style.css")[2] == b"body {}"
    assert request("/missing.lua")[0] == 404
    status, _, body = request("/broken.lua")
    assert status == 500 and b"oops" in body


def test_help_says_it_is_not_for_production():
    result = subprocess.run([sys.executable, "-m", "luafcgid", "serve", "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "NOT FOR PRODUCTION" in result.stdout


def test_the_readme_quick_start_serves_the_examples():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "luafcgid", "serve", "examples", "--http",
                             f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: can_connect(("127.0.0.1", port)), what="the development server")
        for page, text in (("/hello.lua", b"Hello, world!"), ("/", b"luafcgid examples"),
                           ("/counter.lua", b"has served 1 request")):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", page)
            response = conn.getresponse()
            assert response.status == 200 and text in response.read(), page
            conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


def test_pages_run_in_their_own_directory(devserver):
    """C modules' relative paths too: each connection's thread changes into the page's
    directory, and static files are still served from the root."""
    root, request = devserver
    skip_unless(glob.glob("/usr/lib/*/lua/5.1/luasql/sqlite3.so"),
                "lua-sql-sqlite3 is not installed (apt-get install lua-sql-sqlite3)")
    (root / "app").mkdir()
    (root / "app" / "notes.lua").write_text("""
        local db = assert(require("luasql.sqlite3").sqlite3():connect("app.db"))
        assert(db:execute("CREATE TABLE IF NOT EXISTS notes (note TEXT)"))
        function main(env, con) con:puts(require("lfs").currentdir()) end
    """)
    (root / "style.css").write_text("body {}")
    assert request("/app/notes.lua")[2].decode() == os.path.realpath(root / "app")
    assert (root / "app" / "app.db").exists()
    assert request("/style.css")[2] == b"body {}"
