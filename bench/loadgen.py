"""wrk runs for bench/pool_scale.py and bench/soak.py: a Lua script's requests for some
seconds, and the figures wrk's done() hook reports (exact, not parsed from its summary)."""

import os
import re
import subprocess
import tempfile
from collections import namedtuple

Load = namedtuple("Load", "requests rate p99_ms non_2xx socket_errors")

DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(("LOADGEN %d %d %d %d %d\\n"):format(summary.requests, summary.duration,
    latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""


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
