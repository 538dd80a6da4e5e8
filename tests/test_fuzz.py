"""Property-based tests of the FastCGI decoders: any bytes, however they are cut into
reads, give a result or a ProtocolError (nothing else escapes), and whatever is encoded is
decoded back. Bounded for CI."""

from hypothesis import given, settings
from hypothesis import strategies as st

from luafcgid import config as configuration
from luafcgid.request import fastcgi as fcgi
from luafcgid.request.params import route, whole
from luafcgid.request.parser import Parser

BOUNDED = settings(max_examples=300, deadline=None)

pairs = st.dictionaries(st.binary(max_size=300), st.binary(max_size=300), max_size=8)


@BOUNDED
@given(st.binary(max_size=2000))
def test_decode_params_accepts_or_refuses_any_bytes(data):
    try:
        result = fcgi.decode_params(data)
    except fcgi.ProtocolError:
        return
    assert all(type(k) is bytes and type(v) is bytes for k, v in result.items())


def _routed(data):
    """What route() (Lua) and decode_params (Python) make of `data`: the same, or both
    refuse it with the same reason."""
    try:
        python = fcgi.decode_params(data)
    except fcgi.ProtocolError as exc:
        try:
            route(data)
        except fcgi.ProtocolError as refused:
            assert str(refused) == str(exc)
            return
        raise AssertionError(f"Lua read what Python refused ({exc})")
    assert route(data) == (python.get(b"SCRIPT_FILENAME", b""), python.get(b"SCRIPT_NAME"),
                           python.get(b"CONTENT_LENGTH"))


@BOUNDED
@given(st.binary(max_size=2000))
def test_lua_and_python_read_any_bytes_alike(data):
    _routed(data)


names = st.sampled_from([b"SCRIPT_FILENAME", b"SCRIPT_NAME", b"CONTENT_LENGTH", b"SCRIPT_NAMEX",
                         b"X" * 15])


@BOUNDED
@given(st.lists(st.tuples(st.one_of(names, st.binary(max_size=200)), st.binary(max_size=300)),
                max_size=8), st.integers(0, 40))
def test_lua_and_python_read_pairs_alike_whole_or_cut(items, cut):
    """Valid pairs (repeated names: the later wins), and the same cut short."""
    data = fcgi.encode_params(items)
    _routed(data)
    _routed(data[:max(0, len(data) - cut)])


@BOUNDED
@given(pairs)
def test_params_round_trip(params):
    assert fcgi.decode_params(fcgi.encode_params(params)) == params


def _read_all(data, cuts=(), **settings_):
    """Every request a Parser reads from `data`, fed in pieces cut at `cuts`, then EOF, as
    (request_id, keep_conn, params decoded, body, too_large)."""
    limits = configuration.defaults(**settings_)
    parser = Parser()
    requests = []
    for start, stop in zip([0, *cuts], [*cuts, len(data)]):
        parser.received(data[start:stop])
        while (request := parser.next(limits)) is not None:
            requests.append((request.id, request.keep, fcgi.decode_params(request.params),
                             request.body, request.too_large))
        if parser.closing:
            return requests
    parser.eof()
    return requests


record = st.builds(
    lambda version, rtype, rid, content, padding: (
        fcgi.HEADER.pack(version, rtype, rid, len(content), padding) + content + b"\0" * padding),
    st.sampled_from([1, 1, 1, 0, 2]), st.integers(0, 12), st.integers(0, 3),
    st.binary(max_size=64), st.integers(0, 9))


cut_points = st.lists(st.integers(0, 3000), max_size=6).map(sorted)


@BOUNDED
@given(st.one_of(st.binary(max_size=3000), st.lists(record, max_size=12).map(b"".join)),
       cut_points)
def test_record_reading_accepts_or_refuses_any_stream(data, cuts):
    cuts = [c for c in cuts if c <= len(data)]
    try:
        requests = _read_all(data, cuts, max_params=1024)
    except fcgi.ProtocolError:
        return
    for request_id, keep_conn, params, body, too_large in requests:
        assert 0 < request_id < 4 and isinstance(params, dict) and type(body) is bytes
    # however the stream is cut, the same requests come out
    assert _read_all(data, max_params=1024) == requests


@BOUNDED
@given(pairs, st.binary(max_size=3000), st.integers(1, 0xFFFF), st.data())
def test_a_valid_request_reads_back_however_it_is_split(params, body, request_id, data):
    stream = bytearray(fcgi.begin_request(request_id))
    encoded = fcgi.encode_params(params)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=4)))
    for start, stop in zip([0] + cuts, cuts + [len(encoded)]):
        if stop > start:
            stream += fcgi.record(fcgi.PARAMS, request_id, encoded[start:stop])
    stream += fcgi.record(fcgi.PARAMS, request_id)
    stream += fcgi.stream(fcgi.STDIN, request_id, body) + fcgi.record(fcgi.STDIN, request_id)
    received = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    (request,) = _read_all(bytes(stream), received)
    assert request == (request_id, False, params, body, False)


@BOUNDED
@given(pairs, st.booleans(), st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)),
                                      max_size=3), st.integers(0, 60))
def test_a_get_as_nginx_sends_it_reads_alike_whole_and_byte_by_byte(params, keep, changes, cut):
    """Read whole in one call into Lua (params.whole) or record by record, a GET of request 1
    with any bytes changed, or cut short, comes out the same, or is refused by both."""
    stream = bytearray(fcgi.begin_request(1, flags=fcgi.KEEP_CONN if keep else 0)
                       + fcgi.record(fcgi.PARAMS, 1, fcgi.encode_params(params))
                       + fcgi.record(fcgi.PARAMS, 1) + fcgi.record(fcgi.STDIN, 1))
    for at, value in changes:
        stream[at % len(stream)] = value
    data = bytes(stream[:len(stream) - cut if cut < 40 else cut - 40])   # or its first bytes

    def outcome(cuts):
        try:
            return _read_all(data, cuts, max_params=1024)
        except fcgi.ProtocolError as exc:
            return str(exc)

    assert outcome(()) == outcome(range(1, len(data)))
    if not changes and not cut and params:   # (the whole path was taken)
        assert whole(data, 1024)[:2] == (keep, fcgi.encode_params(params))
