"""FastCGI requests from bytes: a parser fed whatever the socket delivered, with no socket
inside (like waitress's `parser.received(data)`).

A worker takes a connection only to parse what has arrived: a request cut anywhere, in a
record header or between records, stays here with its bytes while the connection is parked,
so no number of slow or stalled clients can hold a worker. Pure: unit-tested and fuzzed
without sockets (tests/test_parser.py, tests/test_fuzz.py).
"""

import functools
import resource
from typing import NamedTuple, Optional

from . import fastcgi as fcgi
from .params import WHOLE_MOST, route, whole

_KNOWN_TYPES = frozenset(range(fcgi.BEGIN_REQUEST, fcgi.UNKNOWN_TYPE + 1))
_HEADER = fcgi.HEADER.unpack_from
_HEADER_LEN = fcgi.HEADER_LEN
_BEGIN = fcgi.BEGIN_BODY.unpack
_BEGIN_SIZE = fcgi.BEGIN_BODY.size
_BEGIN_REQUEST, _PARAMS, _STDIN, _ABORT = (fcgi.BEGIN_REQUEST, fcgi.PARAMS, fcgi.STDIN,
                                          fcgi.ABORT_REQUEST)
_NOTHING = b""
# A request without a body, whole in one read, as nginx sends a GET, is read in one call into
# Lua (params.whole): about 50 bytecode instructions here where checking its records' fields
# in Python took 140 with the route call, and 320 record by record. Everything else (a
# CONTENT_LENGTH past maxpost too) is read record by record, which would read it the same way.


def _announced_too_large(length, limits):
    """Whether a CONTENT_LENGTH param announces a body larger than maxpost."""
    return length.isdigit() and int(length) > limits.maxpost


class Request(NamedTuple):
    """One complete request: its params as received (`params`, encoded: a Lua state decodes
    them itself, without the interpreter lock), the two of them the daemon routes it by (its
    script and, for the status and ping pages, SCRIPT_NAME: params.route), and its body. A
    request too large (its body past maxpost) has none. A tuple: the parser builds the
    common one in C (_whole), without a Python __init__."""

    params: bytes
    script: bytes              # SCRIPT_FILENAME as sent (b"" when none)
    name: Optional[bytes]      # SCRIPT_NAME, or None
    body: bytes = b""
    too_large: bool = False
    id: int = 1
    keep: bool = False         # the web server keeps the connection open after it

    @classmethod
    def of(cls, params, body=b"", too_large=False):
        """A request with `params` given as a dict of bytes (the development server's)."""
        encoded = fcgi.encode_params(params)
        script, name, _ = route(encoded)
        return cls(encoded, script, name, body, too_large)


_whole = functools.partial(tuple.__new__, Request)


