"""The length of the Python path a request takes (issue 16), in the serving process: the
Python and C function calls per request, counted with a profile hook (sys.setprofile and
threading.setprofile) in every thread, the bytecode instructions, counted with a trace hook
(f_trace_opcodes), and the process's CPU time per request without the hooks, for requests
sent one at a time. The counts are exact and the same on any machine; the CPU time is not.

luafcgid runs the shipped etc/luafcgid.yaml with 1 process of 1 worker (--set overrides a
setting, e.g. --set access_log=/tmp/a.log to see what the access log costs); --against
CHECKOUT adds another checkout's luafcgid (e.g. main's) for a before and after in one run;
the floor (bench/floor.py) serves in its main thread beside them. Each request comes on a new
connection, as in nginx's plain mode, with the params nginx's fastcgi_params sends;
--keepalive sends them all on one kept connection instead. The CPU time is the median of
--rounds alternating rounds: one client, one worker and no nginx make it a steadier figure
than wrk's on a shared machine, and the calls need no timing at all.

    python3 -m bench.calls [--requests 2000] [--rounds 5] [--keepalive] [--against DIR]
                           [--by-function] [--set KEY=VALUE]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench.bench import setting
from bench.common import BENCH, REPO
from bench.peers import luafcgid_config, luafcgid_env, shipped_settings
from luafcgid.request import fastcgi as fcgi

WARMUP = 200

# Run in the server's process before its own code. With CALLS_PROFILE set, a profile hook
# counts the calls and a trace hook the instructions while counting is on. A thread that is
# neither hooked (it starts first) nor given signals reads "start" and "stop" from the control
# pipe and answers the counts and the process's CPU seconds.
WRAPPER = r"""
import json, os, runpy, signal, sys, threading, time
counts = {"call": 0, "c_call": 0, "opcode": 0}
by_function = os.environ.pop("CALLS_BY_FUNCTION", "")
functions = {} if by_function else None
on = False

def name(frame):
    return f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_code.co_name}"

def count(key, kind):
    entry = functions.setdefault(key, [0, 0])
    entry[kind] += 1

def profile(frame, event, arg):
    if on and event in counts:
        counts[event] += 1
        if functions is not None:
            count(name(frame) if event == "call" else
                  f"C {getattr(arg, '__qualname__', arg)}", 0)

def trace(frame, event, arg):
    frame.f_trace_opcodes = True
    if on and event == "opcode":
        counts["opcode"] += 1
        if functions is not None:
            count(name(frame), 1)
    return trace

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
            on = line.strip() == "start"
            answers.write(json.dumps({**counts, "functions": functions,
                                      "cpu": time.process_time()}) + "\n")
            answers.flush()

read_fd, write_fd = (int(fd) for fd in os.environ.pop("CALLS_CONTROL").split(","))
threading.Thread(target=control, args=(read_fd, write_fd), daemon=True).start()
if os.environ.pop("CALLS_PROFILE", ""):
    threading.setprofile(profile)
    sys.setprofile(profile)
    threading.settrace(trace)
    sys.settrace(trace)
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


