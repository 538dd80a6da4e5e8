"""A request in the logs: the one place that words it, for the access log, the slowlog, a
stuck worker's line and the status page, from its worker's record (states/worker.py). The
script is the one the responder resolved (Apache's proxy:fcgi://HOST prefix stripped), the
method and URI are decoded from the params only when a line is written. Bytes that are not
UTF-8 are kept (surrogateescape) for logs.escape to write as \\xNN: the error and access logs
escape whole lines, the slowlog and the status page these fields (escape())."""

import time

from ..request.fastcgi import ProtocolError, decode_params
from .logs import access as access_log
from .logs import escape


def request(worker):
    """(method, URI, script) of the request `worker` serves, as text; "-" for what is
    unknown (a worker between requests, a request without that param)."""
    params, script = worker.params, worker.script
    try:
        params = decode_params(params) if params else {}
    except ProtocolError:
        params = {}
    return (params.get(b"REQUEST_METHOD", b"-").decode(errors="surrogateescape"),
            params.get(b"REQUEST_URI", b"-").decode(errors="surrogateescape"),
            "-" if script is None else script.decode(errors="surrogateescape"))


def describe(worker, seconds=None):
    """"METHOD URI (script PATH)", for a line about a running request; with `seconds`,
    "METHOD URI ran 1.234 s (script PATH)"."""
    method, uri, script = request(worker)
    if seconds is None:
        return f"{method} {uri} (script {script})"
    return f"{method} {uri} ran {seconds:.3f} s (script {script})"


def running(worker, now):
    """What a worker runs, for the status page: its name, its request (escaped), for how
    long."""
    return {"worker": worker.name, "request": escape(describe(worker)),
            "seconds": round(now - worker.started, 3)}


def access(worker, status, sent, seconds):
    """The access log line of the request `worker` just answered: time, method, URI,
    status, bytes sent, seconds, script."""
    method, uri, script = request(worker)
    access_log.info("%s %s %s %d %d %.6f %s", time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    method, uri, status, sent, seconds, script)
