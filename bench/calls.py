#!/usr/bin/env python3
"""Python and C function calls per request in the serving process: the length of the Python
path a request takes (issue 16), counted with a profile hook (sys.setprofile and
threading.setprofile) in every thread while requests are sent one at a time.

luafcgid runs the shipped etc/luafcgid.yaml with 1 process of 1 worker (--set overrides a
setting, e.g. --set access_log=/tmp/a.log to see what the access log costs); the floor
(bench/floor.py) beside it, one process serving in its main thread. Each request comes on a
new connection, as in nginx's plain mode, with the params nginx's fastcgi_params sends;
--keepalive sends them all on one kept connection instead.

    python3 -m bench.calls [--requests 1000] [--workload hello] [--keepalive] [--set K=V]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from bench.bench import setting
from bench.common import BENCH, REPO
from bench.peers import luafcgid_command, luafcgid_config, luafcgid_env, shipped_settings
from luafcgid.request import fastcgi as fcgi

WARMUP = 200

# Run in the server's process before its own code: counts every profile event of the kinds
# in `counts` while counting is on; a thread that is not profiled (started first, with no
# signals) reads "start" and "stop" from the control pipe and answers the counts.
PROFILED = r"""
import json, os, runpy, signal, sys, threading
counts = {"call": 0, "c_call": 0}
functions = {} if os.environ.pop("CALLS_BY_FUNCTION", "") else None
on = False

def profile(frame, event, arg):
    if on and event in counts:
        counts[event] += 1
        if functions is not None:
            name = (f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_code.co_name}"
                    if event == "call" else f"C {getattr(arg, '__qualname__', arg)}")
            functions[name] = functions.get(name, 0) + 1

def control(read_fd, write_fd):
    global on
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
    with os.fdopen(read_fd) as commands, os.fdopen(write_fd, "w") as answers:
        for line in commands:
            if line.strip() == "start":
                for kind in counts:
                    counts[kind] = 0
                if functions is not None:
                    functions.clear()
                on = True
            else:
                on = False
            answers.write(json.dumps({**counts, "functions": functions}) + "\n")
            answers.flush()

read_fd, write_fd = (int(fd) for fd in os.environ.pop("CALLS_CONTROL").split(","))
threading.Thread(target=control, args=(read_fd, write_fd), daemon=True).start()
threading.setprofile(profile)
sys.setprofile(profile)
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    exec(sys.argv[1], {"__name__": "__main__"})
"""


def nginx_params(root, workload):
    """What nginx's fastcgi_params (and the SCRIPT_FILENAME line) send for GET /WORKLOAD.lua."""
    uri = f"/{workload}.lua"
    params = {
        "QUERY_STRING": "", "REQUEST_METHOD": "GET", "CONTENT_TYPE": "", "CONTENT_LENGTH": "",
        "SCRIPT_NAME": uri, "REQUEST_URI": uri, "DOCUMENT_URI": uri, "DOCUMENT_ROOT": root,
        "SERVER_PROTOCOL": "HTTP/1.1", "REQUEST_SCHEME": "http", "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": "nginx/1.22.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
        "SERVER_ADDR": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_NAME": "localhost",
        "REDIRECT_STATUS": "200", "SCRIPT_FILENAME": root + uri, "HTTP_HOST": "127.0.0.1:8080",
        "HTTP_USER_AGENT": "calls.py",
    }
    return fcgi.encode_params((k.encode(), v.encode()) for k, v in params.items())


def request_bytes(params, keep):
    return (fcgi.begin_request(1, flags=fcgi.KEEP_CONN if keep else 0)
            + fcgi.record(fcgi.PARAMS, 1, params) + fcgi.record(fcgi.PARAMS, 1)
            + fcgi.record(fcgi.STDIN, 1))


def read_response(sock):
    """Read up to and including the END_REQUEST record; the bytes read."""
    data = b""
    while True:
        pos = 0
        while len(data) - pos >= fcgi.HEADER_LEN:
            _, rtype, _, length, padding = fcgi.HEADER.unpack_from(data, pos)
            end = pos + fcgi.HEADER_LEN + length + padding
            if end > len(data):
                break
            if rtype == fcgi.END_REQUEST:
                return data
            pos = end
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection before END_REQUEST")
        data += chunk


