"""Missing scripts, Lua errors and the 500 page, through nginx."""

import os
import pathlib

from conftest import Stack, wait_for


def test_missing_script_is_404_naming_no_path_even_with_showerrors(shared_stack):
    status, _, body = shared_stack.get("/nowhere.lua")   # the shared stack shows errors
    assert status == 404 and b"<p>File not found.</p>" in body
    assert b"nowhere" not in body and shared_stack.site.path.encode() not in body


def test_empty_script_is_404(shared_stack):
    shared_stack.write("empty_file.lua", "")
    assert shared_stack.get("/empty_file.lua")[0] == 404


def test_directory_named_like_a_script_is_404(shared_stack):
    os.makedirs(shared_stack.site.file("dir.lua"), exist_ok=True)
    assert shared_stack.get("/dir.lua")[0] == 404


def test_syntax_error_is_500_with_kind_file_and_line(shared_stack):
    path = shared_stack.write("syntax.lua", "function main(env, con)\n  con:puts('x'\nend\n")
    status, _, body = shared_stack.get("/syntax.lua")
    assert status == 500
    assert b"Syntax Error" in body
    assert f"{path}:3:".encode() in body
    assert f"Syntax Error in {path}: {path}:3:" in shared_stack.daemon.log()


def test_runtime_error_in_handler_shows_message_with_line(shared_stack):
    path = shared_stack.write("runtime.lua", """\
        function main(env, con)
          local t = nil
          return t.x
        end
    """)
    status, _, body = shared_stack.get("/runtime.lua")
    assert status == 500
    assert b"Runtime Error" in body
    assert f"{path}:3: attempt to index".encode() in body
    assert f"Runtime Error in {path}: {path}:3:" in shared_stack.daemon.log()


def test_missing_handler_is_a_runtime_error(shared_stack):
    shared_stack.write("nohandler.lua", "x = 1\n")
    status, _, body = shared_stack.get("/nohandler.lua")
    assert status == 500
    assert b"main() function not found" in body


def test_load_time_error_discards_the_state(shared_stack):
    counter = shared_stack.site.file("loads.txt")
    shared_stack.write("loadfail.lua", f"""
        local f = io.open("{counter}", "a"); f:write("x"); f:close()
        error("broken at load")
    """)
    for _ in range(3):
        status, _, body = shared_stack.get("/loadfail.lua")
        assert status == 500 and b"broken at load" in body
    with open(counter) as stream:
        assert stream.read() == "xxx"   # loaded anew each time: no broken state was kept


def test_handler_error_keeps_the_state(shared_stack):
    shared_stack.write("flaky.lua", """
        n = 0
        function main(env, con)
          n = n + 1
          if n == 1 then error("first request fails") end
          con:puts(n)
        end
    """)
    assert shared_stack.get("/flaky.lua")[0] == 500
    assert shared_stack.get("/flaky.lua")[2] == b"2"


def test_error_pages_show_no_lua_message_by_default(stack):
    s = stack()   # showerrors is off unless set, as PHP's production display_errors
    s.write("secret.lua", 'function main() error("password=hunter2") end')
    status, _, body = s.get("/secret.lua")
    assert status == 500
    assert b"hunter2" not in body and b"Runtime Error" not in body
    assert b"500 Internal Server Error" in body
    assert "password=hunter2" in s.daemon.log()


def test_error_after_flush_ends_the_response_and_is_logged(shared_stack):
    shared_stack.write("late.lua", """
        function main(env, con) con:puts("partial"); con:flush(); error("after flush") end
    """)
    status, _, body = shared_stack.get("/late.lua")
    assert status == 200 and body == b"partial"
    assert "after flush" in shared_stack.daemon.log()


def test_a_script_deleted_after_its_location_was_cached_is_404(stack):
    # a long sweep keeps the location cached; the file watcher still flushes the state
    s = stack(sweep=600000)
    path = s.write("deleted.lua", "function main(env, con) con:puts('here') end")
    assert s.get("/deleted.lua")[2] == b"here"
    os.unlink(path)
    wait_for(lambda: f"reloading {path}" in s.daemon.log(), what="the state to be flushed")
    status, _, body = s.get("/deleted.lua")
    assert status == 404 and b"File not found." in body


def test_a_script_whose_name_is_not_utf8_is_served(stack):
    s = stack()
    name = os.path.join(os.fsencode(s.site.path), b"caf\xe9.lua")
    with open(name, "w") as stream:
        stream.write("function main(env, con) con:puts(env.SCRIPT_FILENAME) end")
    status, _, body = s.get("/caf%E9.lua")
    assert (status, body) == (200, name)


def test_error_kinds_are_spelled_once_and_both_sides_know_the_same():
    """errors.py names every kind; runtime.lua only refers to the ones it is handed
    (KIND.<name>), all of them, and no other module spells one out, so a typo cannot keep
    an untrusted state or show a kind nobody defined."""
    import glob
    import re

    from conftest import ROOT

    from luafcgid.states import errors
    package = os.path.join(ROOT, "luafcgid")
    lua = {path: open(path).read() for path in glob.glob(f"{package}/lua/**/*.lua",
                                                             recursive=True)}
    used = {name for text in lua.values() for name in re.findall(r"\bKIND\.(\w+)", text)}
    assert used == set(errors.LUA_KINDS)
    kinds = {errors.RUNTIME, errors.SYNTAX, errors.FILE, errors.MEMORY, errors.TIMEOUT,
             errors.UNKNOWN, errors.CLIENT_GONE}
    # the daemon's own: only its clock says a call ran too long, only its output that the
    # client went away
    assert set(errors.LUA_KINDS.values()) | {errors.TIMEOUT, errors.CLIENT_GONE} == kinds
    assert errors.FATAL < kinds
    python = {path: open(path).read() for path in glob.glob(f"{package}/**/*.py",
                                                                recursive=True)
              if not path.endswith(os.path.join("states", "errors.py"))}
    for path, text in {**lua, **python}.items():
        spelled = [kind for kind in kinds if f'"{kind}"' in text]
        assert not spelled, f"{path} spells out {spelled}"


def test_an_unreadable_script_is_403_as_nginx_and_php_fpm_answer(open_dir):
    # root reads any file: the daemon runs as nobody when the tests run as root
    user = {"user": "nobody", "group": "nogroup"} if os.geteuid() == 0 else {}
    s = Stack(pathlib.Path(open_dir), user).start()
    try:
        s.write("ok.lua", "function main(env, con) con:puts('ok') end")
        path = s.write("locked.lua", "function main(env, con) con:puts('locked') end")
        os.chmod(path, 0)
        status, _, body = s.get("/locked.lua")
        assert status == 403 and b"locked" not in body
        log = s.daemon.log()
        assert f"refused {path}: {path} is not readable" in log and "File Error" not in log
        assert s.get("/ok.lua")[::2] == (200, b"ok")
    finally:
        s.stop()
