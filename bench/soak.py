"""Soak test: wrk through a real nginx into a real luafcgid for a while, then report.

Exits 1 when any request failed (a non-2xx answer or a socket error seen by wrk), when the
daemon logged an error, when a pool slot was left busy at stop, or when the daemon's resident
memory grew by more than --rss-growth-mb between the end of the warm-up and the end of the
run. Usage, from the checkout: python3 -m bench.soak [--duration 30] [--connections 256] [--lua luajit]
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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

# wrk: cycle through the scripts, with a small POST every fourth request
WRK_SCRIPT = """
local paths = {"/hello.lua", "/counter.lua", "/page.lua", "/post.lua"}
local n = 0
request = function()
  n = n + 1
  local path = paths[n % #paths + 1]
  if path == "/post.lua" then
    return wrk.format("POST", path, {["Content-Type"] = "application/x-www-form-urlencoded"}, "a=1&b=hello")
  end
  return wrk.format("GET", path)
end
"""


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as stream:
        return int(re.search(r"VmRSS:\s+(\d+) kB", stream.read()).group(1))


def run_wrk(args, url, seconds, script):
    command = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
               "--timeout", "30s", "-s", script, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    text = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(f"wrk failed ({result.returncode}):\n{text}")
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    non_2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", text) or [0, 0])[1])
    socket_match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = sum(map(int, socket_match.groups())) if socket_match else 0
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    return requests, non_2xx, socket_errors, rate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30, help="seconds of load (30)")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of warm-up (5)")
    parser.add_argument("--connections", type=int, default=256, help="wrk connections (256)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--workers", type=int, default=4, help="luafcgid workers (4)")
    parser.add_argument("--lua", default="luajit", help="Lua VM (luajit)")
    parser.add_argument("--keepalive", type=int, default=0,
                        help="nginx upstream keepalive connections per worker, with "
                             "fastcgi_keep_conn (0: a new connection per request)")
    parser.add_argument("--rss-growth-mb", type=float, default=32,
                        help="most RSS growth tolerated after warm-up, MiB (32)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another luafcgid setting (YAML value); repeatable")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("soak: wrk is not installed (apt-get install wrk)")
    import yaml
    settings = {"workers": args.workers, "states": args.workers * 2, "lua": args.lua,
                "sweep": 1000}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)

    base = Path(tempfile.mkdtemp(prefix="luafcgid-soak-"))
    stack = Stack(base, settings, keepalive=args.keepalive)
    for name, code in SCRIPTS.items():
        stack.write(name, code)
    script = base / "soak.lua"
    script.write_text(WRK_SCRIPT)
    stack.start()
    url = f"http://127.0.0.1:{stack.nginx.port}"
    failures = []
    try:
        pid = stack.daemon.proc.pid
        warm = run_wrk(args, url, max(1, round(args.warmup)), str(script))
        rss_before = rss_kib(pid)
        requests, non_2xx, socket_errors, rate = run_wrk(args, url, max(1, round(args.duration)),
                                                         str(script))
        rss_after = rss_kib(pid)
    finally:
        code = stack.stop()
    log = stack.daemon.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    pool = next((line.split("pool at stop: ", 1)[1] for line in log.splitlines()
                 if "pool at stop: " in line), "missing")
    growth = (rss_after - rss_before) / 1024
    print(f"luafcgid soak: lua {args.lua}, {args.workers} workers, nginx keepalive "
          f"{args.keepalive}, wrk {args.threads} threads {args.connections} connections, "
          f"{args.duration:g} s after {args.warmup:g} s warm-up; settings {settings}")
    print(f"  requests: {requests} ({rate:.0f}/s), warm-up {warm[0]}")
    print(f"  failed: {non_2xx} non-2xx, {socket_errors} socket errors "
          f"(warm-up: {warm[1]} non-2xx, {warm[2]} socket errors)")
    print(f"  daemon RSS: {rss_before / 1024:.1f} MiB after warm-up, {rss_after / 1024:.1f} MiB "
          f"at the end ({growth:+.1f} MiB; bound {args.rss_growth_mb:g})")
    print(f"  daemon log errors: {len(errors)}; pool at stop: {pool}; exit code {code}")
    if non_2xx or socket_errors or warm[1] or warm[2]:
        failures.append("requests failed")
    if errors:
        failures.append("the daemon logged errors: " + "; ".join(errors[:3]))
    if growth > args.rss_growth_mb:
        failures.append(f"RSS grew by {growth:.1f} MiB")
    if " busy=0 " not in f" {pool} " or code != 0:
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
