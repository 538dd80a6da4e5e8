"""No script can crash, freeze or outlive its deadline (issue 11). Each hostile script runs on
one worker while a neighbour script is requested on another, through nginx, on LuaJIT and
Lua 5.4: every neighbour request must succeed, and the daemon must be alive after."""

import json
import os
import re
import signal
import threading

import pytest

from conftest import Stack, wait_for
from hostile import BYPASSES, FINALIZED, HELLO, RECURSIONS

VMS = ["luajit", "5.4"]
TIMEOUT = 0.5   # request_timeout
GRACE = 0.5     # stuck_timeout
NEIGHBOUR_LIMIT = 2000   # neighbour requests at most, per hostile request

# A finalizer that never returns, run inside the request: no hook can stop it.
STUCK_FOREVER = FINALIZED + """
function main(env, con)
  finalized(function() while true do end end)
  collectgarbage()
end
"""


def start(tmp_path, lua, **settings):
    s = Stack(tmp_path, {"lua": lua, "workers": 2, "request_timeout": TIMEOUT,
                         "stuck_timeout": GRACE, "showerrors": True, **settings}).start()
    s.write("hello.lua", HELLO)
    return s


@pytest.fixture(scope="module", params=VMS)
def site(request, tmp_path_factory):
    """One daemon per VM for the hostile scripts that leave no worker stuck."""
    s = start(tmp_path_factory.mktemp(f"isolation-{request.param}"), request.param)
    yield s
    s.stop()


@pytest.fixture(scope="module", params=VMS)
def untimed(request, tmp_path_factory):
    """One daemon per VM without request_timeout (with LuaJIT's JIT compiler on): a deep
    recursion may take longer than TIMEOUT on a busy machine."""
    s = start(tmp_path_factory.mktemp(f"untimed-{request.param}"), request.param,
              request_timeout=0)
    yield s
    s.stop()


@pytest.fixture(params=VMS)
def lua(request):
    return request.param


def beside_neighbour(s, path):
    """Request `path` while the neighbour is requested again and again (each response
    checked) until it is answered. Returns its (status, headers, body) and how many
    neighbour requests were served meanwhile."""
    answer = {}
    hostile = threading.Thread(target=lambda: answer.update(response=s.get(path, timeout=60)))
    hostile.start()
    served = 0
    try:
        while hostile.is_alive() and served < NEIGHBOUR_LIMIT:
            assert s.get("/hello.lua", timeout=30)[::2] == (200, b"hello")
            served += 1
    finally:
        hostile.join(60)
    assert "response" in answer, "the hostile request was never answered"
    return answer["response"], served


def assert_alive(s):
    assert s.daemon.proc.poll() is None
    assert s.get("/hello.lua")[::2] == (200, b"hello")


# -- the deadline ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BYPASSES))
def test_the_deadline_stops_a_script_that_tries_to_outlive_it(site, name):
    site.write(f"{name}.lua", f"function main(env, con) {BYPASSES[name]} end")
    (status, _, body), served = beside_neighbour(site, f"/{name}.lua")
    assert status == 500 and b"Timeout Error" in body
    assert b"could not be stopped" not in body   # stopped by the hook, not given up on
    assert served >= 1
    assert_alive(site)


def test_a_gc_loop_during_a_request_is_given_up_on_and_reported(tmp_path, lua):
    # Lua runs no hooks inside a finalizer: the worker is stuck until the finalizer ends
    s = start(tmp_path, lua, status_path="/status.lua")
    release = tmp_path / "release"
    try:
        s.write("gcloop.lua", FINALIZED + f"""
            function main(env, con)
              finalized(function() while not io.open("{release}") do end end)
              collectgarbage()   -- the finalizer runs now, inside this request
              con:puts("finished")
            end
        """)
        (status, _, body), served = beside_neighbour(s, "/gcloop.lua")
        assert status == 500 and b"could not be stopped" in body
        assert served >= 1
        # the watcher answers the client (abandon) before it logs the stuck worker
        wait_for(lambda: "stuck: still running" in s.daemon.log(), what="the stuck line")
        page = json.loads(s.get("/status.lua?json")[2])
        assert len(page["stuck"]) == 1
        assert page["stuck"][0]["request"].startswith("GET /gcloop.lua")
        assert_alive(s)   # on the other worker
        release.touch()   # the finalizer ends; the stop hook waiting for it fires
        wait_for(lambda: "returned; serving again" in s.daemon.log(),
                 what="the stuck worker to come back")
        assert json.loads(s.get("/status.lua?json")[2])["stuck"] == []
    finally:
        release.touch()
        assert s.stop() == 0


