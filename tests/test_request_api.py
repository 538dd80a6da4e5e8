"""The Lua request API (env and con), end to end through nginx."""

import os
import re

import pytest

from conftest import RawClient, split_response, wait_for


def test_hello_through_nginx(shared_stack):
    shared_stack.write("hello.lua", """
        function main(env, con) con:puts("Hello, world!\\n") end
    """)
    status, headers, body = shared_stack.get("/hello.lua")
    assert status == 200
    assert body == b"Hello, world!\n"
    assert headers["content-type"] == "text/html"
    assert headers["x-powered-by"] == "Lua"


def test_globals_persist_between_requests(shared_stack):
    shared_stack.write("count.lua", """
        count = 0
        function main(env, con) count = count + 1; con:puts(count) end
    """)
    assert [shared_stack.get("/count.lua")[2] for _ in range(3)] == [b"1", b"2", b"3"]


def test_status_header_sets_the_status(shared_stack):
    shared_stack.write("created.lua", """
        function main(env, con) con:header("Status", "201 Created"); con:puts("made") end
    """)
    status, _, body = shared_stack.get("/created.lua")
    assert (status, body) == (201, b"made")


def test_content_type_replaces_the_default(shared_stack):
    shared_stack.write("json.lua", """
        function main(env, con)
          con:header("Content-Type", "application/json")
          con:header("X-One", "1")
          con:header("X-Raw: yes")
          con:puts("{}")
        end
    """)
    status, headers, body = shared_stack.get("/json.lua")
    assert headers["content-type"] == "application/json"
    assert headers["x-one"] == "1"
    assert headers["x-raw"] == "yes"
    assert body == b"{}"


def test_reset_and_flush(shared_stack):
    shared_stack.write("flush.lua", """
        function main(env, con)
          con:puts("a"); con:reset(); con:puts("b"); con:flush(); con:puts("c")
        end
    """)
    assert shared_stack.get("/flush.lua")[2] == b"bc"


