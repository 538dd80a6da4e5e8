"""Benchmark luafcgid against its peers, all behind one nginx on loopback: `bench/run`.

A run sets up every peer in each mode behind one nginx (bench/peers.py), checks that each
answers each workload correctly (bench/workloads.py), plans the wrk runs so that the peers
alternate (round-robin per workload and connection count, so that drift of the machine is
shared), measures them `--rounds` times and takes each median, measures the Lua cost of the
page's main() for the page overhead (bench/floor.py), then reports (bench/report.py). See
bench/README.md.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

import yaml

from bench.common import BENCH, BenchError, log, write
from bench.peers import (C_ORIGINAL_ENV, FASTCGI, MODES, PATHS, PEERS, UNSUPPORTED, availability,
                         c_original_binary, label, shipped_settings, start_backend, start_nginx,
                         targets_of)
from bench.processes import free_port
from bench.report import markdown, plot, summary, table_rows, text_table
from bench.workloads import BLOCKING, WORKLOADS, run_wrk, verify

# Calls of the page's main() whose CPU time gives its Lua cost: 20,000 as in issue 16 (about
# 4 s at 190 µs a call); the smoke run only checks that the figure comes out.
LUA_CALLS, LUA_CALLS_SMOKE = 20000, 1000


class Book:
    """What the run noted, and what failed: a failure makes the exit status non-zero."""

    def __init__(self):
        self.notes, self.failed = [], []

    def note(self, text, failed=None):
        log(text)
        self.notes.append(text)
        if failed:
            self.failed.append(failed)


# ---------------------------------------------------------------------------------------------
# the phases of a run


def set_up(args, settings, tmp, servers, book):
    """Start every available FastCGI peer in each mode and one nginx in front of them all.
    Returns the (peer, mode) pairs to measure, each one's base URL and its server (nginx for
    the ceilings)."""
    why = availability(args)
    peers = []
    for peer in args.peers:
        if not why[peer]:
            peers.append(peer)
        else:   # the C original is optional: without a binary it is noted, not a failure
            optional = peer == "c-original" and not c_original_binary(args)
            book.note("%s skipped: %s" % (peer, why[peer]), failed=None if optional else peer)
    targets = targets_of(peers, args.modes)
    for (peer, mode), why_not in UNSUPPORTED.items():
        if peer in peers and mode in args.modes:
            book.note("%s not measured: %s" % (label(peer, mode), why_not))
    backends = {}
    for peer, mode in [t for t in targets if t[0] in FASTCGI]:
        try:
            backends[(peer, mode)] = start_backend(peer, mode, tmp, servers, args, settings)
        except BenchError as e:
            log(str(e))
            book.note("%s did not start: %s" % (label(peer, mode), str(e).splitlines()[0]),
                      failed=label(peer, mode))
            targets.remove((peer, mode))
    ports = {key: free_port() for key in targets_of(PEERS, MODES)}
    with_lua = ("nginx-lua", None) in targets
    try:
        nginx = start_nginx(tmp, ports, backends, with_lua, servers, args.nginx_workers)
    except BenchError as e:
        if not with_lua:
            raise
        # the Lua module may not load: drop that peer rather than every peer
        log(str(e))
        book.note("nginx-lua skipped: nginx did not start with the Lua module", failed="nginx-lua")
        targets.remove(("nginx-lua", None))
        servers.pop().stop()
        nginx = start_nginx(tmp, ports, backends, False, servers, args.nginx_workers)
    server_of = {key: backend.server for key, backend in backends.items()}
    server_of[("nginx", None)] = server_of[("nginx-lua", None)] = nginx
    urls = {key: "http://127.0.0.1:%d" % ports[key] for key in targets}
    return targets, urls, server_of


def verify_all(args, targets, urls, book):
    """Check every (peer, mode, workload) once before measuring anything. Returns the
    (peer, mode, workload, url) that answered correctly, and a failed result for each run of
    those that did not."""
    answered, failures = [], {}
    for workload in args.workloads:
        for peer, mode in targets:
            path = PATHS[peer].get(workload)
            if not path:
                continue
            url = urls[(peer, mode)] + path
            err = verify(workload, url)
            if err:
                book.note("%s/%s failed verification: %s" % (label(peer, mode), workload, err),
                          failed="%s/%s" % (label(peer, mode), workload))
                failures.update({(peer, mode, workload, c): {"error": err} for c in args.connections})
            else:
                answered.append((peer, mode, workload, url))
    return answered, failures


def plan(args, targets, answered):
    """The report's rows, (peer, mode, workload, conns) with the modes in MODES' order, then
    the ceilings; and the runs of one round, (key, url), every peer in turn for each workload
    and connection count."""
    rows = [(peer, mode, workload, conns) for workload in args.workloads for conns in args.connections
            for peer, mode in sorted(targets, key=lambda t: MODES.index(t[1]) if t[1] else len(MODES))
            if PATHS[peer].get(workload)]
    runs = [((peer, mode, workload, conns), url) for workload in args.workloads for conns in args.connections
            for peer, mode, wl, url in answered if wl == workload]
    return rows, runs


def measure_one(args, key, url, server):
    """One wrk run (after its warm-up), with the CPU the peer's process tree used per request
    and its memory after."""
    peer, mode, workload, conns = key
    try:
        if args.warmup > 0:
            run_wrk(url, conns, args.warmup, workload, args.threads)
        cpu_before = server.usage()[1]
        r = run_wrk(url, conns, args.duration, workload, args.threads)
    except BenchError as e:
        log("%s %s c=%d: %s" % (label(peer, mode), workload, conns, e))
        return {"error": str(e)}
    r["rss_mb"], cpu_after = server.usage()
    r["cpu_us"] = (cpu_after - cpu_before) / max(r["requests"], 1) * 1e6
    if not server.alive():  # noted, the next runs will show errors
        log("%s died:\n%s" % (label(peer, mode), server.tail()))
    return r


def measure(args, runs, server_of, book):
    """Every run `args.rounds` times, in alternation; the median run of each, by requests/s."""
    total = len(runs) * args.rounds
    log("%d runs of %gs (+%gs warm-up) each, peers in alternation" % (total, args.duration, args.warmup))
    measured = {}
    for done, (key, url) in enumerate(runs * args.rounds, 1):
        r = measure_one(args, key, url, server_of[key[:2]])
        measured.setdefault(key, []).append(r)
        if "error" not in r:
            log("[%d/%d] %-19s %-7s c=%-3d %8.0f req/s  p50 %.2f ms  p99 %.2f ms  "
                "%.0f CPU us/req  errors %d %s"
                % (done, total, label(*key[:2]), key[2], key[3], r["rps"], r["p50_ms"],
                   r["p99_ms"], r["cpu_us"], r["errors"], r["error_detail"] or ""))
    results = {}
    for key, lst in measured.items():
        good = sorted((r for r in lst if "error" not in r), key=lambda r: r["rps"])
        results[key] = good[len(good) // 2] if good else lst[-1]
        if not good:
            book.failed.append("%s/%s/%s/%d" % key)
    return results, total


def page_lua_cost(results, calls):
    """CPU µs of one call of the page's main() in one LuaJIT state, when luafcgid served the
    page (the page overhead is its CPU per page minus this)."""
    if not any(key[0] == "luafcgid" and key[2] == "page" for key in results):
        return None
    from bench.floor import lua_cost   # lupa, which luafcgid serving the page had too
    cost = lua_cost(os.path.join(BENCH, "www", "page.lua"), calls)
    log("Lua cost of page.lua's main(): %.0f µs CPU per call (%d calls)" % (cost, calls))
    return cost


def report(args, argv, results, rows, lua_cost, notes, book):
    table = table_rows(results, rows)
    targets = summary(results, args.connections, lua_cost)
    print()
    print(text_table(table))
    print()
    for line in targets:
        print(line)
    for n in notes:
        print("note: " + n)
    if args.markdown:
        write(args.markdown, markdown(table, targets, args, notes, ["bench/run"] + argv))
        log("wrote %s" % args.markdown)
    if args.plot:
        try:
            plot(results, rows, args.plot)
            log("wrote %s" % args.plot)
        except ImportError as e:
            log("cannot plot: %s (pip install matplotlib, or use bench/run --plot)" % e)
            book.failed.append("plot")


def explain(settings, targets, lua_cost, calls):
    """Notes that say what the floor and the page overhead were in this run."""
    notes = []
    if any(peer == "floor" for peer, _ in targets):
        notes.append("floor: bench/floor.py, %d processes of 1 thread (luafcgid's processes; luafcgid "
                     "%d x %d workers)" % (settings["processes"], settings["processes"], settings["workers"]))
    if lua_cost is not None:
        notes.append("Lua cost of the page's main(): %.0f µs CPU per call, %d calls in one state of lupa's "
                     "LuaJIT with the JIT on; page overhead = CPU µs per page minus that" % (lua_cost, calls))
    return notes


# ---------------------------------------------------------------------------------------------
# main


def split_list(value, allowed, what):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit("unknown %s: %s (choose from %s)" % (what, ", ".join(bad), ", ".join(allowed)))
    return items


def setting(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, got %r" % text)
    return key, yaml.safe_load(value)


def parse_args(argv):
    p = argparse.ArgumentParser(description="luafcgid benchmark: luafcgid vs the floor, php-fpm, WSAPI, "
                                            "the C original and nginx, via wrk")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--smoke", action="store_true", help="quick check for CI: 1s runs, 16 connections only, no warm-up")
    p.add_argument("--peers", default=",".join(PEERS), help="comma list of peers (default all: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of FastCGI modes (default %(default)s)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of workloads (default %(default)s)")
    p.add_argument("--connections", default="16,256", help="comma list of connection counts (default %(default)s)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load before each run (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole alternation N times, report the median run")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes (default 1)")
    p.add_argument("--c-original", metavar="PATH",
                   help="a built binary of the C original (default: $%s; skipped when neither is set)"
                   % C_ORIGINAL_ENV)
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    p.add_argument("--plot", metavar="FILE.png", help="also write a bar chart (needs matplotlib)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], type=setting,
                   help="override a luafcgid setting (YAML value), e.g. processes=2; repeatable")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = p.parse_args(argv)
    if args.smoke:
        args.duration = 1.0
        args.connections = "16"
        args.warmup = 0.0
    args.peers = split_list(args.peers, PEERS, "peers")
    args.modes = split_list(args.modes, MODES, "modes")
    args.workloads = split_list(args.workloads, WORKLOADS + BLOCKING, "workloads")
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        raise SystemExit("--connections takes a comma list of integers")
    if args.duration <= 0 or args.duration > 600 or args.rounds < 1 or args.rounds > 20 or not args.connections:
        raise SystemExit("--duration must be in (0, 600], --rounds in [1, 20]")
    return args


def require_tools():
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found (apt-get install wrk, or use bench/run)")
    if not shutil.which("nginx") and not os.path.exists("/usr/sbin/nginx"):
        raise SystemExit("nginx not found (apt-get install nginx, or use bench/run)")


def stop_on_signals():
    """SIGTERM, SIGHUP and SIGINT (also when started with SIGINT ignored) stop the servers."""
    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, on_term)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    require_tools()
    stop_on_signals()
    started = time.monotonic()
    book = Book()
    settings = shipped_settings(args.set)
    tmp = tempfile.mkdtemp(prefix="luafcgid-bench-")
    os.chmod(tmp, 0o755)
    servers = []
    try:
        targets, urls, server_of = set_up(args, settings, tmp, servers, book)
        answered, results = verify_all(args, targets, urls, book)
        rows, runs = plan(args, targets, answered)
        medians, total = measure(args, runs, server_of, book)
        results.update(medians)
    finally:
        for server in reversed(servers):  # nginx first, then the backends
            server.stop()
        if args.keep:
            log("temporary directory kept: %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    calls = LUA_CALLS_SMOKE if args.smoke else LUA_CALLS
    lua_cost = page_lua_cost(results, calls)
    notes = book.notes + explain(settings, targets, lua_cost, calls)
    report(args, argv, results, rows, lua_cost, notes, book)
    print("(%d runs in %.0fs; duration %gs per run; wrk threads %d; nginx workers %d; nproc %d)"
          % (total, time.monotonic() - started, args.duration, args.threads, args.nginx_workers, os.cpu_count()))
    return 1 if book.failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log("error: %s" % e)
        sys.exit(1)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
