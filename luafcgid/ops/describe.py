"""A request in the logs: the one place that words it for the slowlog, a stuck worker's line
and the status page, and hands it to the access log's format (access_format.py), from its
worker's record (states/worker.py). The script is the one the responder resolved (Apache's
proxy:fcgi://HOST prefix stripped); the params are decoded only when a line is written. Bytes that are not
UTF-8 are kept (surrogateescape) for logs.escape to write as \\xNN: the error and access logs
escape whole lines, the slowlog and the status page these fields (escape())."""

from ..request.fastcgi import ProtocolError, decode_params
from .logs import access as access_log
from .logs import escape


def params_of(worker):
    """The params of the request `worker` serves (or served last), decoded: a dict of
    bytes."""
    try:
        return decode_params(worker.params) if worker.params else {}
    except ProtocolError:
        return {}


def request(worker):
    """(method, URI, script) of the request `worker` serves, as text; "-" for what is
    unknown (a worker between requests, a request without that param)."""
    params, script = params_of(worker), worker.script
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


class _Answered:
    """The request a worker just answered, as access_format reads it."""

    __slots__ = ("params", "script", "status", "sent", "seconds", "head", "cpu", "memory")

    def __init__(self, worker):
        self.params, self.script = params_of(worker), worker.script
        self.status, self.sent, self.seconds = worker.status, worker.sent, worker.seconds
        self.head, self.cpu, self.memory = worker.head, worker.cpu, worker.memory


def access_writer(format):
    """The access log's writer, access(worker), for a compiled access_format: the params
    are decoded only for it."""
    def access(worker):
        access_log.info("%s", format.render(_Answered(worker)))
    return access
