"""How the state pool behaves with many scripts. Three parts, printed as tables:

- hits: hit rate and the cost of a miss (load, with or without an eviction), in-process
  against the real responder and real Lua states (this measures the pool, not the
  transport). Requests pick scripts with popularity falling as 1/rank, as on a real site
  where a few pages are hot and most are rare.
- memory: what a loaded state costs, process RSS and Lua heap (collectgarbage("count")),
  for a hello page, the benchmark's 200-row page, examples/guestbook.lua (a SQLite
  connection and the luafcgid module) and Orbit's songs example (a web framework: Orbit,
  WSAPI, Cosmo, LPeg; where Debian's lua-orbit serves the VM), on each Lua VM given.
- site: a site of many pages against a single page, through a real nginx (the tests'
  Stack, kept upstream connections as shipped) into luafcgid with the shipped process
  shape: wrk's requests per second and 99th percentile latency, and the pool's loads and
  evictions.

    python3 -m bench.pool_scale                      # hits: 100 and 1000 scripts x 16, 256 states
    python3 -m bench.pool_scale memory --lua luajit,5.4
    python3 -m bench.pool_scale site --pages 1,40 --states 5,64 --duration 10 --rounds 3

from the checkout, whose luafcgid it measures (site: with the tests' Stack, tests/conftest.py).
"""

import argparse
import contextlib
import gc
import multiprocessing
import os
import random
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from bench import loadgen
from bench.common import BENCH, REPO
from luafcgid import config
from luafcgid.request.parser import Request
from luafcgid.request.responder import Responder
from luafcgid.states.worker import Worker
from tests.conftest import Stack   # the tests' real daemon + nginx

SCRIPT = """
local rows = {}
for i = 1, 50 do rows[i] = ("row %d of script %d"):format(i, {n}) end
function main(env, con)
  con:puts(rows[(tonumber(env.N) or 1) % #rows + 1])
end
"""

HELLO = os.path.join(BENCH, "www", "hello.lua")
PAGE = os.path.join(BENCH, "www", "page.lua")
GUESTBOOK = os.path.join(REPO, "examples", "guestbook.lua")
ORBIT_SONGS = "/usr/share/doc/lua-orbit/songs/songs.lua"   # Debian's lua-orbit: Lua 5.1 only


class Discard:
    def write(self, data):
        pass

    def end(self, data=b""):
        pass


def rss_kb(pid="self"):
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def markdown(path, header, rows):
    with open(path, "w") as stream:
        stream.write("| " + " | ".join(header) + " |\n")
        stream.write("|" + " --- |" * len(header) + "\n")
        for row in rows:
            stream.write("| " + " | ".join(row) + " |\n")


def table(header, rows_of, markdown_file):
    """Print `header`, then each row as rows_of yields it; optionally as Markdown too."""
    print("  ".join(f"{c:>10}" for c in header), flush=True)
    rows = []
    for row in rows_of:
        rows.append(row)
        print("  ".join(f"{c:>10}" for c in row), flush=True)
    if markdown_file:
        markdown(markdown_file, header, rows)


@contextlib.contextmanager
def scripts_directory():
    """A temporary directory for scripts served in-process; serving moves this thread into
    it (workdir.py), so the thread is moved back before it goes."""
    try:
        with tempfile.TemporaryDirectory() as root:
            yield root
    finally:
        os.chdir(REPO)


# -- hits ---------------------------------------------------------------------------------

def hits(scripts, states, requests, seed=1):
    with scripts_directory() as root:
        paths = []
        for n in range(scripts):
            path = os.path.join(root, f"s{n}.lua")
            with open(path, "w") as stream:
                stream.write(SCRIPT.replace("{n}", str(n)))
            paths.append(path.encode())
        responder = Responder(config.defaults(workers=1, states=states))
        rng = random.Random(seed)
        weights = [1.0 / (rank + 1) for rank in range(scripts)]
        picks = rng.choices(paths, weights, k=requests)
        out, worker = Discard(), Worker(1, "bench")
        hit_time = miss_time = 0.0
        misses = 0
        for i, path in enumerate(picks):
            created = responder.pool.created
            started = time.perf_counter()
            responder.respond(Request.of({b"SCRIPT_FILENAME": path, b"N": str(i).encode()}), out,
                              worker)
            elapsed = time.perf_counter() - started
            if responder.pool.created != created:
                misses += 1
                miss_time += elapsed
            else:
                hit_time += elapsed
        responder.pool.close()
        return [str(scripts), str(states), str(requests), f"{1 - misses / requests:.1%}",
                f"{hit_time / max(1, requests - misses) * 1e6:.1f}",
                f"{miss_time / max(1, misses) * 1e6:.0f}", str(responder.pool.evicted)]


def run_hits(args):
    header = ["scripts", "states", "requests", "hit rate", "hit us", "miss us", "evictions"]
    table(header, (hits(scripts, states, args.requests)
                   for scripts in map(int, args.scripts.split(","))
                   for states in map(int, args.states.split(","))), args.markdown)


# -- memory -------------------------------------------------------------------------------

def _heap_kb(state):
    return float(state.runtime.eval('collectgarbage("count")'))


