"""A request in the logs: the one place that words it, for the access log, the slowlog, a
stuck worker's line and the status page, from its worker's record (states/worker.py). The
script is the one the responder resolved (Apache's proxy:fcgi://HOST prefix stripped), the
method and URI are decoded from the params only when a line is written."""

import time

from ..request.fastcgi import ProtocolError, decode_params
from .logs import access as access_log


def request(worker):
    """(method, URI, script) of the request `worker` serves, as text; "-" for what is
    unknown (a worker between requests, a request without that param)."""
    params, script = worker.params, worker.script
    try:
        params = decode_params(params) if params else {}
    except ProtocolError:
        params = {}
    return (params.get(b"REQUEST_METHOD", b"-").decode(errors="replace"),
            params.get(b"REQUEST_URI", b"-").decode(errors="replace"),
            "-" if script is None else script.decode(errors="replace"))


def describe(worker):
    """"METHOD URI (script PATH)", for a line about a running request."""
    return "%s %s (script %s)" % request(worker)


def running(worker, now):
    """What a worker runs, for the status page: its name, its request, for how long."""
    return {"worker": worker.name, "request": describe(worker),
            "seconds": round(now - worker.started, 3)}


def access(worker, status, sent, seconds):
    """The access log line of the request `worker` just answered: time, method, URI,
    status, bytes sent, seconds, script."""
    method, uri, script = request(worker)
    access_log.info("%s %s %s %d %d %.6f %s", time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    method, uri, status, sent, seconds, script)
