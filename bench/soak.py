"""Soak: a mixed site of many pages, through a real nginx into a real luafcgid, for a while.

The site has --pages pages (more than the default `states`, so that states are evicted and
loaded all along) of four kinds in turn: hello, a counter, the 200-row HTML page and a form
POST echo. wrk picks pages with popularity falling as 1/rank. The run is cut into
--samples intervals; after each one the daemon's resident memory and open descriptors (all
its processes) and the interval's requests per second and 99th percentile latency are
printed.

Exits 1 when any request failed (a non-2xx answer or a socket error seen by wrk), when the
daemon logged an error, when a pool slot was left busy at stop, when RSS grew by more than
--rss-growth-mb over the run, when RSS did not level off (it grew over the second half by
more than half its growth over the first half, and by more than --rss-tail-mb), or when
the descriptors at the end exceed the most seen in the first half by more than 16.

    python3 -m bench.soak                         # 30 s after 5 s of warm-up
    python3 -m bench.soak --duration 600 --samples 20

from the checkout, whose luafcgid it runs (and the tests' Stack: tests/conftest.py).
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bench import loadgen
from tests.conftest import Stack   # the tests' real daemon + nginx

SCRIPTS = {
    "hello.lua": 'function main(env, con) con:puts("Hello, world!\\n") end\n',
    "counter.lua": "count = 0\nfunction main(env, con) count = count + 1; con:puts(count) end\n",
    "page.lua": """