class Served:
    """A server started with WRAPPER, profiled or not, and the requests sent to it."""

    def __init__(self, peer, params, keep, profile, by_function=False):
        command, self.address, env, cwd = peer
        if os.path.exists(self.address):   # the floor leaves its socket behind
            os.unlink(self.address)
        to_server, commands = os.pipe()
        answers, from_server = os.pipe()
        env = dict(env, CALLS_CONTROL=f"{to_server},{from_server}",
                   CALLS_PROFILE="1" if profile else "",
                   CALLS_BY_FUNCTION="1" if by_function else "")
        self.proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *command], env=env,
                                     cwd=cwd, pass_fds=(to_server, from_server),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        os.close(to_server)
        os.close(from_server)
        self.control, self.answers = os.fdopen(commands, "w"), os.fdopen(answers)
        self.params, self.keep = params, keep
        wait_listening(self.address, self.proc)
        send_requests(self.address, params, WARMUP, keep)

    def _ask(self, command):
        self.control.write(command + "\n")
        self.control.flush()
        return json.loads(self.answers.readline())

    def measure(self, requests):
        """What `requests` requests cost: {"call", "c_call", "opcode" per request,
        "functions" (name: [calls, instructions] per request) or None, "cpu": µs per
        request}."""
        before = self._ask("start")
        send_requests(self.address, self.params, requests, self.keep)
        after = self._ask("stop")
        functions = after["functions"]
        return {"call": after["call"] / requests, "c_call": after["c_call"] / requests,
                "opcode": after["opcode"] / requests,
                "functions": functions and {name: [n / requests for n in counts]
                                            for name, counts in functions.items()},
                "cpu": (after["cpu"] - before["cpu"]) / requests * 1e6}

    def stop(self):
        self.control.close()
        self.answers.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def luafcgid(directory, settings, checkout=REPO):
    """(arguments to python, socket, environment, working directory) of a checkout's daemon:
    the shipped config, 1 process of 1 worker."""
    config, listen = luafcgid_config(directory, shipped_settings(
        {"processes": 1, "workers": 1, **dict(settings)}))
    env = dict(luafcgid_env(), PYTHONPATH=os.pathsep.join(
        [checkout] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    command = ["-m", "luafcgid", "-c", config]
    # as root, pages run as root only with -R, where the checkout's daemon knows it
    if os.geteuid() == 0 and "--allow-to-run-as-root" in subprocess.run(
            [sys.executable, "-m", "luafcgid", "--help"], capture_output=True, text=True,
            cwd=checkout, env=env).stdout:
        command.append("-R")
    return command, listen, env, checkout


def floor(directory):
    """(arguments to python, socket, environment, working directory) of the floor: its
    worker() on a listener of its own, in the main thread."""
    listen = os.path.join(directory, "floor.sock")
    code = ("import socket\nfrom bench import floor\n"
            "listener = socket.socket(socket.AF_UNIX)\n"
            f"listener.bind({listen!r})\nlistener.listen(64)\nfloor.worker(listener)\n")
    return ["-c", code], listen, luafcgid_env(), REPO


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5, help="of the CPU time, alternating")
    p.add_argument("--workload", default="hello")
    p.add_argument("--keepalive", action="store_true", help="one kept connection")
    p.add_argument("--against", metavar="CHECKOUT", help="another checkout's luafcgid beside")
    p.add_argument("--by-function", action="store_true",
                   help="also list the calls and instructions per request of each function")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], type=setting,
                   help="override a luafcgid setting (YAML value); repeatable")
    args = p.parse_args(argv)
    params = nginx_params(os.path.join(BENCH, "www"), args.workload)
    with tempfile.TemporaryDirectory(prefix="luafcgid-calls-") as tmp:
        for directory in ("a", "b"):
            os.mkdir(os.path.join(tmp, directory))
        peers = {"luafcgid": luafcgid(os.path.join(tmp, "a"), args.set)}
        if args.against:
            peers[f"luafcgid at {args.against}"] = luafcgid(
                os.path.join(tmp, "b"), args.set, os.path.abspath(args.against))
        peers["floor"] = floor(tmp)
        counted = {}
        for name, peer in peers.items():
            served = Served(peer, params, args.keepalive, True, args.by_function)
            try:
                counted[name] = served.measure(args.requests)
            finally:
                served.stop()
        running = {name: Served(peer, params, args.keepalive, False)
                   for name, peer in peers.items()}
        cpu = {name: [] for name in peers}
        try:
            for _ in range(args.rounds):
                for name, served in running.items():
                    cpu[name].append(served.measure(args.requests)["cpu"])
        finally:
            for served in running.values():
                served.stop()
    mode = "one kept connection" if args.keepalive else "a new connection each"
    print(f"{args.workload}, {args.requests} requests one at a time, {mode}; per request:")
    width = max(len(name) for name in peers)
    print(f"{'peer':<{width}}  {'Python calls':>12}  {'C calls':>8}  {'instructions':>12}"
          f"  {'CPU µs':>7}")
    for name in peers:
        print(f"{name:<{width}}  {counted[name]['call']:>12.1f}  {counted[name]['c_call']:>8.1f}"
              f"  {counted[name]['opcode']:>12.0f}  {statistics.median(cpu[name]):>7.1f}")
    for name in peers:
        if counted[name]["functions"]:
            print(f"\n{name}, per request by function:\n{'calls':>8} {'instructions':>12}")
            for function, (calls, opcodes) in sorted(counted[name]["functions"].items(),
                                                     key=lambda kv: (-kv[1][1], -kv[1][0])):
                print(f"{calls:8.2f} {opcodes:12.1f}  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
