"""Changed scripts are reloaded: same-second edits, busy states, deleted files."""

import os
import threading

from conftest import Fifo, wait_for


def _body(stack, path):
    return stack.get(path)[2]


def test_edit_keeping_the_mtime_is_picked_up_by_its_size(shared_stack):
    path = shared_stack.write("edit.lua", 'function main(env, con) con:puts("one") end')
    assert _body(shared_stack, "/edit.lua") == b"one"
    before = os.stat(path)
    shared_stack.write("edit.lua", 'function main(env, con) con:puts("second") end')
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))   # the very same mtime
    wait_for(lambda: _body(shared_stack, "/edit.lua") == b"second", what="the reload")


def test_same_size_edit_keeping_the_mtime_is_picked_up_by_its_ctime(shared_stack):
    # what `cp -p` or `rsync -t --inplace` leave: same inode, size and mtime
    path = shared_stack.write("kept.lua", 'function main(env, con) con:puts("AAA") end')
    assert _body(shared_stack, "/kept.lua") == b"AAA"
    before = os.stat(path)

    def rewrite():
        shared_stack.write("kept.lua", 'function main(env, con) con:puts("BBB") end')
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        # the kernel's clock moves in ticks: within the first write's tick the ctime
        # stays too, and no signature could tell
        return os.stat(path).st_ctime_ns != before.st_ctime_ns

    wait_for(rewrite, what="a rewrite in a later clock tick")
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    wait_for(lambda: _body(shared_stack, "/kept.lua") == b"BBB", what="the reload")


def test_same_size_edit_is_picked_up(shared_stack):
    shared_stack.write("same.lua", 'function main(env, con) con:puts("AAA") end')
    assert _body(shared_stack, "/same.lua") == b"AAA"
    shared_stack.write("same.lua", 'function main(env, con) con:puts("BBB") end')
    wait_for(lambda: _body(shared_stack, "/same.lua") == b"BBB", what="the reload")


def test_globals_start_over_after_a_reload(shared_stack):
    code = 'n = 0 function main(env, con) n = n + 1 con:puts("{v}", n) end'
    shared_stack.write("restart.lua", code.format(v="a"))
    assert [_body(shared_stack, "/restart.lua") for _ in range(2)] == [b"a1", b"a2"]
    shared_stack.write("restart.lua", code.format(v="b"))
    wait_for(lambda: _body(shared_stack, "/restart.lua") == b"b1", what="the reload")


def test_deleted_script_becomes_404(shared_stack):
    path = shared_stack.write("gone.lua", 'function main(env, con) con:puts("here") end')
    assert _body(shared_stack, "/gone.lua") == b"here"
    os.unlink(path)
    wait_for(lambda: shared_stack.get("/gone.lua")[0] == 404, what="the flush")


def test_busy_state_is_flushed_when_released(stack, tmp_path):
    s = stack(workers=2, states=2)
    go, started = Fifo(tmp_path / "go"), tmp_path / "started"
    s.write("busy.lua", f"""
        function main(env, con)
          if env.QUERY_STRING == "wait" then
            io.open("{started}", "w"):close()
            io.open("{go.path}"):read(2)
          end
          con:puts("old")
        end
    """)
    result = {}
    waiter = threading.Thread(target=lambda: result.setdefault("r", s.get("/busy.lua?wait")))
    waiter.start()
    wait_for(started.exists, what="the slow request to start")
    s.write("busy.lua", 'function main(env, con) con:puts("new") end')
    wait_for(lambda: "reloading" in s.daemon.log(), what="the flush of the busy state")
    # the busy state keeps serving its request with the code it was loaded with ...
    wait_for(lambda: s.get("/busy.lua")[2] == b"new", what="a fresh state for new requests")
    wait_for(go.release, what="the slow request to read its FIFO")
    waiter.join(30)
    assert result["r"][2] == b"old"
    # ... and is closed on release, so later requests never see the old code again
    assert {s.get("/busy.lua")[2] for _ in range(6)} == {b"new"}
