"""states/duty.py: one worker of a process takes connections while requests are short; a
worker whose request waits leaves the process's connections to the others."""

import os

import pytest

from conftest import GATED_PAGE, Fifo, InThread, wait_for


@pytest.mark.parametrize("known", [False, True], ids=["first-request", "known-long-page"])
def test_a_request_waiting_in_a_page_leaves_the_process_to_its_other_worker(stack, known):
    # first-request: the page's hold time is not known yet, so its worker keeps the duty
    # and the watcher passes it on once the request has run STALLED; known-long-page: its
    # requests are known to hold a state long, so its worker passes the duty on at once
    s = stack(processes=1, workers=2)
    s.write("gated.lua", GATED_PAGE)
    s.write("hello.lua", "function main(env, con) con:puts('hello') end")
    assert s.get("/hello.lua")[2] == b"hello"   # the worker on duty served it
    batches = ["before", "held"] if known else ["held"]
    for batch in batches:
        gate = Fifo(s.site.file(f"gate-{batch}-1"))
        held = InThread(lambda batch=batch: s.get(f"/gated.lua?{batch}-1",
                                                  headers={"X-Requests": "1"}))
        wait_for(lambda batch=batch: os.path.exists(s.site.file(f"in-{batch}-1")),
                 what="the request in the page")
        if batch == "held":
            # answered by the other worker while the first waits in the page
            assert s.get("/hello.lua")[2] == b"hello"
            assert not held.done()
        wait_for(gate.release, what="the page to read its gate")
        assert held.result()[:3:2] == (200, b"1")
