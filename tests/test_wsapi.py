"""WSAPI applications served unchanged: a script that returns an application instead of
defining main()."""

import pytest
from conftest import RawClient, split_response
from ecosystem import VMS, raw_headers, require_debian_wsapi, start_stack

from luafcgid.request import fastcgi as fcgi


@pytest.fixture(scope="module", params=VMS)
def vm_stack(request, tmp_path_factory):
    vm = request.param
    s = start_stack(tmp_path_factory.mktemp(f"wsapi-{vm}"), lua=vm, showerrors=True)
    yield vm, s
    s.stop()


def test_hello(vm_stack):
    _, s = vm_stack
    s.write("hello.lua", """
        return function(wsapi_env)
          local function body() coroutine.yield("Hello, WSAPI!") end
          return 200, {["Content-Type"] = "text/plain"}, coroutine.wrap(body)
        end
    """)
    status, headers, body = s.get("/hello.lua")
    assert (status, body) == (200, b"Hello, WSAPI!")
    assert headers["content-type"] == "text/plain"
    assert headers["x-powered-by"] == "Lua"   # luafcgid's global headers still apply


def test_table_application_reads_the_post_body(vm_stack):
    _, s = vm_stack
    s.write("post.lua", """
        local app = {}
        function app.run(wsapi_env)
          local length = tonumber(wsapi_env.CONTENT_LENGTH)
          local first = wsapi_env.input:read(3)
          local rest = wsapi_env.input:read(length - 3)
          local after = wsapi_env.input:read(1)
          local text = table.concat({wsapi_env.REQUEST_METHOD, wsapi_env.CONTENT_TYPE, first,
                                     rest, tostring(after)}, "|")
          return "200", {["Content-Type"] = "text/plain", ["Content-Length"] = #text},
                 function()
                   local t = text; text = nil; return t
                 end
        end
        return app
    """)
    status, headers, body = s.get("/post.lua", method="POST", body=b"a=1&b=hello",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert body == b"POST|application/x-www-form-urlencoded|a=1|&b=hello|nil"


def test_streamed_body_in_several_chunks(vm_stack):
    _, s = vm_stack
    s.write("stream.lua", """
        return function(wsapi_env)
          return 200, {["Content-Type"] = "text/plain"}, coroutine.wrap(function()
            for i = 1, 3 do coroutine.yield("chunk " .. i .. "\\n") end
          end)
        end
    """)
    status, _, body = s.get("/stream.lua")
    assert (status, body) == (200, b"chunk 1\nchunk 2\nchunk 3\n")


def test_status_and_repeated_headers(vm_stack):
    _, s = vm_stack
    s.write("status.lua", """
        return function(wsapi_env)
          return 404, {["Content-Type"] = "text/plain", ["X-Thing"] = "yes",
                       ["Set-Cookie"] = {"a=1", "b=2"}},
                 coroutine.wrap(function() coroutine.yield("nothing at " .. wsapi_env.PATH_INFO) end)
        end
    """)
    s.write("teapot.lua", """
        return {run = function() return "418 I'm a teapot", {}, function() end end}
    """)
    status, headers, body = raw_headers(s.nginx.port, "/status.lua")
    assert status == 404
    assert ("X-Thing", "yes") in headers
    assert [v for k, v in headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]
    assert body == b"nothing at /"   # PATH_INFO is "/" when the web server sends none
    status, _, body = s.get("/teapot.lua")
    assert (status, body) == (418, b"")


def test_env_error_stream_and_missing_variables(vm_stack):
    _, s = vm_stack
    s.write("env.lua", """
        return function(wsapi_env)
          wsapi_env.error:write("wsapi says ", 42, "\\n")
          local text = table.concat({wsapi_env.QUERY_STRING, wsapi_env.SCRIPT_NAME,
            "[" .. wsapi_env.NO_SUCH_VARIABLE .. "]", wsapi_env.APP_PATH,
            wsapi_env.HTTP_X_TEST}, "|")
          return 200, {}, coroutine.wrap(function() coroutine.yield(text) end)
        end
    """)
    status, _, body = s.get("/env.lua?x=1", headers={"X-Test": "t"})
    assert status == 200
    assert body.decode() == f"x=1|/env.lua|[]|{s.site.path}|t"
    assert "wsapi says 42" in s.daemon.log()


def test_application_errors_are_500_pages(vm_stack):
    _, s = vm_stack
    s.write("broken.lua", """
        return function(wsapi_env) error("the app failed") end
    """)
    s.write("broken_body.lua", """
        return function(wsapi_env)
          return 200, {}, coroutine.wrap(function() error("the body failed") end)
        end
    """)
    status, _, body = s.get("/broken.lua")
    assert status == 500 and b"Runtime Error" in body and b"the app failed" in body
    status, _, body = s.get("/broken_body.lua")
    assert status == 500 and b"the body failed" in body
    assert "the app failed" in s.daemon.log()


def test_the_application_is_found_as_the_wsapi_launchers_find_it(vm_stack):
    """The chunk gets its module name; the application is what it returns, else what it left
    in package.loaded[name]; a returned string names a module to require."""
    _, s = vm_stack
    s.write("modstyle.lua", """
        local name = ...
        local M = {}
        package.loaded[name] = M    -- what module(..., package.seeall) does
        function M.run(wsapi_env)
          return 200, {}, coroutine.wrap(function() coroutine.yield("module " .. name) end)
        end
    """)
    s.write("named.lua", 'return "named_app"')
    s.write("named_app.lua", """
        local name = ...    -- require's argument
        return {run = function() return 200, {}, coroutine.wrap(function()
          coroutine.yield("required " .. name) end) end}
    """)
    s.write("nothing.lua", "local x = 1")
    assert s.get("/modstyle.lua")[:3:2] == (200, b"module modstyle")
    assert s.get("/named.lua")[:3:2] == (200, b"required named_app")
    status, _, body = s.get("/nothing.lua")
    assert status == 500 and b"main() function not found" in body


def test_main_wins_over_a_returned_application(vm_stack):
    _, s = vm_stack
    s.write("both.lua", """
        function main(env, con) con:puts("main") end
        return function() return 200, {}, function() end end
    """)
    assert s.get("/both.lua")[2] == b"main"


def test_wsapi_request_and_response_helpers(vm_stack):
    vm, s = vm_stack
    require_debian_wsapi(vm)
    s.write("helpers.lua", """
        local request = require("wsapi.request")
        local response = require("wsapi.response")

        return function(wsapi_env)
          local req = request.new(wsapi_env)
          local res = response.new()
          res:content_type("text/plain")
          res:set_cookie("seen", "yes")
          res:write("hello ", req.GET.name, ", you said ", req.POST.msg)
          return res:finish()
        end
    """)
    status, headers, body = s.get("/helpers.lua?name=Ann", method="POST", body=b"msg=hi+there",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200
    assert body == b"hello Ann, you said hi there"
    assert headers["content-type"] == "text/plain"
    assert headers["set-cookie"].startswith("seen=yes")
    assert headers["content-length"] == str(len(body))


def test_each_chunk_is_sent_as_it_comes(daemon, site):
    """Every chunk of the body iterator goes out as its own FastCGI record, before the
    iterator is asked for the next one."""
    d = daemon()
    script = site.write("chunks.lua", """
        return function(wsapi_env)
          return 200, {["Content-Type"] = "text/plain"}, coroutine.wrap(function()
            coroutine.yield("one"); coroutine.yield("two"); coroutine.yield("three")
          end)
        end
    """)
    client = RawClient(d.address)
    try:
        client.request({b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET"})
        records = []
        while True:
            rtype, _, content = client.read_record()
            if rtype == fcgi.END_REQUEST:
                break
            records.append(content)
    finally:
        client.close()
    assert [r for r in records if r][1:] == [b"two", b"three"]
    status, headers, body = split_response(b"".join(records))
    assert (status, headers["content-type"], body) == ("200 OK", "text/plain", b"onetwothree")


@pytest.mark.parametrize("content_length", [b"-1", None], ids=["caddy-chunked", "missing"])
def test_wsapi_request_reads_a_body_without_a_usable_content_length(vm_stack, content_length):
    """Caddy sends CONTENT_LENGTH=-1 for a chunked request body, Apache none for a large
    one; wsapi.request reads CONTENT_LENGTH bytes, so the app and env get the true length."""
    vm, s = vm_stack
    require_debian_wsapi(vm)
    script = s.write("length.lua", """
        local request = require("wsapi.request")
        return function(wsapi_env)
          local req = request.new(wsapi_env)
          local text = req.POST.name .. "|" .. wsapi_env.CONTENT_LENGTH .. "|" ..
                       wsapi_env.input.length
          return 200, {}, coroutine.wrap(function() coroutine.yield(text) end)
        end
    """)
    params = {b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"POST",
              b"CONTENT_TYPE": b"application/x-www-form-urlencoded"}
    if content_length is not None:
        params[b"CONTENT_LENGTH"] = content_length
    client = RawClient(s.daemon.address)
    try:
        client.request(params, body=b"name=Ann+Lee")
        data, _, _ = client.response()
    finally:
        client.close()
    status, _, body = split_response(data)
    assert (status, body) == ("200 OK", b"Ann Lee|12|12")
