"""finishhandler runs after the response is complete (the original crashed here)."""

import os

from conftest import Fifo, wait_for


def test_finish_handler_runs_after_the_response_went_out(stack, tmp_path):
    go, done = Fifo(tmp_path / "go"), tmp_path / "done"
    s = stack(finishhandler="after")
    s.write("finish.lua", f"""
        function main(env, con) con:puts("response") end
        function after(env, con)
          -- waits until the test has the whole response: proves it was sent before.
          -- Closed at once: a handle left to the collector kept the FIFO open for reading,
          -- and the next request's release() then wrote to it before its handler opened it
          local fifo = io.open("{go.path}"); fifo:read(2); fifo:close()
          con:puts("never sent")
          local f = io.open("{done}", "w"); f:write(env.REQUEST_URI); f:close()
        end
    """)
    for n in range(3):   # the original segfaulted after the first request
        status, _, body = s.get(f"/finish.lua?n={n}")
        assert (status, body) == (200, b"response")
        assert not done.exists()
        wait_for(go.release, what="the finish handler to read its FIFO")
        # the handler opens the file, then writes: wait for what it wrote
        wait_for(lambda: done.exists() and done.read_text() == f"/finish.lua?n={n}",
                 what="the finish handler")
        os.unlink(done)


def test_finish_handler_errors_are_only_logged(stack):
    s = stack(finishhandler="after")
    s.write("finish_error.lua", """
        function main(env, con) con:puts("fine") end
        function after() error("cleanup failed") end
    """)
    assert s.get("/finish_error.lua")[2] == b"fine"
    assert s.get("/finish_error.lua")[2] == b"fine"
    wait_for(lambda: "cleanup failed" in s.daemon.log(), what="the log line")
