"""Figures for the README's Security section: how soon request_timeout stops each way a script
may try to outlive it, what a neighbour request waits meanwhile, how long a neighbour waits
while a state with a 3-second __gc finalizer is closed, and what the timeout costs a page.

Runs a real daemon behind a real nginx (the tests' Stack), one per Lua VM:

    python3 -m bench.isolation                  # luajit and 5.4, request_timeout 1
    python3 -m bench.isolation --lua 5.4 --timeout 2

from the checkout (it imports the tests' Stack and hostile scripts: tests/conftest.py,
tests/hostile.py)
"""

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.soak import SCRIPTS
from tests.conftest import Stack   # the tests' real daemon + nginx
from tests.hostile import BYPASSES, FINALIZED, HELLO, RECURSIONS

PAGE = SCRIPTS["page.lua"]   # the benchmark's 200-row table

SLOW_GC = FINALIZED + """
held = finalized(function() os.execute("sleep 3") end)
function main(env, con) con:puts("closing") end
"""


def beside_neighbour(s, path):
    """(status, seconds to the answer, neighbour requests served, worst neighbour seconds)."""
    answer = {}

    def hostile():
        started = time.monotonic()
        status = s.get(path, timeout=120)[0]
        answer.update(status=status, seconds=time.monotonic() - started)

    thread = threading.Thread(target=hostile)
    thread.start()
    served, worst = 0, 0.0
    while thread.is_alive():
        started = time.monotonic()
        ok = s.get("/hello.lua", timeout=120)[::2] == (200, b"hello")
        worst = max(worst, time.monotonic() - started)
        served += ok
    thread.join()
    return answer["status"], answer["seconds"], served, worst


def page_rate(s, seconds=3.0):
    """Sequential page requests per second through nginx."""
    count, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        assert s.get("/page.lua")[0] == 200
        count += 1
    return count / seconds


def stack(base, name, scripts, **settings):
    s = Stack(base / name, {"workers": 2, **settings})
    for script, code in {"hello.lua": HELLO, **scripts}.items():
        s.write(script, code)
    return s.start()


def measure(lua, timeout, base):
    rows = {}
    hostile = {name: f"function main(env, con) {code} end"
               for name, code in {**BYPASSES, **RECURSIONS}.items()}
    s = stack(base, lua, {f"{name}.lua": code for name, code in hostile.items()}, lua=lua,
              request_timeout=timeout, stuck_timeout=1.0)
    try:
        for name in hostile:
            rows[name] = beside_neighbour(s, f"/{name}.lua")
    finally:
        s.stop()
    # a state whose close runs a 3 s finalizer (max_requests 1 closes it after its request)
    s = stack(base, f"{lua}-gc", {"slowgc.lua": SLOW_GC}, lua=lua, max_requests=1)
    try:
        assert s.get("/slowgc.lua")[0] == 200
        served, worst, stop = 0, 0.0, time.monotonic() + 3
        while time.monotonic() < stop:
            started = time.monotonic()
            served += s.get("/hello.lua", timeout=120)[0] == 200
            worst = max(worst, time.monotonic() - started)
        rows["3 s __gc on close"] = (None, None, served, worst)
    finally:
        s.stop()
    rates = []
    for seconds in (timeout, 0):
        s = stack(base, f"{lua}-page-{seconds:g}", {"page.lua": PAGE}, lua=lua,
                  request_timeout=seconds)
        try:
            rates.append(page_rate(s))
        finally:
            s.stop()
    return rows, rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lua", action="append", help="VM (repeatable; luajit and 5.4)")
    parser.add_argument("--timeout", type=float, default=1.0, help="request_timeout (1)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="luafcgid-isolation-"))
    print(f"request_timeout {args.timeout:g} s, stuck_timeout 1 s, 2 workers, through nginx")
    print("| lua | case | answer | after s | neighbour requests | worst neighbour s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for lua in args.lua or ["luajit", "5.4"]:
        rows, (with_timeout, without_timeout) = measure(lua, args.timeout, base)
        for name, (status, seconds, served, worst) in rows.items():
            print(f"| {lua} | {name} | {status or '-'} | "
                  f"{'-' if seconds is None else f'{seconds:.2f}'} | {served} | {worst:.3f} |")
        print(f"| {lua} | page/s (sequential): request_timeout {args.timeout:g} | "
              f"{with_timeout:.0f} | off | {without_timeout:.0f} | |")


if __name__ == "__main__":
    main()
