"""How the state pool behaves with many scripts: hit rate, cost of a miss (load, with or
without an eviction), memory per state.

Runs in-process against the real responder and real Lua states (no nginx: this measures the
pool, not the transport). Requests pick scripts with a Zipf-like popularity, as on a real
site where a few pages are hot and most are rare.

    python3 -m bench.pool_scale                 # 100 and 1000 scripts x states 16 and 256
    python3 -m bench.pool_scale --requests 50000 --markdown FILE

from the checkout, whose luafcgid it measures
"""

import argparse
import os
import random
import sys
import tempfile
import time

from luafcgid import config
from luafcgid.request.responder import Responder

SCRIPT = """
local rows = {}
for i = 1, 50 do rows[i] = ("row %d of script %d"):format(i, {n}) end
function main(env, con)
  con:puts(rows[(tonumber(env.N) or 1) % #rows + 1])
end
"""


class Discard:
    def write(self, data):
        pass

    def end(self, data=b""):
        pass


def rss_kb():
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(scripts, states, requests, seed=1):
    with tempfile.TemporaryDirectory() as root:
        paths = []
        for n in range(scripts):
            path = os.path.join(root, f"s{n}.lua")
            with open(path, "w") as stream:
                stream.write(SCRIPT.replace("{n}", str(n)))
            paths.append(path.encode())
        # base_dir: the responder moves this thread's cwd into root, which is removed after the run
        responder = Responder(config.defaults(root, workers=1, states=states))
        rng = random.Random(seed)
        weights = [1.0 / (rank + 1) for rank in range(scripts)]
        picks = rng.choices(paths, weights, k=requests)
        out = Discard()
        before = rss_kb()
        hit_time = miss_time = 0.0
        misses = 0
        for i, path in enumerate(picks):
            created = responder.pool.created
            started = time.perf_counter()
            responder.respond({b"SCRIPT_FILENAME": path, b"N": str(i).encode()}, b"", out)
            elapsed = time.perf_counter() - started
            if responder.pool.created != created:
                misses += 1
                miss_time += elapsed
            else:
                hit_time += elapsed
        loaded = responder.pool.stats()["states"]
        grown = rss_kb() - before
        result = {
            "scripts": scripts, "states": states, "requests": requests,
            "hit rate": 1 - misses / requests,
            "hit us": hit_time / max(1, requests - misses) * 1e6,
            "miss us": miss_time / max(1, misses) * 1e6,
            "evictions": responder.pool.evicted,
            "KiB/state": grown / max(1, loaded),
        }
        responder.pool.close()
        return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--scripts", default="100,1000")
    parser.add_argument("--states", default="16,256")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    args = parser.parse_args(argv)
    header = ["scripts", "states", "requests", "hit rate", "hit us", "miss us", "evictions",
              "KiB/state"]
    rows = []
    for scripts in map(int, args.scripts.split(",")):
        for states in map(int, args.states.split(",")):
            r = run(scripts, states, args.requests)
            rows.append([str(r["scripts"]), str(r["states"]), str(r["requests"]),
                         f"{r['hit rate']:.1%}", f"{r['hit us']:.1f}", f"{r['miss us']:.0f}",
                         str(r["evictions"]), f"{r['KiB/state']:.0f}"])
            print("  ".join(f"{c:>9}" for c in rows[-1]), flush=True)
    if args.markdown:
        with open(args.markdown, "w") as stream:
            stream.write("| " + " | ".join(header) + " |\n")
            stream.write("|" + " --- |" * len(header) + "\n")
            for row in rows:
                stream.write("| " + " | ".join(row) + " |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
