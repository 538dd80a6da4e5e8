"""Faults inside one request stay inside it: the daemon keeps serving, the state is released
(or discarded when it cannot be trusted) and no pool slot leaks; the pool's counters are
logged at stop, so the tests read them from the running daemon's log."""

import re

import pytest

from conftest import RawClient, wait_for


def pool_at_stop(s):
    assert s.stop() == 0
    (line,) = [l for l in s.daemon.log().splitlines() if "pool at stop:" in l]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


@pytest.mark.parametrize("buffering", [True, False])
def test_a_client_that_closes_mid_request(stack, buffering):
    s = stack(workers=1, states=1, buffering=buffering)
    s.write("slow.lua", """
        function main(env, con)
          con:puts("part one ")
          con:flush()
          os.execute("sleep 0.5")
          for i = 1, 100 do con:puts(string.rep("x", 10000)) end
          con:flush()
        end
    """)
    for _ in range(3):
        client = RawClient(s.daemon.address)
        client.request({b"SCRIPT_FILENAME": s.site.file("slow.lua").encode()})
        assert client.read_record() is not None   # the script is running
        client.close()
    s.write("hello.lua", "function main(env, con) con:puts('hello') end")
    assert s.get("/hello.lua")[2] == b"hello"
    assert "client went away" in s.daemon.log()
    stats = pool_at_stop(s)
    assert stats["busy"] == 0 and stats["discarded"] == 0


def test_an_error_in_the_finish_handler_is_only_logged(stack):
    # one worker: the finish handler runs after nginx has the response, so with more the
    # next request could find the state still busy and get a clone (count 1 again)
    s = stack(finishhandler="after", workers=1)
    s.write("after.lua", """
        count = 0
        function main(env, con) count = count + 1; con:puts(count) end
        function after(env, con) error("finish failed " .. count) end
    """)
    assert [s.get("/after.lua")[2] for _ in range(3)] == [b"1", b"2", b"3"]   # state kept
    # the finish handler runs after nginx has the response: wait for its log line
    wait_for(lambda: "finish failed 3" in s.daemon.log(), what="the third finish handler")
    assert "Runtime Error in after()" in s.daemon.log()
    assert pool_at_stop(s)["busy"] == 0


# name -> (code, the status nginx answers): 500, or 200 when the error came after the
# headers went out (the response then ends where the script stopped)
CALLBACK_ERRORS = {
    "puts-a-table": ("con:puts({})", 500),
    "header-nil": ("con:header(nil, 'x')", 500),
    "header-after-flush": ("con:puts('x'); con:flush(); con:header('X-Late', '1')", 200),
    "raw-send-odd-argument": ("for i = 1, 10 do local n, v = debug.getupvalue("
                              "getmetatable(con).flush, i) if n == 'send' then v({}) end end "
                              "error('send took odd arguments')", 500),
    "raw-log-odd-argument": ("for i = 1, 10 do local n, v = debug.getupvalue("
                             "getmetatable(con).log, i) if n == 'log' then v(1, {}) end end "
                             "error('log took odd arguments')", 500),
    "error-with-a-table": ("error({})", 500),
}


@pytest.mark.parametrize("name", list(CALLBACK_ERRORS))
def test_a_lua_error_in_a_con_call_is_a_500_and_nothing_else(shared_stack, name):
    s = shared_stack
    code, expected = CALLBACK_ERRORS[name]
    s.write(f"cb_{name}.lua", f"""
        count = 0
        function main(env, con)
          count = count + 1
          if env.QUERY_STRING == "fail" then {code} end
          con:puts(count)
        end
    """)
    assert s.get(f"/cb_{name}.lua")[2] == b"1"
    status, _, body = s.get(f"/cb_{name}.lua?fail")
    assert status == expected
    assert b"Runtime Error" in body if expected == 500 else body == b"x"
    assert s.get(f"/cb_{name}.lua")[2] == b"3"   # the same state, released and reused


def test_a_caught_error_from_a_python_callback_does_not_linger(shared_stack):
    shared_stack.write("caught.lua", """
        function main(env, con)
          for i = 1, 10 do
            local n, v = debug.getupvalue(getmetatable(con).log, i)
            if n == "log" then con:puts(tostring(pcall(v, 1, 2)), " ") end
          end
          con:puts("fine")
        end
    """)
    assert shared_stack.get("/caught.lua")[:3:2] == (200, b"false fine")
    assert shared_stack.get("/caught.lua")[:3:2] == (200, b"false fine")


def test_no_slot_leaks_after_a_mix_of_faults(stack):
    s = stack(workers=2, states=3, request_timeout=0.3, memory_limit="16M")
    s.write("spin.lua", "function main(env, con) while true do end end")
    s.write("bomb.lua", "function main(env, con) local t = {} while true do t[#t+1] = "
                        "string.rep('x', 1e5) .. #t end end")
    s.write("err.lua", "function main(env, con) error('boom') end")
    s.write("syntax.lua", "function main(env, con) con:puts( end")
    s.write("ok.lua", "function main(env, con) con:puts('ok') end")
    for path in ("/spin.lua", "/bomb.lua", "/err.lua", "/syntax.lua", "/missing.lua"):
        assert s.get(path, timeout=60)[0] in (404, 500)
        assert s.get("/ok.lua")[2] == b"ok"
    stats = pool_at_stop(s)
    assert stats["busy"] == 0 and stats["loading"] == 0
    assert stats["discarded"] == 2   # the runaway and the memory bomb