def send_requests(address, params, count, keep):
    request = request_bytes(params, keep)
    sock = None
    for _ in range(count):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(address)
        sock.sendall(request)
        response = read_response(sock)
        if response[fcgi.HEADER_LEN:].startswith((b"Status: 4", b"Status: 5")):
            raise SystemExit(f"an error response: {response[:200]!r}")
        if not keep:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def wait_listening(address, proc):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stdout.read().decode(errors='replace')}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(address)
                return
            except OSError:
                time.sleep(0.05)
    raise SystemExit("the server did not listen")


def count_calls(command, address, params, requests, keep, env=None, by_function=False):
    """Start `command` profiled, warm it up, count the calls of `requests` requests; stop it.
    {"call": per request, "c_call": per request, "functions": {name: per request} or None}."""
    to_server, commands = os.pipe()
    answers, from_server = os.pipe()
    env = dict(env or os.environ, CALLS_CONTROL=f"{to_server},{from_server}",
               CALLS_BY_FUNCTION="1" if by_function else "")
    proc = subprocess.Popen([sys.executable, "-c", PROFILED, *command], env=env, cwd=REPO,
                            pass_fds=(to_server, from_server), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    os.close(to_server)
    os.close(from_server)
    try:
        with os.fdopen(commands, "w") as control, os.fdopen(answers) as replies:
            wait_listening(address, proc)
            send_requests(address, params, WARMUP, keep)
            control.write("start\n")
            control.flush()
            replies.readline()
            send_requests(address, params, requests, keep)
            control.write("stop\n")
            control.flush()
            counts = json.loads(replies.readline())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    functions = counts.pop("functions")
    counts = {kind: value / requests for kind, value in counts.items()}
    counts["functions"] = functions and {name: value / requests
                                         for name, value in functions.items()}
    return counts


def luafcgid(directory, settings):
    """The daemon's arguments to python and its socket: the shipped config, 1 process of 1
    worker."""
    config, listen = luafcgid_config(directory, shipped_settings(
        {"processes": 1, "workers": 1, **dict(settings)}))
    return luafcgid_command(config)[1:], listen


def floor(directory):
    """The floor's arguments to python and its socket: its worker() on a listener of its own,
    in the main thread."""
    listen = os.path.join(directory, "floor.sock")
    code = ("import socket\nfrom bench import floor\n"
            "listener = socket.socket(socket.AF_UNIX)\n"
            f"listener.bind({listen!r})\nlistener.listen(64)\nfloor.worker(listener)\n")
    return ["-c", code], listen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--workload", default="hello")
    p.add_argument("--keepalive", action="store_true", help="one kept connection")
    p.add_argument("--by-function", action="store_true",
                   help="also list the calls per request of each function")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], type=setting,
                   help="override a luafcgid setting (YAML value); repeatable")
    args = p.parse_args(argv)
    root = os.path.join(BENCH, "www")
    params = nginx_params(root, args.workload)
    rows = []
    with tempfile.TemporaryDirectory(prefix="luafcgid-calls-") as tmp:
        for name, (command, address) in (("luafcgid", luafcgid(tmp, args.set)),
                                         ("floor", floor(tmp))):
            rows.append((name, count_calls(command, address, params, args.requests,
                                           args.keepalive, luafcgid_env(), args.by_function)))
    mode = "one kept connection" if args.keepalive else "a new connection each"
    print(f"{args.workload}, {args.requests} requests, {mode}; calls per request:")
    print(f"{'peer':<10} {'Python':>8} {'C':>8}")
    for name, counts in rows:
        print(f"{name:<10} {counts['call']:>8.1f} {counts['c_call']:>8.1f}")
    for name, counts in rows:
        if counts["functions"]:
            print(f"\n{name}, by function:")
            for function, n in sorted(counts["functions"].items(), key=lambda kv: -kv[1]):
                print(f"{n:8.2f}  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
