"""The request parser on its own, fed bytes with no socket: what it keeps between reads, the
replies it leaves for the connection to send, when it says the connection ends. The same
records through a real daemon are in test_protocol.py."""

import resource
import types

import pytest
from conftest import RawClient

from luafcgid import config as configuration
from luafcgid.request import fastcgi as fcgi
from luafcgid.request.parser import Parser

LIMITS = configuration.defaults(max_params=4096, maxpost=100, workers=3)
PARAMS = {b"SCRIPT_FILENAME": b"/srv/www/hello.lua", b"REQUEST_METHOD": b"POST"}


def request_bytes(request_id=1, body=b"", keep_conn=False):
    return RawClient.request_bytes(PARAMS, body, request_id, keep_conn)


def fields(request):
    """A parser.Request as (request_id, keep_conn, params decoded, body, too_large)."""
    return (request.id, request.keep, fcgi.decode_params(request.params), request.body,
            request.too_large)


def test_a_request_fed_byte_by_byte_is_kept_until_complete():
    parser = Parser()
    data = request_bytes(body=b"a=1")
    for i, byte in enumerate(data[:-1]):
        parser.received(data[i:i + 1])
        assert parser.next(LIMITS) is None
        assert parser.in_progress
    parser.received(data[-1:])
    assert fields(parser.next(LIMITS)) == (1, False, PARAMS, b"a=1", False)
    assert not parser.in_progress
    parser.eof()   # between requests: a clean end


@pytest.mark.parametrize("keep_conn", [False, True])
def test_a_request_read_whole_or_record_by_record_is_the_same(keep_conn):
    """next() takes a whole bodiless request in one step, anything else record by record."""
    data = request_bytes(request_id=7, keep_conn=keep_conn)
    whole, cut = Parser(), Parser()
    whole.received(data)
    cut.received(data[:-1])
    assert cut.next(LIMITS) is None
    cut.received(data[-1:])
    assert fields(whole.next(LIMITS)) == fields(cut.next(LIMITS)) == (7, keep_conn, PARAMS,
                                                                       b"", False)
    assert not whole.in_progress and not cut.in_progress
    too_long = Parser()
    too_long.received(data)
    with pytest.raises(fcgi.ProtocolError, match="longer than max_params"):
        too_long.next(types.SimpleNamespace(max_params=10, maxpost=100, workers=3))


def test_requests_received_together_come_out_one_by_one():
    parser = Parser()
    parser.received(request_bytes(1, b"one", keep_conn=True) + request_bytes(2, b"two")[:20])
    assert parser.next(LIMITS).body == b"one"
    assert parser.next(LIMITS) is None and parser.in_progress
    parser.received(request_bytes(2, b"two")[20:])
    assert fields(parser.next(LIMITS))[:4] == (2, False, PARAMS, b"two")


def test_the_body_is_bytes_whatever_buffer_it_was_cut_from():
    parser = Parser()
    data = request_bytes(body=b"x" * 50)
    parser.received(data[:5])
    assert parser.next(LIMITS) is None   # now kept in a bytearray
    parser.received(data[5:])
    request = parser.next(LIMITS)
    assert type(request.body) is bytes and request.body == b"x" * 50
    assert type(request.params) is bytes and type(request.script) is bytes


@pytest.mark.parametrize("cut, reason", [
    (3, "in the middle of a record"),
    (16, "in the middle of a request"),   # right after BEGIN_REQUEST
])
def test_an_end_inside_a_request_is_a_protocol_error(cut, reason):
    parser = Parser()
    parser.received(request_bytes()[:cut])
    assert parser.next(LIMITS) is None
    with pytest.raises(fcgi.ProtocolError, match=reason):
        parser.eof()


def test_a_body_is_refused_as_soon_as_it_passes_maxpost():
    parser = Parser()
    head = request_bytes()[:-2 * fcgi.HEADER_LEN]   # all but the end of the empty body
    parser.received(head + fcgi.record(fcgi.STDIN, 1, b"y" * 60))
    assert parser.next(LIMITS) is None
    parser.received(fcgi.record(fcgi.STDIN, 1, b"y" * 41) + fcgi.record(fcgi.STDIN, 1, b"z"))
    assert fields(parser.next(LIMITS)) == (1, False, PARAMS, b"", True)
    assert parser.closing   # nothing more is read
    assert parser.next(LIMITS) is None


