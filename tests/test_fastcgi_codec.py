"""The FastCGI codec on its own."""

import pytest

from luafcgid.request import fastcgi as fcgi


def test_params_round_trip_short_and_long_values():
    params = {b"SCRIPT_FILENAME": b"/srv/www/x.lua", b"EMPTY": b"", b"LONG": b"v" * 300,
              b"N" * 200: b"short"}
    assert fcgi.decode_params(fcgi.encode_params(params)) == params


def test_long_lengths_use_four_bytes():
    encoded = fcgi.encode_params({b"k": b"x" * 128})
    assert encoded[:5] == b"\x01\x80\x00\x00\x80"


@pytest.mark.parametrize("data", [b"\x05", b"\x01\x80\x00", b"\x05\x01abc", b"\x01\x05kvv"])
def test_truncated_params_are_protocol_errors(data):
    with pytest.raises(fcgi.ProtocolError):
        fcgi.decode_params(data)


def test_records_are_padded_to_eight_bytes():
    rec = fcgi.record(fcgi.STDOUT, 1, b"abc")
    version, rtype, rid, length, padding = fcgi.HEADER.unpack_from(rec)
    assert (version, rtype, rid, length, padding) == (1, fcgi.STDOUT, 1, 3, 5)
    assert len(rec) % 8 == 0


def test_large_streams_split_into_records():
    data = bytes(range(256)) * 1000   # 256000 bytes: four full records and a rest
    out = fcgi.stream(fcgi.STDOUT, 7, data)
    pos, pieces = 0, []
    while pos < len(out):
        _, rtype, rid, length, padding = fcgi.HEADER.unpack_from(out, pos)
        assert (rtype, rid) == (fcgi.STDOUT, 7) and 0 < length <= fcgi.MAX_CONTENT
        pieces.append(out[pos + 8:pos + 8 + length])
        pos += 8 + length + padding
    assert b"".join(pieces) == data


def test_end_request_closes_stdout_then_ends():
    out = fcgi.end_request(3)
    assert fcgi.HEADER.unpack_from(out) == (1, fcgi.STDOUT, 3, 0, 0)
    _, rtype, rid, length, _ = fcgi.HEADER.unpack_from(out, 8)
    assert (rtype, rid, length) == (fcgi.END_REQUEST, 3, 8)
    assert fcgi.END_BODY.unpack_from(out, 16) == (0, fcgi.REQUEST_COMPLETE)