def test_a_worker_stuck_forever_does_not_hold_up_shutdown(tmp_path, lua):
    s = start(tmp_path, lua, shutdown_timeout=30)
    s.write("stuck.lua", STUCK_FOREVER)
    (status, _, body), _ = beside_neighbour(s, "/stuck.lua")
    assert status == 500 and b"could not be stopped" in body
    assert_alive(s)
    assert s.stop() == 0   # at once: a stuck worker is not waited for
    assert "still running after shutdown_timeout or stuck" in s.daemon.log()


def test_with_processes_the_supervisor_replaces_a_process_with_a_stuck_worker(tmp_path, lua):
    s = start(tmp_path, lua, processes=2, workers=1)
    try:
        s.write("stuck.lua", STUCK_FOREVER)
        (status, _, body), served = beside_neighbour(s, "/stuck.lua")
        assert status == 500 and b"could not be stopped" in body
        assert served >= 1
        wait_for(lambda: "stuck in Lua; replacing it" in s.daemon.log(),
                 what="the supervisor to replace the process")
        wait_for(lambda: re.search(r"is replaced by process \d+ \(pid \d+\); stopping it",
                                   s.daemon.log()), what="its successor")
        for _ in range(20):
            assert_alive(s)
    finally:
        assert s.stop() == 0


# -- crashes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RECURSIONS))
def test_recursion_through_c_is_an_error_not_a_crash(untimed, name):
    untimed.write(f"{name}.lua", f"function main(env, con) {RECURSIONS[name]} end")
    (status, _, body), _ = beside_neighbour(untimed, f"/{name}.lua")
    assert status == 500 and b"Runtime Error" in body and b"stack overflow" in body
    assert_alive(untimed)


def corrupted_bytecode(s):
    """A precompiled chunk of the running VM (written by a page of the daemon itself) with one
    byte of its code overwritten. Before states loaded source only, loading and running it
    killed the daemon (SIGSEGV) on LuaJIT and on Lua 5.4; the byte was found by overwriting
    each in turn."""
    s.write("dump.lua", """
        function main(env, con)
          local chunk = string.dump(load("local t = {'a'} return t[1] .. 'x'"), true)
          local at = jit and 14 or 44
          con:puts(chunk:sub(1, at - 1), "\\255", chunk:sub(at + 1))
        end
    """)
    status, _, data = s.get("/dump.lua")
    assert status == 200 and data[:1] == b"\x1b"
    return data


