"""Memory of the daemon while it sends large responses.

Starts a real luafcgid (one process) and sends it --concurrent simultaneous FastCGI
requests for a page of --mb MiB, read and discarded by raw FastCGI clients; prints the
daemon's resident memory before, its peak (VmHWM) and its resident memory after the
responses (once the states had a request more, so Lua collected its garbage).

    python3 -m bench.big_response                      # 3 x 100 MiB, one con:puts
    python3 -m bench.big_response --pieces 6400        # the body built from 6,400 puts

from the checkout (it imports the tests' Daemon and this checkout's luafcgid)
"""

import argparse
import os
import re
import tempfile
import threading

from luafcgid.request import fastcgi as fcgi
from tests.conftest import Daemon, RawClient, Site   # the tests' real daemon

SCRIPT = """
local size, pieces = {size}, {pieces}
function main(env, con)
  if env.QUERY_STRING == "small" then con:puts("ok") return end
  local piece = string.rep("x", math.floor(size / pieces))
  for i = 1, pieces do con:puts(piece) end
end
"""


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as stream:
        return int(re.search(rf"{field}:\s+(\d+) kB", stream.read()).group(1))


def fetch(address, script, query, sizes, index):
    client = RawClient(address, timeout=300)
    client.request({b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET",
                    b"QUERY_STRING": query})
    total = 0
    while True:
        record = client.read_record()
        if record is None or record[0] == fcgi.END_REQUEST:
            break
        total += len(record[2])
    client.close()
    sizes[index] = total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--concurrent", type=int, default=3)
    parser.add_argument("--pieces", type=int, default=1, help="con:puts calls per response")
    parser.add_argument("--lua", default="luajit")
    parser.add_argument("--memory-limit", default="1G")
    args = parser.parse_args(argv)
    size = args.mb << 20
    with tempfile.TemporaryDirectory() as tmp:
        site = Site(os.path.join(tmp, "www"))
        script = site.write("big.lua", SCRIPT.replace("{size}", str(size))
                            .replace("{pieces}", str(args.pieces)))
        daemon = Daemon(os.path.join(tmp, "daemon"), {
            "workers": args.concurrent, "states": args.concurrent, "lua": args.lua,
            "memory_limit": args.memory_limit}).start()
        try:
            pid = daemon.proc.pid
            sizes = [None] * args.concurrent
            for i in range(args.concurrent):   # load the states before measuring
                fetch(daemon.address, script, b"small", sizes, i)
            before = status_kib(pid, "VmRSS")
            threads = [threading.Thread(target=fetch, args=(daemon.address, script, b"", sizes, i))
                       for i in range(args.concurrent)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            peak = status_kib(pid, "VmHWM")
            for i in range(args.concurrent):
                fetch(daemon.address, script, b"small", [None], 0)
            after = status_kib(pid, "VmRSS")
        finally:
            daemon.stop()
    if any(got < size for got in sizes):
        raise SystemExit(f"short response: {sizes}")
    print(f"{args.concurrent} x {args.mb} MiB in {args.pieces} puts, lua {args.lua}: "
          f"RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, "
          f"after {after / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
