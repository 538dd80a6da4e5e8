"""The FastCGI protocol, straight at the daemon's socket: every record type and role, and
malformed input, each followed by a good request. One worker, so a connection that was not
let go would block the next request."""

import os
import resource

import pytest
from conftest import RawClient, split_response

from luafcgid.request import fastcgi as fcgi


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import Daemon, Site
    base = tmp_path_factory.mktemp("protocol")
    site = Site(base / "www")
    site.write("hello.lua", "function main(env, con) con:puts('hello ', env.QUERY_STRING) end")
    d = Daemon(base / "daemon", {"workers": 1, "states": 1, "max_params": 4096,
                                 "client_timeout": 5}).start()
    d.site = site
    yield d
    d.stop()


def params(server, query="q"):
    return {b"SCRIPT_FILENAME": server.site.file("hello.lua").encode(),
            b"QUERY_STRING": query.encode(), b"REQUEST_METHOD": b"GET"}


def good_request(server, query="after"):
    client = RawClient(server.address)
    client.request(params(server, query))
    stdout, app_status, protocol_status = client.response()
    client.close()
    assert protocol_status == fcgi.REQUEST_COMPLETE
    assert split_response(stdout)[2] == f"hello {query}".encode()


def get_values(client):
    client.send(fcgi.record(fcgi.GET_VALUES, 0, fcgi.encode_params(
        {b"FCGI_MAX_CONNS": b"", b"FCGI_MAX_REQS": b"", b"FCGI_MPXS_CONNS": b"",
         b"FCGI_UNHEARD_OF": b""})))
    rtype, rid, content = client.read_record()
    assert (rtype, rid) == (fcgi.GET_VALUES_RESULT, 0)
    return fcgi.decode_params(content)


def descriptors(daemon):
    return resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE)[0]


def test_get_values_reports_what_the_daemon_accepts(server):
    # connections are parked, not held by a worker: as many as the process has descriptors
    client = RawClient(server.address)
    assert get_values(client) == {b"FCGI_MAX_CONNS": str(descriptors(server)).encode(),
                                  b"FCGI_MAX_REQS": b"1", b"FCGI_MPXS_CONNS": b"0"}
    client.request(params(server, "same-connection"))   # management records keep it open
    assert split_response(client.response()[0])[2] == b"hello same-connection"


def test_get_values_counts_every_process(daemon):
    d = daemon(processes=2, workers=3, states=3)
    client = RawClient(d.address)
    values = get_values(client)
    client.close()
    assert values == {b"FCGI_MAX_CONNS": str(2 * descriptors(d)).encode(),
                      b"FCGI_MAX_REQS": b"6", b"FCGI_MPXS_CONNS": b"0"}


@pytest.mark.parametrize("request_id", [0, 1], ids=["management", "application"])
def test_unknown_record_types_get_unknown_type(server, request_id):
    client = RawClient(server.address)
    client.send(fcgi.record(42, request_id, b"whatever"))
    rtype, rid, content = client.read_record()
    assert (rtype, rid, content[0]) == (fcgi.UNKNOWN_TYPE, 0, 42)
    client.request(params(server, "still-open"))
    assert split_response(client.response()[0])[2] == b"hello still-open"


@pytest.mark.parametrize("role", [fcgi.AUTHORIZER, fcgi.FILTER, 77])
def test_other_roles_get_unknown_role(server, role):
    client = RawClient(server.address)
    client.send(fcgi.begin_request(1, role=role, flags=fcgi.KEEP_CONN))
    rtype, rid, content = client.read_record()
    assert (rtype, rid) == (fcgi.END_REQUEST, 1)
    assert fcgi.END_BODY.unpack(content)[1] == fcgi.UNKNOWN_ROLE
    client.request(params(server, "responder"), request_id=2)
    assert split_response(client.response()[0])[2] == b"hello responder"


def test_a_second_request_on_a_busy_connection_gets_cant_mpx_conn(server):
    client = RawClient(server.address)
    client.send(fcgi.begin_request(1) + fcgi.record(fcgi.PARAMS, 1, fcgi.encode_params(
        params(server, "first"))) + fcgi.begin_request(2))
    rtype, rid, content = client.read_record()
    assert (rtype, rid) == (fcgi.END_REQUEST, 2)
    assert fcgi.END_BODY.unpack(content)[1] == fcgi.CANT_MPX_CONN
    client.send(fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1))
    assert split_response(client.response()[0])[2] == b"hello first"


def test_abort_request_ends_the_request(server):
    client = RawClient(server.address)
    client.send(fcgi.begin_request(1, flags=fcgi.KEEP_CONN)
                + fcgi.record(fcgi.PARAMS, 1, fcgi.encode_params(params(server)))
                + fcgi.record(fcgi.ABORT_REQUEST, 1))
    rtype, rid, content = client.read_record()
    assert (rtype, rid) == (fcgi.END_REQUEST, 1)
    assert fcgi.END_BODY.unpack(content)[1] == fcgi.REQUEST_COMPLETE
    client.request(params(server, "after-abort"), request_id=2)
    assert split_response(client.response()[0])[2] == b"hello after-abort"


def test_abort_without_keep_conn_closes_the_connection(server):
    client = RawClient(server.address)
    client.send(fcgi.begin_request(1) + fcgi.record(fcgi.ABORT_REQUEST, 1))
    assert client.read_record()[0] == fcgi.END_REQUEST
    assert client.closed()
    good_request(server)


def test_keep_conn_serves_several_requests_on_one_connection(server):
    client = RawClient(server.address)
    for n in range(5):
        client.request(params(server, str(n)), request_id=n + 1, keep_conn=True)
        assert split_response(client.response()[0])[2] == f"hello {n}".encode()
    client.request(params(server, "last"), request_id=9)
    assert split_response(client.response()[0])[2] == b"hello last"
    assert client.closed()