local rows = {}
for i = 1, 200 do rows[i] = {id = i, name = "item <" .. i .. ">", price = i * 1.25} end
local function escape(s) return (s:gsub("[<>&]", {["<"] = "&lt;", [">"] = "&gt;", ["&"] = "&amp;"})) end
function main(env, con)
  local out = {"<table>"}
  for i = 1, #rows do
    local r = rows[i]
    out[#out + 1] = string.format("<tr><td>%d</td><td>%s</td><td>%.2f</td></tr>", r.id, escape(r.name), r.price)
  end
  out[#out + 1] = "</table>"
  con:puts(table.concat(out, "\\n"))
end
""",
    "post.lua": "function main(env, con) local b = con:gets(); con:puts(#b) end\n",
}
ORDER = tuple(SCRIPTS)   # page n is SCRIPTS[ORDER[n % 4]]

def processes(pid):
    """The daemon's process and its children (the serving processes, with processes > 1)."""
    found = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as stream:
            found += [int(child) for child in stream.read().split()]
    return found


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as stream:
            total += int(re.search(r"VmRSS:\s+(\d+) kB", stream.read()).group(1))
    return total


def fds(pids):
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def levelled(samples, tail_mb):
    """Whether a series grew over its second half by at most half its growth over the first
    half, or by at most tail_mb MiB: growth that stops, not growth that goes on."""
    middle = samples[len(samples) // 2]
    first, second = middle - samples[0], samples[-1] - middle
    return second <= max(first / 2, tail_mb * 1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30, help="seconds of load (30)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of warm-up (5)")
    parser.add_argument("--samples", type=int, default=6,
                        help="intervals the run is cut into, each reported (6)")
    parser.add_argument("--pages", type=int, default=100, help="pages of the site (100)")
    parser.add_argument("--connections", type=int, default=256, help="wrk connections (256)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--workers", type=int, default=2, help="luafcgid workers (2)")
    parser.add_argument("--processes", type=int, default=2, help="luafcgid processes (2)")
    parser.add_argument("--lua", default="luajit", help="Lua VM (luajit)")
    parser.add_argument("--keepalive", type=int, default=0,
                        help="nginx upstream keepalive connections per worker, with "
                             "fastcgi_keep_conn (0: a new connection per request)")
    parser.add_argument("--rss-growth-mb", type=float, default=32,
                        help="most RSS growth tolerated after warm-up, MiB (32)")
    parser.add_argument("--rss-tail-mb", type=float, default=4,
                        help="RSS growth over the second half that counts as level, MiB (4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another luafcgid setting (YAML value); repeatable")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("soak: wrk is not installed (apt-get install wrk)")
    import yaml
    settings = {"workers": args.workers, "processes": args.processes, "lua": args.lua,
                "sweep": 1000}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)

    base = Path(tempfile.mkdtemp(prefix="luafcgid-soak-"))
    stack = Stack(base, settings, keepalive=args.keepalive)
    for n in range(1, args.pages + 1):
        stack.write(f"p{n}.lua", SCRIPTS[ORDER[n % 4]])
    script = loadgen.site(args.pages, post="rank % 4 == 3")   # the post pages
    stack.start()
    url = f"http://127.0.0.1:{stack.nginx.port}"
    seconds = max(1, round(args.duration / args.samples))
    print(f"luafcgid soak: lua {args.lua}, {args.processes} processes of {args.workers} "
          f"workers, {args.pages} pages, nginx keepalive {args.keepalive}, wrk {args.threads} "
          f"threads {args.connections} connections, {args.samples} x {seconds} s after "
          f"{args.warmup:g} s warm-up; settings {settings}", flush=True)
    loads, rss, descriptors = [], [], []
    try:
        pids = processes(stack.daemon.proc.pid)
        warm = loadgen.run(url, script, args.connections, max(1, round(args.warmup)),
                           args.threads)
        rss.append(rss_kib(pids))
        descriptors.append(fds(pids))
        print(f"  {'at s':>7} {'req/s':>8} {'p99 ms':>8} {'RSS MiB':>8} {'fds':>6}")
        print(f"  {'warm':>7} {warm.rate:8.0f} {warm.p99_ms:8.1f} {rss[0] / 1024:8.1f} "
              f"{descriptors[0]:6d}", flush=True)
        for n in range(1, args.samples + 1):
            load = loadgen.run(url, script, args.connections, seconds, args.threads)
            loads.append(load)
            rss.append(rss_kib(pids))
            descriptors.append(fds(pids))
            print(f"  {n * seconds:7d} {load.rate:8.0f} {load.p99_ms:8.1f} "
                  f"{rss[-1] / 1024:8.1f} {descriptors[-1]:6d}", flush=True)
    finally:
        code = stack.stop()
    log = stack.daemon.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    pools = [line.split("pool at stop: ", 1)[1] for line in log.splitlines()
             if "pool at stop: " in line]
    requests = sum(load.requests for load in loads)
    non_2xx = sum(load.non_2xx for load in loads) + warm.non_2xx
    socket_errors = sum(load.socket_errors for load in loads) + warm.socket_errors
    growth = (rss[-1] - rss[0]) / 1024
    fd_margin = descriptors[-1] - max(descriptors[:len(descriptors) // 2 + 1])
    print(f"  requests: {requests} after {warm.requests} in the warm-up; failed: {non_2xx} "
          f"non-2xx, {socket_errors} socket errors")
    print(f"  RSS {growth:+.1f} MiB over the run (bound {args.rss_growth_mb:g}), "
          f"{'levelled off' if levelled(rss, args.rss_tail_mb) else 'still growing'}; "
          f"descriptors at the end {fd_margin:+d} against the first half's most")
    print(f"  daemon log errors: {len(errors)}; pool at stop: {'; '.join(pools) or 'missing'}; "
          f"exit code {code}")
    failures = []
    if non_2xx or socket_errors:
        failures.append("requests failed")
    if errors:
        failures.append("the daemon logged errors: " + "; ".join(errors[:3]))
    if growth > args.rss_growth_mb:
        failures.append(f"RSS grew by {growth:.1f} MiB")
    if not levelled(rss, args.rss_tail_mb):
        failures.append("RSS did not level off")
    if fd_margin > 16:
        failures.append(f"descriptors grew by {fd_margin}")
    if not pools or any(" busy=0 " not in f" {pool} " for pool in pools) or code != 0:
        failures.append("the daemon did not stop cleanly with every state idle")
    if failures:
        print("FAIL: " + "; ".join(failures))
        print(f"  files kept in {base}")
        return 1
    shutil.rmtree(base, ignore_errors=True)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