class Parser:
    """Records in, complete requests out. `limits` passed to next() has max_params, maxpost,
    workers and processes (a Config): a reload applies to connections already open.

    After next(), `replies` holds records the connection must send before anything else
    (management answers, END_REQUEST for a refused request); `closing` says the
    connection ends once they are sent (and the request next() returned, if any, is
    answered).

    A body larger than maxpost is not read to its end (one client streamed 53 GB in 38 s
    until client_timeout): the request comes out too_large as soon as its CONTENT_LENGTH
    says so or its body passes maxpost, to be answered 413 at once, with `closing` set:
    nothing after it is read."""

    __slots__ = ("replies", "closing", "_buf", "_pos", "_id", "_keep", "_params",
                 "_params_len", "_routed", "_body", "_body_len")

    def __init__(self):
        self.replies = []
        self.closing = False
        self._buf = _NOTHING   # bytes as received, or a bytearray while a record is cut
        self._pos = 0          # where the unparsed bytes in _buf begin
        self._id = None        # the active request, once its BEGIN_REQUEST arrived
        # _keep, _params, _params_len, _routed (the params joined and route()'s, once their
        # stream ended), _body and _body_len are the active request's, set by _begin and
        # read only while there is one

    def received(self, data):
        """Add bytes read from the connection."""
        if self._pos >= len(self._buf):
            self._buf = data   # the common case: nothing left over, no copy
            self._pos = 0
            return
        buf = self._buf
        if type(buf) is not bytearray:
            buf = self._buf = bytearray(memoryview(buf)[self._pos:])
        elif self._pos:
            del buf[:self._pos]
        self._pos = 0
        buf += data   # amortized: a record trickling in byte by byte is not copied each time

    @property
    def in_progress(self):
        """True while part of a request (or of a record) has arrived."""
        return self._id is not None or self._pos < len(self._buf)

    def eof(self):
        """The connection was closed by the peer; raises ProtocolError when that cut a
        request."""
        if self._pos < len(self._buf):
            raise fcgi.ProtocolError("connection closed in the middle of a record")
        if self._id is not None:
            raise fcgi.ProtocolError("connection closed in the middle of a request")

    def next(self, limits):
        """The next complete Request, or None when more bytes are needed (or `closing` is
        set). A request too_large has no body, and `closing` set. Raises ProtocolError on
        bytes that are not valid FastCGI."""
        buf, pos = self._buf, self._pos
        end = len(buf)
        if pos >= end or self.closing:   # (asked again after every request on a kept connection)
            return None
        if not pos and self._id is None and end <= WHOLE_MOST and type(buf) is bytes:
            found = whole(buf, limits.max_params)
            if found is not None:
                keep, params, script, name, length, stop = found
                if not length or not _announced_too_large(length, limits):
                    self._pos = stop
                    return _whole((params, script, name, _NOTHING, False, 1, keep))
        while end - pos >= _HEADER_LEN:
            version, rtype, rid, length, padding = _HEADER(buf, pos)
            if version != 1:
                raise fcgi.ProtocolError(f"unsupported version {version} (not FastCGI?)")
            start = pos + _HEADER_LEN
            stop = start + length + padding
            if stop > end:
                break
            content = buf[start:start + length]
            pos = stop
            # the active request's records first: most records are (its id is never 0)
            if rid == self._id:
                if rtype == _PARAMS:
                    if content:
                        self._routed = None   # (params after the end of their stream count too)
                        self._params.append(content)
                        self._params_len += len(content)
                        if self._params_len > limits.max_params:
                            raise fcgi.ProtocolError(
                                f"params longer than max_params ({limits.max_params} bytes)")
                    else:   # their end: a body CONTENT_LENGTH announces too large is refused now
                        length = self._route()[3]
                        if length and _announced_too_large(length, limits):
                            return self._too_large()
                elif rtype == _STDIN:
                    if content:
                        self._body_len += len(content)
                        if self._body_len > limits.maxpost:
                            return self._too_large()
                        self._body.append(content)
                        continue
                    self._pos = pos
                    self._id = None
                    params, script, name, _ = self._routed or self._route()
                    body = self._body
                    # one record is the common case: no join (bytes() of bytes is no copy)
                    return Request(params, script, name,
                                   bytes(body[0]) if len(body) == 1 else b"".join(body),
                                   False, rid, self._keep)
                elif rtype == _ABORT:
                    self.replies.append(_end_request(rid, fcgi.REQUEST_COMPLETE))
                    self.closing = not self._keep
                    self._id = None
                    if self.closing:
                        break
                elif rtype == _BEGIN_REQUEST:
                    self._begin(rid, content)   # raises: it is active already
                elif rtype not in _KNOWN_TYPES:
                    self._unknown_type(rtype)
            elif rid == 0:
                self._management(rtype, content, limits)
            elif rtype == _BEGIN_REQUEST:
                if self._begin(rid, content):
                    break
            elif rtype not in _KNOWN_TYPES:
                self._unknown_type(rtype)
            # else: spec 4.2, records of an inactive request are ignored
        self._pos = pos
        return None

    def _begin(self, rid, content):
        """A BEGIN_REQUEST record; True when the connection is to end."""
        if len(content) != _BEGIN_SIZE:
            raise fcgi.ProtocolError("BEGIN_REQUEST body is not 8 bytes")
        role, flags = _BEGIN(content)
        if rid == self._id:
            raise fcgi.ProtocolError(f"BEGIN_REQUEST for request {rid}, which is already active")
        if self._id is not None:
            self.replies.append(_end_request(rid, fcgi.CANT_MPX_CONN))
        elif role != fcgi.RESPONDER:
            self.replies.append(_end_request(rid, fcgi.UNKNOWN_ROLE))
            self.closing = not flags & fcgi.KEEP_CONN
        else:
            self._id, self._keep = rid, bool(flags & fcgi.KEEP_CONN)
            self._params, self._params_len, self._routed = [], 0, None
            self._body, self._body_len = [], 0
        return self.closing

    def _route(self):
        """The active request's params joined, and what route() reads in them."""
        params = self._params
        # one record is the common case: no join (bytes() of bytes is no copy)
        joined = bytes(params[0]) if len(params) == 1 else b"".join(params)
        self._routed = (joined, *route(joined))
        return self._routed

    def _too_large(self):
        """The active request, too large, to be answered now; nothing after it is read."""
        params, script, name, _ = self._routed or self._route()
        request = Request(params, script, name, _NOTHING, True, self._id)
        self._id = None
        self._buf, self._pos = _NOTHING, 0
        self.closing = True
        return request

    def _management(self, rtype, content, limits):
        if rtype == fcgi.GET_VALUES:
            # for the whole daemon: every process accepts on the one socket. A connection
            # holds no worker (it is parked until bytes arrive), so a process holds as many
            # as it has file descriptors; the backlog bounds only those not yet accepted.
            descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            values = {b"FCGI_MAX_CONNS": b"%d" % (limits.processes * descriptors),
                      b"FCGI_MAX_REQS": b"%d" % (limits.processes * limits.workers),
                      b"FCGI_MPXS_CONNS": b"0"}
            asked = fcgi.decode_params(content)
            self.replies.append(fcgi.record(fcgi.GET_VALUES_RESULT, 0, fcgi.encode_params(
                (k, values[k]) for k in asked if k in values)))
        else:
            self._unknown_type(rtype)

    def _unknown_type(self, rtype):
        self.replies.append(fcgi.record(fcgi.UNKNOWN_TYPE, 0, bytes((rtype,)) + b"\0" * 7))


def _end_request(request_id, protocol_status):
    return fcgi.record(fcgi.END_REQUEST, request_id, fcgi.END_BODY.pack(0, protocol_status))
