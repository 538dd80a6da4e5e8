#!/usr/bin/env python3
"""What pm ondemand costs the first request after idle, beside php-fpm's pm = ondemand.

Each peer runs with no process while idle (process_idle_timeout 1 s) and is asked for the
hello page over raw FastCGI on its Unix socket (no web server in between). A trial waits
until the peer has no serving process left, times one request (which starts a process) and
then one more (answered by the process just started): the difference is what ondemand costs.
For luafcgid a third figure splits it: a script never loaded before on a running process
(its Lua state's creation and the script's load), which the first request pays too.

    python3 -m bench.ondemand              # 15 trials per peer
    python3 -m bench.ondemand --trials 30

from the checkout (it imports the tests' Daemon and raw FastCGI client: tests/conftest.py)
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from bench.peers import find_php_fpm
from tests.conftest import Daemon, RawClient, Site, can_connect, split_response

PHP_FPM_CONF = """\
[global]
pid = {dir}/php-fpm.pid
error_log = {dir}/php-fpm.log
daemonize = no

[ondemand]
listen = {dir}/php-fpm.sock
pm = ondemand
pm.max_children = 4
pm.process_idle_timeout = 1s
"""


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as stream:
        return stream.read().split()


def wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.05)


def timed_request(address, script):
    """Seconds for one request over a new FastCGI connection."""
    started = time.perf_counter()
    client = RawClient(address, timeout=30)
    client.request({b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET",
                    b"SCRIPT_NAME": b"/" + os.path.basename(script).encode()})
    status = split_response(client.response()[0])[0]
    client.close()
    seconds = time.perf_counter() - started
    if status != "200 OK":
        raise SystemExit(f"{script}: {status}")
    return seconds


def trials(count, address, script, parent, fresh_script=None):
    """{figure: [milliseconds]} over `count` trials."""
    figures = {"first after idle": [], "next (warm)": []}
    if fresh_script:
        figures["new script, warm process"] = []
    for n in range(count):
        wait(lambda: not children(parent))
        figures["first after idle"].append(timed_request(address, script) * 1e3)
        figures["next (warm)"].append(timed_request(address, script) * 1e3)
        if fresh_script:
            figures["new script, warm process"].append(
                timed_request(address, fresh_script(n)) * 1e3)
    return figures


def report(peer, figures):
    for name, values in figures.items():
        print(f"{peer:9} {name:26} median {statistics.median(values):7.2f} ms   "
              f"min {min(values):7.2f}   max {max(values):7.2f}")


def luafcgid(count, tmp):
    site = Site(os.path.join(tmp, "www"))
    hello = site.write("hello.lua", "function main(env, con) con:puts('Hello, world!') end")

    def fresh(n):
        return site.write(f"fresh{n}.lua", "function main(env, con) con:puts('fresh') end")

    daemon = Daemon(os.path.join(tmp, "luafcgid"), {
        "pm": "ondemand", "processes": 2, "workers": 2, "process_idle_timeout": 1,
        "logfile": os.path.join(tmp, "luafcgid.log")}).start()
    try:
        return trials(count, daemon.address, hello, daemon.proc.pid, fresh)
    finally:
        daemon.stop()


def php_fpm(count, tmp):
    binary = find_php_fpm()
    if binary is None:
        print("php-fpm not found: skipped")
        return None
    directory = os.path.join(tmp, "php-fpm")
    os.makedirs(directory)
    conf = os.path.join(directory, "php-fpm.conf")
    with open(conf, "w") as stream:
        stream.write(PHP_FPM_CONF.format(dir=directory))
    hello = os.path.join(directory, "hello.php")
    with open(hello, "w") as stream:
        stream.write("<?php echo 'Hello, world!';\n")
    command = [binary, "--nodaemonize", "--fpm-config", conf, "--prefix", directory]
    if os.geteuid() == 0:
        command.append("--allow-to-run-as-root")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = os.path.join(directory, "php-fpm.sock")
    try:
        wait(lambda: can_connect(sock))
        return trials(count, sock, hello, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="luafcgid-ondemand-") as tmp:
        for peer, run in (("luafcgid", luafcgid), ("php-fpm", php_fpm)):
            figures = run(args.trials, tmp)
            if figures:
                report(peer, figures)


if __name__ == "__main__":
    main()
