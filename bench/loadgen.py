"""wrk runs for bench.pool_scale and bench.soak: a Lua script's requests for some
seconds, and the figures wrk's done() hook reports (exact, not parsed from its summary)."""

import os
import re
import subprocess
import tempfile
from collections import namedtuple

Load = namedtuple("Load", "requests rate p99_ms non_2xx socket_errors")

SITE = """
local pages, weights, total = {PAGES}, {}, 0
for rank = 1, pages do total = total + 1 / rank; weights[rank] = total end
math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "1", 16) % 1000)
request = function()
  local pick, rank = math.random() * total, 1
  while weights[rank] < pick do rank = rank + 1 end
  local path = "/p" .. rank .. ".lua"
  if {POST} then
    return wrk.format("POST", path, {["Content-Type"] = "application/x-www-form-urlencoded"},
                      "a=1&b=hello")
  end
  return wrk.format("GET", path)
end
"""

DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(("LOADGEN %d %d %d %d %d\\n"):format(summary.requests, summary.duration,
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def site(pages, post="false"):
    """A wrk script for a site of pages /p1.lua ... /pN.lua, page n picked with weight 1/n
    (a few pages are hot, most are rare); a small form is POSTed where the Lua expression
    `post` (of `rank`) holds."""
    return SITE.replace("{PAGES}", str(pages)).replace("{POST}", post)


def run(url, script, connections, seconds, threads=1):
    """wrk with `script` (Lua source that sets `request`) against `url`: a Load."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as stream:
        stream.write(script + DONE)
    try:
        result = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections),
                                 "-d", f"{seconds}s", "--timeout", "30s", "-s", stream.name, url],
                                capture_output=True, text=True, timeout=seconds + 120)
    finally:
        os.unlink(stream.name)
    found = re.search(r"^LOADGEN (\d+) (\d+) (\d+) (\d+) (\d+)$", result.stdout, re.M)
    if result.returncode != 0 or not found:
        raise SystemExit(f"wrk failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    requests, micros, p99, non_2xx, socket_errors = map(int, found.groups())
    return Load(requests, requests / max(micros, 1) * 1e6, p99 / 1000, non_2xx, socket_errors)
