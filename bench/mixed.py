"""Short pages among pages that wait: how long a hello request waits behind pages that wait
50 ms outside Lua (luasocket's `socket.select`, as on a database), per process shape and
with or without the upstream connections nginx keeps.

A connection parked in a process is read by that process's workers only: while they are all
in waiting pages, a request arriving on it waited, even when another process had a worker
free, until the process handed what it parks to an idle one (request/handoff.py). With as
many clients as workers in all, no request need wait; a hello request later than LATE is
counted as one that did.

    python3 -m bench.mixed [--clients 4] [--slow 0.1] [--shapes 2x2,1x4] [--duration 10]

from the checkout, whose luafcgid it measures (the tests' Stack, tests/conftest.py). Each
client is a thread with one HTTP/1.1 connection to nginx, timing every request.
"""

import argparse
import http.client
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from bench.pool_scale import table
from tests.conftest import Stack   # the tests' real daemon + nginx

SLOW = """local socket = require("socket")
function main(env, con) socket.select(nil, nil, 0.05) con:puts("slow") end
"""
FAST = 'function main(env, con) con:puts("fast") end\n'
LATE = 0.025   # seconds: 25 times hello's median here, half the slow page


def _client(port, seed, slow_share, until, fast):
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        while time.monotonic() < until:
            slow = rng.random() < slow_share
            began = time.monotonic()
            conn.request("GET", "/slow.lua" if slow else "/fast.lua")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
            if not slow:
                fast.append(time.monotonic() - began)
    finally:
        conn.close()


def measure(processes, workers, keepalive, args):
    """Latencies of the hello requests (seconds, sorted) of one run."""
    base = Path(tempfile.mkdtemp(prefix="luafcgid-mixed-"))
    stack = Stack(base, {"processes": processes, "workers": workers}, keepalive=keepalive)
    stack.write("slow.lua", SLOW)
    stack.write("fast.lua", FAST)
    stack.start()
    try:
        for _ in range(processes * workers):   # every state loaded before the clock runs
            stack.get("/fast.lua")
            stack.get("/slow.lua")
        until = time.monotonic() + args.duration
        per_client = [[] for _ in range(args.clients)]
        threads = [threading.Thread(target=_client, args=(stack.nginx.port, n, args.slow,
                                                          until, per_client[n]))
                   for n in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)
    return sorted(t for times in per_client for t in times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--slow", type=float, default=0.1, help="share of waiting pages")
    parser.add_argument("--shapes", default="2x2,1x4", help="processes x workers, ...")
    parser.add_argument("--keepalive", default="0,128", help="nginx's upstream keepalive")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args(argv)
    cases = [(*map(int, shape.split("x")), int(keepalive))
             for keepalive in args.keepalive.split(",") for shape in args.shapes.split(",")]

    def rows():
        for processes, workers, keepalive in cases:
            times = measure(processes, workers, keepalive, args)
            late = sum(t > LATE for t in times)
            yield [f"{processes}x{workers}", str(keepalive), str(len(times)),
                   f"{times[len(times) // 2] * 1e3:.1f}",
                   f"{times[int(len(times) * 0.99)] * 1e3:.1f}",
                   f"{100 * late / len(times):.2f}"]

    table(["shape", "keepalive", "hello n", "p50 ms", "p99 ms", "% late"], rows(),
          args.markdown)


if __name__ == "__main__":
    main()