@pytest.mark.parametrize("length, refused", [
    (b"101", True), (b"100", False), (b"", False), (b"-1", False), (b"x", False)])
def test_a_content_length_over_maxpost_is_refused_when_the_params_end(length, refused):
    parser = Parser()
    params = {**PARAMS, b"CONTENT_LENGTH": length}
    parser.received(fcgi.begin_request(1) + fcgi.record(fcgi.PARAMS, 1, fcgi.encode_params(params))
                    + fcgi.record(fcgi.PARAMS, 1))
    request = parser.next(LIMITS)
    assert (request is not None and fields(request) == (1, False, params, b"", True)) is refused
    assert (request is None) is not refused and parser.closing is refused


def test_the_script_and_its_name_are_read_from_the_params_kept_as_received():
    parser = Parser()
    params = {b"SCRIPT_NAME": b"/a.lua", b"X": b"1" * 200, b"SCRIPT_FILENAME": b"/srv/a.lua"}
    parser.received(RawClient.request_bytes(params))
    request = parser.next(LIMITS)
    assert (request.script, request.name) == (b"/srv/a.lua", b"/a.lua")
    assert request.params == fcgi.encode_params(params)
    parser = Parser()
    parser.received(RawClient.request_bytes({b"X": b"1"}))
    request = parser.next(LIMITS)
    assert (request.script, request.name) == (b"", None)


def test_params_that_are_not_name_value_pairs_are_a_protocol_error():
    parser = Parser()
    parser.received(fcgi.begin_request(1) + fcgi.record(fcgi.PARAMS, 1, b"\x05\x09abc")
                    + fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1))
    with pytest.raises(fcgi.ProtocolError, match="longer than its stream"):
        parser.next(LIMITS)


def test_params_beyond_max_params_are_refused_as_they_arrive():
    parser = Parser()
    parser.received(fcgi.begin_request(1))
    for _ in range(4096 // 1000):
        parser.received(fcgi.record(fcgi.PARAMS, 1, b"p" * 1000))
        assert parser.next(LIMITS) is None
    parser.received(fcgi.record(fcgi.PARAMS, 1, b"p" * 1000))
    with pytest.raises(fcgi.ProtocolError, match="longer than max_params"):
        parser.next(LIMITS)


def test_management_records_leave_replies_and_keep_the_connection():
    parser = Parser()
    parser.received(fcgi.record(fcgi.GET_VALUES, 0, fcgi.encode_params(
        {b"FCGI_MAX_CONNS": b"", b"FCGI_MPXS_CONNS": b""})) + fcgi.record(42, 0, b"?"))
    assert parser.next(LIMITS) is None
    values, unknown = parser.replies
    descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert values == fcgi.record(fcgi.GET_VALUES_RESULT, 0, fcgi.encode_params(
        {b"FCGI_MAX_CONNS": str(descriptors).encode(), b"FCGI_MPXS_CONNS": b"0"}))
    assert unknown == fcgi.record(fcgi.UNKNOWN_TYPE, 0, b"\x2a" + b"\0" * 7)
    assert not parser.closing and not parser.in_progress


@pytest.mark.parametrize("keep_conn", [False, True])
def test_another_role_is_refused_and_ends_the_connection_unless_kept(keep_conn):
    parser = Parser()
    parser.received(fcgi.begin_request(1, role=fcgi.AUTHORIZER,
                                       flags=fcgi.KEEP_CONN if keep_conn else 0)
                    + request_bytes(2))
    request = parser.next(LIMITS)
    assert parser.replies == [fcgi.record(fcgi.END_REQUEST, 1,
                                          fcgi.END_BODY.pack(0, fcgi.UNKNOWN_ROLE))]
    assert parser.closing is not keep_conn
    assert (request is not None) is keep_conn   # the next request, only on a kept connection


def test_an_aborted_request_on_a_kept_connection_makes_room_for_the_next():
    parser = Parser()
    parser.received(fcgi.begin_request(1, flags=fcgi.KEEP_CONN)
                    + fcgi.record(fcgi.ABORT_REQUEST, 1) + request_bytes(2, b"next"))
    assert parser.next(LIMITS).id == 2
    assert parser.replies == [fcgi.record(fcgi.END_REQUEST, 1,
                                          fcgi.END_BODY.pack(0, fcgi.REQUEST_COMPLETE))]
    assert not parser.closing