def test_records_of_other_requests_are_ignored(server):
    client = RawClient(server.address)
    client.send(fcgi.record(fcgi.STDIN, 7, b"stray") + fcgi.record(fcgi.PARAMS, 7, b"\x01"))
    client.request(params(server, "ignored-strays"))
    assert split_response(client.response()[0])[2] == b"hello ignored-strays"


def test_a_request_without_script_filename_gets_400(server):
    client = RawClient(server.address)
    client.request({b"REQUEST_METHOD": b"GET"})
    status, _, _ = split_response(client.response()[0])
    assert status.startswith("400")
    assert "has no SCRIPT_FILENAME" in server.log()
    good_request(server)


def _begin(request_id=1):
    return fcgi.begin_request(request_id)


def _params_header(length):
    return fcgi.HEADER.pack(fcgi.VERSION, fcgi.PARAMS, 1, length, 0)


MALFORMED = {
    "http": (b"GET /hello.lua HTTP/1.1\r\nHost: x\r\n\r\n", "unsupported version 71"),
    "wrong-version": (b"\x02" + fcgi.begin_request(1)[1:], "unsupported version 2"),
    "truncated-header": (b"\x01\x01\x00", "in the middle of a record"),
    "truncated-content": (_begin()[:12], "in the middle of a record"),
    "begin-body-length": (fcgi.record(fcgi.BEGIN_REQUEST, 1, b"\x00\x01"),
                          "BEGIN_REQUEST body is not 8 bytes"),
    "pair-longer-than-stream": (_begin() + fcgi.record(fcgi.PARAMS, 1, b"\x05\x05abc")
                                + fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1),
                                "longer than its stream"),
    "impossible-pair-length": (_begin() + fcgi.record(fcgi.PARAMS, 1, b"\xff\xff\xff\xff\x01ab")
                               + fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1),
                               "longer than its stream"),
    "pair-length-truncated": (_begin() + fcgi.record(fcgi.PARAMS, 1, b"\x01\x80\x00")
                              + fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1),
                              "truncated"),
    "params-never-end": (_begin() + b"".join(fcgi.record(fcgi.PARAMS, 1, b"\x01\x01ab")
                                             for _ in range(2000)), "longer than max_params"),
    "content-shorter-than-header": (_begin() + _params_header(1000) + b"x" * 10,
                                    "in the middle of a record"),
    "closed-mid-request": (_begin() + fcgi.record(fcgi.PARAMS, 1, b"\x01\x01ab"),
                           "in the middle of a request"),
    "begin-twice-same-id": (_begin() + _begin(), "already active"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_is_logged_once_and_closed(server, name):
    data, reason = MALFORMED[name]
    before = server.log().count("malformed FastCGI")
    client = RawClient(server.address)
    client.send(data)
    client.sock.shutdown(1)   # no more from us: the daemon sees what it got
    assert client.read_record() is None   # closed, nothing answered
    good_request(server)
    log = server.log()
    lines = [line for line in log.splitlines() if "malformed FastCGI" in line]
    assert len(lines) == before + 1
    assert reason in lines[-1]
    assert f"pid {os.getpid()}" in lines[-1]   # names the peer


def test_padding_and_split_records_are_read(server):
    client = RawClient(server.address)
    pairs = fcgi.encode_params(params(server, "padded"))
    body = fcgi.HEADER.pack(fcgi.VERSION, fcgi.PARAMS, 1, len(pairs), 255) + pairs + b"\0" * 255
    data = _begin() + body + fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1)
    for i in range(0, len(data), 3):   # three bytes at a time
        client.send(data[i:i + 3])
    assert split_response(client.response()[0])[2] == b"hello padded"


def test_long_name_value_lengths_are_decoded(server):
    client = RawClient(server.address)
    # four-byte lengths: a name, then a value the script echoes, so that a wrong decoding
    # of the first would garble the second
    p = {b"HTTP_X_" + b"N" * 200: b"v", **params(server, "q" * 300)}
    client.request(p)
    assert split_response(client.response()[0])[2] == b"hello " + b"q" * 300


HELD = """
function main(env, con)
  io.open("{marker}", "w"):close()
  io.open("{fifo}"):read(2)
  con:puts("held")
end
"""


def test_bytes_and_the_end_arriving_together_on_a_parked_connection_are_both_read(
        daemon, site, tmp_path):
    """A parked connection on which the client's last bytes and its shutdown arrive while
    no worker looks get one epoll event for both: the worker must read on to the end
    rather than park it again after the short read (then nothing would wake it before
    client_timeout)."""
    from conftest import Fifo, InThread, wait_for
    d = daemon(workers=1, client_timeout=60)
    marker, fifo = tmp_path / "holding", Fifo(tmp_path / "fifo")
    site.write("held.lua", HELD.format(marker=marker, fifo=fifo.path))
    parked = RawClient(d.address)   # accepted, read (nothing yet) and parked first
    held = InThread(lambda: _response(d.address, {b"SCRIPT_FILENAME": site.file("held.lua")
                                                  .encode()}))
    wait_for(marker.exists, what="the only worker to be held")
    parked.send(b"\x01\x01\x00")   # part of a record header
    parked.sock.shutdown(1)
    wait_for(fifo.release, what="the page to read its FIFO")
    assert split_response(held.result())[2] == b"held"
    assert parked.read_record() is None   # closed at once, not after client_timeout
    wait_for(lambda: "in the middle of a record" in d.log(), what="the malformed line")
    assert "within client_timeout" not in d.log()


def _response(address, params):
    client = RawClient(address)
    try:
        client.request(params)
        return client.response()[0]
    finally:
        client.close()
