"""The workloads: what each peer must answer (checked once before any is measured) and the
load wrk puts on it."""

import os
import re
import subprocess
import urllib.error
import urllib.request

from bench.common import BENCH, BenchError

WORKLOADS = ["hello", "page", "post", "counter"]
# Only when asked for (--workloads sleep; luafcgid and php-fpm): a page that waits 10 ms
# outside Lua, as on a database, for what a process shape serves while its workers wait.
BLOCKING = ["sleep"]
POST_BYTES = 1024
POST_BODY = ("data=" + "x" * (POST_BYTES - 5)).encode()  # same body as wrk/bench.lua sends
HTTP_TIMEOUT = 10.0    # seconds for one verification request

def http(url, body=None):
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def verify(workload, url):
    """Check that the peer answers the workload correctly; returns None or a reason."""
    try:
        if workload == "post":
            status, body = http(url, POST_BODY)
            ok = body == POST_BODY
        else:
            status, body = http(url)
            text = body.decode("utf-8", "replace")
            if workload == "hello":
                ok = text == "Hello, world!\n"
            elif workload == "sleep":
                ok = text == "Slept 10 ms\n"
            elif workload == "page":
                ok = text.count("<tr><td>") == 200 and "&lt;b&gt;7&lt;/b&gt; &amp; &quot;more&quot; &#39;text&#39;" in text
            else:
                status2, body2 = http(url)
                a, b = text.strip(), body2.decode("utf-8", "replace").strip()
                ok = status2 == 200 and a.isdigit() and b.isdigit()
        if status != 200 or not ok:
            return "HTTP %s, unexpected body %r" % (status, body[:160])
    except Exception as e:  # noqa: BLE001 - any failure means the peer is not usable
        return "%s: %s" % (type(e).__name__, e)
    return None


def run_wrk(url, connections, duration, workload, threads):
    env = dict(os.environ)
    env.pop("BENCH_POST_BYTES", None)
    if workload == "post":
        env["BENCH_POST_BYTES"] = str(POST_BYTES)
    cmd = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections), "-d", "%gs" % duration,
           "--timeout", "5s", "-s", os.path.join(BENCH, "wrk", "bench.lua"), url]
    try:
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish: %s" % " ".join(cmd))
    out = r.stdout.decode("utf-8", "replace")
    m = re.search(r"^BENCH_RESULT (.*)$", out, re.M)
    if r.returncode != 0 or not m:
        raise BenchError("wrk failed (%s):\n%s" % (r.returncode, out[-2000:]))
    res = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    seconds = max(res["duration_us"], 1) / 1e6
    return {
        "requests": res["requests"],
        "rps": res["requests"] / seconds,
        "p50_ms": res["p50_us"] / 1000.0,
        "p99_ms": res["p99_us"] / 1000.0,
        "errors": res["connect"] + res["read"] + res["write"] + res["status"] + res["timeout"],
        "error_detail": {k: res[k] for k in ("connect", "read", "write", "status", "timeout") if res[k]},
    }