def memory(lua, name, source, copies):
    """(RSS KiB, Lua heap KiB) per loaded state of `source`, over `copies` states (after a
    first one, which pays for the VM's and modules' shared code)."""
    with scripts_directory() as root:
        paths = []
        for n in range(copies + 1):
            path = os.path.join(root, f"{name}{n}.lua")
            shutil.copyfile(source, path)
            paths.append(path.encode())
        responder = Responder(config.defaults(workers=1, states=copies + 1, lua=lua))
        out, worker = Discard(), Worker(1, "bench")
        responder.respond(Request.of({b"SCRIPT_FILENAME": paths[0], b"REQUEST_METHOD": b"GET"}),
                          out, worker)
        gc.collect()
        before = rss_kb()
        for path in paths[1:]:
            responder.respond(Request.of({b"SCRIPT_FILENAME": path, b"REQUEST_METHOD": b"GET"}),
                              out, worker)
        gc.collect()
        grown = rss_kb() - before
        pool = responder.pool
        heaps = [pool.inspect(state, _heap_kb) for state in pool.states()]
        assert len(heaps) == copies + 1, "a state failed to load"
        responder.pool.close()
        return grown / copies, sum(heaps) / len(heaps)


def run_memory(args):
    pages = [("hello", HELLO), ("page", PAGE), ("guestbook", GUESTBOOK), ("orbit", ORBIT_SONGS)]

    def rows():
        for lua in args.lua.split(","):
            for name, source in pages:
                if name == "orbit" and (lua not in ("luajit", "5.1") or not os.path.exists(source)):
                    continue
                # a fresh process for each: a process runs one Lua VM, and memory freed by
                # an earlier measurement would be reused unseen
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
                    rss, heap = fresh.submit(memory, lua, name, source, args.copies).result()
                yield [lua, name, f"{rss:.0f}", f"{heap:.0f}"]

    table(["lua", "page", "RSS KiB", "heap KiB"], rows(), args.markdown)


# -- site ---------------------------------------------------------------------------------

def pool_at_stop(log):
    """Summed created and evicted of every process's 'pool at stop' line."""
    created = sum(map(int, re.findall(r"pool at stop: .*?created=(\d+)", log)))
    evicted = sum(map(int, re.findall(r"pool at stop: .*?evicted=(\d+)", log)))
    return created, evicted


def site(args, page, pages, states, retries):
    base = Path(tempfile.mkdtemp(prefix="luafcgid-site-"))
    settings = {"processes": 2, "workers": 2, "states": states, "retries": retries,
                "sweep": 1000}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)
    stack = Stack(base, settings, keepalive=128)
    with open(page) as stream:
        code = stream.read()
    for rank in range(1, pages + 1):
        stack.write(f"p{rank}.lua", code)
    script = loadgen.site(pages)
    stack.start()
    try:
        url = f"http://127.0.0.1:{stack.nginx.port}"
        loadgen.run(url, script, args.connections, max(1, round(args.warmup)))
        load = loadgen.run(url, script, args.connections, args.duration)
    finally:
        stack.stop()
    created, evicted = pool_at_stop(stack.daemon.log())
    shutil.rmtree(base, ignore_errors=True)
    return load, created, evicted


def run_site(args):
    if shutil.which("wrk") is None:
        raise SystemExit("pool_scale: wrk is not installed (apt-get install wrk)")
    workloads = {"hello": HELLO, "page": PAGE}
    cases = [(workload, pages, states, retries)
             for workload in args.workloads.split(",")
             for states in map(int, args.states.split(","))
             for retries in map(int, args.retries.split(","))
             for pages in map(int, args.pages.split(","))]
    runs = {case: [] for case in cases}
    for _ in range(args.rounds):   # in alternation, so that the machine's drift is shared
        for case in cases:
            workload, pages, states, retries = case
            runs[case].append(site(args, workloads[workload], pages, states, retries))

    def rows():
        for case in cases:
            load, created, evicted = sorted(runs[case], key=lambda run: run[0].rate)[
                len(runs[case]) // 2]   # the median run
            workload, pages, states, retries = case
            yield [workload, str(pages), str(states), str(retries), f"{load.rate:.0f}",
                   f"{load.p99_ms:.1f}", str(created), str(evicted),
                   str(load.non_2xx + load.socket_errors)]

    table(["workload", "pages", "states", "retries", "req/s", "p99 ms", "loads", "evictions",
           "failed"], rows(), args.markdown)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", default="hits", choices=("hits", "memory", "site"))
    parser.add_argument("--requests", type=int, default=20000, help="hits: requests")
    parser.add_argument("--scripts", default="100,1000", help="hits: script counts")
    parser.add_argument("--states", default=None,
                        help="hits and site: states per process (hits: 16,256; site: 5 and "
                             "the default)")
    parser.add_argument("--lua", default="luajit,5.4", help="memory: Lua VMs")
    parser.add_argument("--copies", type=int, default=50, help="memory: states measured")
    parser.add_argument("--pages", default="1,40", help="site: page counts")
    parser.add_argument("--workloads", default="hello,page", help="site: hello, page")
    parser.add_argument("--retries", default=str(config.defaults().retries),
                        help="site: retries settings")
    parser.add_argument("--connections", type=int, default=16, help="site: wrk connections")
    parser.add_argument("--duration", type=int, default=10, help="site: seconds per run")
    parser.add_argument("--warmup", type=float, default=2, help="site: seconds of warm-up")
    parser.add_argument("--rounds", type=int, default=1,
                        help="site: runs of each case, in alternation; the median is shown")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="site: another luafcgid setting; repeatable")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    args = parser.parse_args(argv)
    if args.states is None:
        args.states = "16,256" if args.part == "hits" else f"5,{config.defaults().states}"
    {"hits": run_hits, "memory": run_memory, "site": run_site}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