def test_gets_returns_the_post_body(shared_stack):
    shared_stack.write("post.lua", """
        function main(env, con) local b = con:gets(); con:puts(#b, ":", b) end
    """)
    status, _, body = shared_stack.get("/post.lua", method="POST", body=b"a=1&b=hello",
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert body == b"11:a=1&b=hello"


def test_gets_on_an_empty_body_is_an_empty_string(shared_stack):
    shared_stack.write("empty.lua", """
        function main(env, con) local b = con:gets(); con:puts(type(b), "[", b, "]") end
    """)
    assert shared_stack.get("/empty.lua")[2] == b"string[]"


def test_env_has_every_param_and_the_version(shared_stack):
    shared_stack.write("env.lua", """
        function main(env, con)
          con:puts(env.REQUEST_METHOD, "|", env.QUERY_STRING, "|", env.SCRIPT_FILENAME, "|",
                   env.HTTP_X_TEST, "|", type(env.LUAFCGID_VERSION))
        end
    """)
    _, _, body = shared_stack.get("/env.lua?x=1&y=2", headers={"X-Test": "yes"})
    method, query, script, header, version = body.split(b"|")
    assert (method, query, header, version) == (b"GET", b"x=1&y=2", b"yes", b"number")
    assert script.decode() == shared_stack.site.file("env.lua")


def test_config_returns_configured_values(shared_stack):
    shared_stack.write("config.lua", """
        function main(env, con)
          con:puts(con:config("workers"), " ", con:config("handler"), " ",
                   tostring(con:config("buffering")), " ", con:config("headers")[1], " ",
                   tostring(con:config("nonexistent")))
        end
    """)
    assert shared_stack.get("/config.lua")[2] == b"3 main true X-Powered-By: Lua nil"


def test_log_writes_to_the_daemon_log(shared_stack):
    shared_stack.write("log.lua", """
        function main(env, con) con:log("a message from Lua"); con:puts("ok") end
    """)
    assert shared_stack.get("/log.lua")[2] == b"ok"
    assert "a message from Lua" in shared_stack.daemon.log()


def test_binary_body_round_trips(shared_stack):
    shared_stack.write("echo.lua", """
        function main(env, con)
          con:header("Content-Type", "application/octet-stream")
          con:puts(con:gets())
        end
    """)
    payload = bytes(range(256)) * 4096   # 1 MiB, every byte value, NULs included
    status, _, body = shared_stack.get("/echo.lua", method="POST", body=payload)
    assert status == 200 and body == payload


def test_body_larger_than_maxpost_gets_413_without_running_the_handler(shared_stack):
    marker = shared_stack.site.file("ran.txt")
    shared_stack.write("big.lua", f"""
        function main(env, con) io.open("{marker}", "w"):close(); con:puts("ran") end
    """)
    status, _, _ = shared_stack.get("/big.lua", method="POST", body=b"x" * (1048576 + 1))
    assert status == 413
    assert not os.path.exists(marker)
    # and the daemon still serves
    assert shared_stack.get("/big.lua", method="POST", body=b"small")[0] == 200


def test_header_injection_is_refused(shared_stack):
    shared_stack.write("inject.lua", """
        function main(env, con) con:header("X-A", "1\\r\\nSet-Cookie: evil=1"); con:puts("no") end
    """)
    status, headers, _ = shared_stack.get("/inject.lua")
    assert status == 500
    assert "set-cookie" not in headers


def test_relative_files_resolve_against_the_script_directory(shared_stack):
    shared_stack.write("dir_a/data.txt", "from a")
    shared_stack.write("dir_b/data.txt", "from b")
    shared_stack.write("dir_a/lib.lua", "return {name = 'lib a'}")
    shared_stack.write("dir_a/chunk.lua", "return 'chunk a'")
    shared_stack.write("dir_a/read.lua", """
        local lib = require("lib")
        function main(env, con)
          local f = io.open("data.txt"); con:puts(f:read("*a"), "|"); f:close()
          con:puts(lib.name, "|", dofile("chunk.lua"), "|", loadfile("chunk.lua")())
        end
    """)
    shared_stack.write("dir_b/read.lua", """
        function main(env, con) local f = io.open("data.txt"); con:puts(f:read("*a")); f:close() end
    """)
    assert shared_stack.get("/dir_a/read.lua")[2] == b"from a|lib a|chunk a|chunk a"
    assert shared_stack.get("/dir_b/read.lua")[2] == b"from b"


def test_the_python_bridge_is_unreachable(shared_stack):
    shared_stack.write("escape.lua", """
        function main(env, con)
          con:puts(type(python), " ", tostring(package.loaded.python))
          local reached = {}
          for k, v in pairs(debug.getregistry()) do
            if type(v) == "userdata" then
              local ok = pcall(function() return v.__class__ end)
              if ok then reached[#reached + 1] = tostring(k) end
            end
          end
          con:puts(" ", #reached)
        end
    """)
    assert shared_stack.get("/escape.lua")[2] == b"nil nil 0"


@pytest.mark.parametrize("value", ["abc", "", "2000 Big", "20 Short", "099 Low"])
def test_an_invalid_status_is_a_clear_500_and_the_connection_serves_on(stack, tmp_path, value):
    access_log = tmp_path / "access.log"
    s = stack(keepalive=8, access_log=str(access_log), showerrors=True)
    path = s.write("bad_status.lua", f"""
        function main(env, con)
          if env.QUERY_STRING == "bad" then con:header("Status", "{value}") end
          con:puts("fine")
        end
    """)
    status, _, body = s.get("/bad_status.lua?bad")
    assert status == 500 and b"Status" in body
    assert re.search(rf'Runtime Error in {re.escape(path)}: .*bad_status\.lua:3: con:header: '
                     rf'invalid Status "{value}"', s.daemon.log())
    assert s.get("/bad_status.lua")[::2] == (200, b"fine")
    # the access log line is written once the response went out
    wait_for(lambda: len(access_log.read_text().splitlines()) == 2, what="two log lines")
    # (each written by the worker that answered, so in either order)
    lines = [line.split() for line in access_log.read_text().splitlines()]
    assert {line[2]: line[3] for line in lines} == {"/bad_status.lua?bad": "500",
                                                   "/bad_status.lua": "200"}


def _raw_head(address, script):
    client = RawClient(address)
    try:
        client.request({b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET"})
        stdout = client.response()[0]
    finally:
        client.close()
    return stdout.partition(b"\r\n\r\n")[0].split(b"\r\n")


def test_a_raw_status_or_content_type_line_replaces_the_default(shared_stack):
    path = shared_stack.write("raw_status.lua", """
        function main(env, con)
          con:header("Status: 404 Not Found")
          con:header("content-type:text/html")
          con:header("X-Raw: yes")
          con:puts("gone")
        end
    """)
    status, headers, body = shared_stack.get("/raw_status.lua")
    assert (status, headers["content-type"], headers["x-raw"], body) == (
        404, "text/html", "yes", b"gone")
    head = _raw_head(shared_stack.daemon.address, path)
    names = [line.split(b":")[0].lower() for line in head]
    assert names.count(b"status") == names.count(b"content-type") == 1
    assert head[:2] == [b"Status: 404 Not Found", b"Content-Type: text/html"]
    assert b"X-Raw: yes" in head


def test_env_content_length_is_the_true_length_of_the_body(shared_stack):
    """Caddy sends CONTENT_LENGTH=-1 for a chunked request body and Apache none for a large
    one; env gets the length of the body luafcgid received (what con:gets() returns)."""
    script = shared_stack.write("length.lua", """
        function main(env, con) con:puts(tostring(env.CONTENT_LENGTH), "|", #con:gets()) end
    """)
    for sent, expected in ((b"-1", b"12|12"), (None, b"12|12"), (b"3", b"12|12")):
        params = {b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"POST"}
        if sent is not None:
            params[b"CONTENT_LENGTH"] = sent
        client = RawClient(shared_stack.daemon.address)
        try:
            client.request(params, body=b"name=Ann+Lee")
            assert split_response(client.response()[0])[2] == expected, sent
        finally:
            client.close()
    # without a body, what the web server sent (nginx: an empty string)
    assert shared_stack.get("/length.lua")[2] == b"|0"
