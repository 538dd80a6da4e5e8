"""FastCGI 1.0 wire format: record headers, name-value pairs, response records.

Pure functions over bytes, shared by the connection loop and the tests.
See the FastCGI specification, sections 3 (records) and 5 (application records).
"""

import struct

VERSION = 1

BEGIN_REQUEST = 1
ABORT_REQUEST = 2
END_REQUEST = 3
PARAMS = 4
STDIN = 5
STDOUT = 6
STDERR = 7
DATA = 8
GET_VALUES = 9
GET_VALUES_RESULT = 10
UNKNOWN_TYPE = 11

RESPONDER = 1
AUTHORIZER = 2
FILTER = 3

KEEP_CONN = 1

REQUEST_COMPLETE = 0
CANT_MPX_CONN = 1
OVERLOADED = 2
UNKNOWN_ROLE = 3

HEADER = struct.Struct("!BBHHBx")
HEADER_LEN = HEADER.size
BEGIN_BODY = struct.Struct("!HB5x")
END_BODY = struct.Struct("!IB3x")
MAX_CONTENT = 0xFFFF
# Chunks of this size keep every STDOUT record 8-byte aligned with no padding.
STDOUT_CHUNK = 0xFFF8


class ProtocolError(Exception):
    """The peer sent bytes that are not valid FastCGI."""


def record(rtype, request_id, content=b""):
    """One record, padded to a multiple of 8 bytes as the spec recommends."""
    length = len(content)
    if length > MAX_CONTENT:
        raise ValueError("record content longer than 65535 bytes")
    padding = -length & 7
    return HEADER.pack(VERSION, rtype, request_id, length, padding) + content + b"\0" * padding


def stream(rtype, request_id, data):
    """`data` as as many records of `rtype` as it needs (no terminating empty record)."""
    if len(data) <= STDOUT_CHUNK:
        return record(rtype, request_id, data) if data else b""
    return b"".join(stream_parts(rtype, request_id, data))


def stream_parts(rtype, request_id, data):
    """The same records as stream() as a list of buffers for socket.sendmsg: each record's
    header, a memoryview of its slice of `data` (not a copy) and its padding."""
    view = memoryview(data)
    parts = []
    for start in range(0, len(data), STDOUT_CHUNK):
        piece = view[start:start + STDOUT_CHUNK]
        length = len(piece)
        padding = -length & 7
        parts.append(HEADER.pack(VERSION, rtype, request_id, length, padding))
        parts.append(piece)
        if padding:
            parts.append(b"\0" * padding)
    return parts


def end_request(request_id, app_status=0, protocol_status=REQUEST_COMPLETE):
    """STDOUT end-of-stream followed by END_REQUEST."""
    return (HEADER.pack(VERSION, STDOUT, request_id, 0, 0)
            + record(END_REQUEST, request_id, END_BODY.pack(app_status, protocol_status)))


def begin_request(request_id, role=RESPONDER, flags=0):
    return record(BEGIN_REQUEST, request_id, BEGIN_BODY.pack(role, flags))


_UINT32 = struct.Struct("!I").unpack_from


def decode_params(buf):
    """Name-value pairs (spec 3.4) to a dict of bytes -> bytes; later names win. Raises
    ProtocolError on a pair that does not fit. (Requests are routed by request/params.py,
    which reads them in Lua; this is for the logs, the status page and management
    records.)"""
    data = bytes(buf)
    params = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            name_len = data[pos]
            if name_len < 0x80:
                pos += 1
            else:
                name_len = _UINT32(data, pos)[0] & 0x7FFFFFFF
                pos += 4
            value_len = data[pos]
            if value_len < 0x80:
                pos += 1
            else:
                value_len = _UINT32(data, pos)[0] & 0x7FFFFFFF
                pos += 4
            value_at = pos + name_len
            stop = value_at + value_len
            if stop > end:
                raise ProtocolError("name-value pair longer than its stream")
            params[data[pos:value_at]] = data[value_at:stop]
            pos = stop
    except (IndexError, struct.error):
        raise ProtocolError("name-value pair truncated") from None
    return params


def _encode_length(n):
    return bytes((n,)) if n < 0x80 else struct.pack("!I", n | 0x80000000)


def encode_params(pairs):
    """A mapping or iterable of (name, value) bytes pairs to name-value pair bytes."""
    items = pairs.items() if hasattr(pairs, "items") else pairs
    return b"".join(_encode_length(len(k)) + _encode_length(len(v)) + k + v for k, v in items)