LOADERS = {
    "load": 'load(io.open(BC, "rb"):read("*a"))',
    "loadstring": '(loadstring or load)(io.open(BC, "rb"):read("*a"))',
    "loadfile": "loadfile(BC)",
    "dofile": "dofile(BC)",
    "require": 'nil, select(2, pcall(function() package.path = DIR .. "/?.bc;" .. package.path '
               'return require("corrupt") end))',
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_corrupted_bytecode_is_refused(site, loader):
    path = site.write("corrupt.bc", corrupted_bytecode(site), mode="wb")
    site.write(f"bc_{loader}.lua", f"""
        local BC, DIR = "{path}", "{os.path.dirname(path)}"
        function main(env, con)
          local chunk, message = {LOADERS[loader]}
          if chunk then chunk() end
          error(message or "loaded", 0)
        end
    """)
    (status, _, body), _ = beside_neighbour(site, f"/bc_{loader}.lua")
    assert status == 500
    assert b"binary chunk" in body or b"wrong mode" in body
    assert_alive(site)


def test_a_corrupted_precompiled_script_is_refused(site):
    site.write("precompiled.lua", corrupted_bytecode(site), mode="wb")
    status, _, body = site.get("/precompiled.lua")
    assert status == 500 and b"Syntax Error" in body
    assert b"binary chunk" in body or b"wrong mode" in body
    assert_alive(site)


def test_bytecode_runs_where_allowed(tmp_path, lua):
    s = start(tmp_path, lua, bytecode=True)
    try:
        source = s.write("source.lua", "function main(env, con) con:puts('compiled') end")
        s.write("compile.lua", f"""
            function main(env, con) con:puts(string.dump(assert(loadfile("{source}")))) end
        """)
        status, _, compiled = s.get("/compile.lua")
        assert status == 200
        s.write("compiled.lua", compiled, mode="wb")
        assert s.get("/compiled.lua")[::2] == (200, b"compiled")
    finally:
        assert s.stop() == 0


# -- freezes: closing a state runs its finalizers -----------------------------------------

def test_a_slow_finalizer_stalls_no_other_request(tmp_path, lua):
    # max_requests: 1 closes the state after its request; its finalizer blocks until the
    # test writes to the FIFO, and meanwhile every neighbour request is served
    s = start(tmp_path, lua, max_requests=1)
    fifo, started = tmp_path / "fifo", tmp_path / "started"
    os.mkfifo(fifo)
    try:
        s.write("slowgc.lua", FINALIZED + f"""
            held = finalized(function()
              io.open("{started}", "w"):close()
              local f = io.open("{fifo}", "r")
              f:read("*a")
              f:close()
            end)
            function main(env, con) con:puts("closing") end
        """)
        assert s.get("/slowgc.lua")[::2] == (200, b"closing")
        wait_for(started.exists, what="the finalizer to start")
        for _ in range(20):
            assert_alive(s)
        with open(fifo, "w") as writer:
            writer.write("done")
    finally:
        assert s.stop() == 0


def test_an_endless_finalizer_then_sighup_freezes_nothing(tmp_path, lua):
    s = start(tmp_path, lua, shutdown_timeout=30)
    started = tmp_path / "started"
    s.write("endless.lua", FINALIZED + f"""
        held = finalized(function()
          io.open("{started}", "w"):close()
          while true do end
        end)
        function main(env, con) con:puts("loaded") end
    """)
    assert s.get("/endless.lua")[::2] == (200, b"loaded")
    s.daemon.signal(signal.SIGHUP)   # a new pool; the old one's states close
    wait_for(started.exists, what="the finalizer to start")
    for _ in range(20):
        assert_alive(s)
    assert s.get("/endless.lua")[::2] == (200, b"loaded")   # a fresh state
    assert s.stop() == 0   # SIGTERM is still obeyed, within request_timeout
    assert "close has run for" in s.daemon.log()


# The script frees memory and fills what was freed, then loops until its deadline.
REUSED = """
function main(env, con)
  collectgarbage()
  collectgarbage()
  local junk = {}
  for i = 1, 50000 do junk[i] = ("\\255"):rep(i % 200) .. i end
  while true do end
end
"""


def test_a_script_stopped_after_a_collection_does_not_crash_the_daemon(tmp_path):
    # In LuaJIT nothing referred to the flag thread the watcher also arms the stop hook on
    # (runtime.lua): the collector freed it, the script's strings took its memory, and
    # arming the hook there killed the daemon (SIGSEGV: nginx answered 502).
    s = start(tmp_path, "luajit")
    try:
        s.write("reused.lua", REUSED)
        for _ in range(3):
            status, _, body = s.get("/reused.lua", timeout=30)
            assert status == 500 and b"Timeout Error" in body
        assert_alive(s)
    finally:
        s.stop()
