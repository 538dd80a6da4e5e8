"""The invariant matrix: the same invariants under every setting that touches the request path.

A test that checks one feature in one configuration missed a refactor that broke the finish
handler for every request. Here every invariant runs under each combination of a pairwise
covering set of the settings below: every value of every setting meets every value of every
other setting in at least one combination. Each combination gets one daemon behind one
nginx, shared by its tests; the last test stops it and reads its whole log.

Invariants, for each combination:
- a state's globals persist across requests (a counter increments, per state);
- the finish handler, when set, ran after every earlier request of its state;
- every request gets exactly one complete response (through nginx, and record by record);
- after a script error, the next request on that script succeeds;
- an edited script is reloaded;
- concurrent requests to one page run at once, also when the site has more pages than
  `states` and they fill the pool (the "many" pages);
- the log holds no ERROR line but the ones the test provoked, and the daemon drains and
  exits 0.
"""

import itertools
import os
import threading

import pytest
from conftest import GATED_PAGE, RawClient, Stack, all_in_flight_at_once, wait_for

from luafcgid.request import fastcgi as fcgi
from luafcgid.states import vm

VMS = [choice for choice in vm.MODULES if vm.available(choice)]

# setting -> the values it takes; "keepalive" is nginx's (cached upstream connections per
# nginx worker, with fastcgi_keep_conn on), "pages" the site's (fewer pages than `states`, or
# more, served before the tests so that they fill the pool), every other one is luafcgid's
FACTORS = {
    "lua": VMS,
    "finishhandler": [None, "after"],
    "buffering": [True, False],
    "request_timeout": [0, 5],
    "memory_limit": ["128M", None],
    "prelude": [False, True],
    "processes": [1, 2],
    "keepalive": [0, 8],
    "pages": ["few", "many"],
}

STATES = {"few": 16, "many": 4}   # the site has 7 pages of its own


def pairwise(factors):
    """A small list of combinations (dicts) in which every pair of values of two different
    factors appears at least once: greedily, the candidate covering most uncovered pairs."""
    names = list(factors)
    uncovered = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]

    def pairs(row):
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}

    chosen = []
    while uncovered:
        best = max(candidates, key=lambda row: len(pairs(row) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


COMBINATIONS = pairwise(FACTORS)


def _name(combination):
    return "-".join(f"{k}={v}" for k, v in combination.items())


COUNTER = """
    count, finished = 0, 0
    -- with the pid: forked serving processes can make a table at the same address
    local id = io.open("/proc/self/stat"):read("*l"):match("^%d+") .. "/" ..
      (tostring({}):match("0x%x+") or tostring({}))
    function main(env, con)
      count = count + 1
      con:header("Content-Type", "text/plain")
      con:puts(id, " ", count, " ", finished, " ", PRELUDE or "-")
    end
    function after(env, con) finished = finished + 1 end
"""

ECHO = """
    function main(env, con)
      local body = con:gets()
      con:puts(#body, ":", body)
    end
"""

BIG = """
    local line = string.rep("0123456789abcdef", 4) .. "\\n"
    function main(env, con)
      for i = 1, 3000 do con:puts(i, " ", line) end   -- about 200 KB, three records or more
      con:flush()
      con:puts("end\\n")
    end
"""

FAILING = """
    function main(env, con)
      if env.QUERY_STRING == "fail" then error("intentional failure") end
      con:puts("ok")
    end
"""

EXPECTED_ERROR = "intentional failure"


def big_body():
    line = "0123456789abcdef" * 4 + "\n"
    return ("".join(f"{i} {line}" for i in range(1, 3001)) + "end\n").encode()


@pytest.fixture(scope="module", params=COMBINATIONS, ids=_name)
def combination(request, tmp_path_factory):
    """(settings, a started Stack) for one combination."""
    factors = dict(request.param)
    keepalive = factors.pop("keepalive")
    pages = factors.pop("pages")
    states = STATES[pages]
    fillers = 2 * states + 2 if pages == "many" else 0
    root = tmp_path_factory.mktemp("matrix")
    settings = {"workers": 2, "states": states, "showerrors": True,
                **{k: v for k, v in factors.items() if k != "prelude"}}
    s = Stack(root, settings, keepalive=keepalive)
    if factors["prelude"]:
        settings["prelude"] = s.write("prelude.lua", 'PRELUDE = "prelude"\n')
        s.daemon.settings["prelude"] = settings["prelude"]
    for name, code in (("counter.lua", COUNTER), ("echo.lua", ECHO), ("big.lua", BIG),
                       ("failing.lua", FAILING), ("gated.lua", GATED_PAGE)):
        s.write(name, code)
    for n in range(fillers):
        s.write(f"filler{n}.lua", f"function main(env, con) con:puts({n}) end\n")
    s.start()
    for _ in range(2):   # each process (processes: 2) likely sees each page
        for n in range(fillers):
            assert s.get(f"/filler{n}.lua")[2] == str(n).encode()
    yield request.param, s
    s.stop()


def test_globals_persist_and_the_finish_handler_ran(combination):
    factors, s = combination
    seen = {}   # state id -> counts in the order served
    for _ in range(12):
        status, _, body = s.get("/counter.lua")
        assert status == 200, body
        state, count, finished, prelude = body.decode().split()
        seen.setdefault(state, []).append(int(count))
        # the finish handler runs after each response, so before the state's next request
        expected_finished = int(count) - 1 if factors["finishhandler"] else 0
        assert int(finished) == expected_finished, body
        assert prelude == ("prelude" if factors["prelude"] else "-")
    for state, counts in seen.items():
        assert counts == list(range(counts[0], counts[0] + len(counts))), seen
    if factors["finishhandler"]:
        # a state is busy until its finish handler ran, so the next request may get a
        # clone; never more than the pool allows (every request in a new state would
        # mean the globals did not persist)
        assert len(seen) <= factors["processes"] * 2, seen
    else:
        # a state is released before its response goes out, so requests one at a time
        # reuse one state per serving process
        assert len(seen) <= factors["processes"], seen


def _strict_response(client, request_id):
    """The response to `request_id`, reading record by record: STDOUT records of that
    request, the empty one that ends the stream, then END_REQUEST. Returns the stdout bytes."""
    out = []
    while True:
        record = client.read_record()
        assert record is not None, "connection closed before END_REQUEST"
        rtype, rid, content = record
        assert rid == request_id, f"record of request {rid} while answering {request_id}"
        assert rtype == fcgi.STDOUT, f"record type {rtype} in a response"
        if not content:
            break
        out.append(content)
    record = client.read_record()
    assert record == (fcgi.END_REQUEST, request_id, fcgi.END_BODY.pack(0, fcgi.REQUEST_COMPLETE))
    return b"".join(out)


def test_every_request_gets_exactly_one_complete_response(combination):
    _, s = combination
    big = big_body()
    cases = [("GET", "/big.lua", None, big), ("POST", "/echo.lua", b"x" * 5000,
                                              b"5000:" + b"x" * 5000),
             ("GET", "/failing.lua", None, b"ok")]
    results = []

    def client(n):
        for i in range(6):
            method, path, body, expected = cases[(n + i) % len(cases)]
            try:
                status, _, data = s.get(path, method=method, body=body)
            except Exception as exc:   # recorded, and asserted on below
                status, data = None, repr(exc).encode()
            results.append((path, status, data == expected))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    assert not any(c.is_alive() for c in clients)
    assert len(results) == 24
    assert [r for r in results if r[1:] != (200, True)] == []

    # Directly on the daemon's socket: three requests on one kept connection, then one
    # that closes it; nothing may follow the last END_REQUEST.
    client = RawClient(s.daemon.address, timeout=30)
    try:
        for request_id, keep in ((1, True), (2, True), (3, True), (4, False)):
            client.request({b"SCRIPT_FILENAME": s.site.file("big.lua").encode(),
                            b"REQUEST_METHOD": b"GET"}, request_id=request_id, keep_conn=keep)
            stdout = _strict_response(client, request_id)
            assert stdout.endswith(b"\r\n\r\n" + big)
        assert client.buf == b"" and client.closed()
    finally:
        client.close()
    assert "[error]" not in s.nginx.error_log()


def test_after_a_script_error_the_next_request_succeeds(combination):
    _, s = combination
    for _ in range(3):
        status, _, body = s.get("/failing.lua?fail")
        assert status == 500 and EXPECTED_ERROR.encode() in body
        status, _, body = s.get("/failing.lua")
        assert (status, body) == (200, b"ok")


def test_an_edited_script_is_reloaded(combination, tmp_path):
    _, s = combination
    path = s.site.file("edited.lua")

    def publish(version):
        # as editors and deploy tools do: a new file renamed over the old one
        draft = str(tmp_path / "draft.lua")
        with open(draft, "w") as stream:
            stream.write(f'function main(env, con) con:puts("{version}") end\n')
        os.replace(draft, path)

    publish("v1")
    assert s.get("/edited.lua")[2] == b"v1"
    publish("v2")
    wait_for(lambda: all(s.get("/edited.lua")[2] == b"v2" for _ in range(6)),
             what="every state of the edited script to reload")


def test_concurrent_requests_to_one_page_run_at_once(combination):
    _, s = combination
    all_in_flight_at_once(s, "gated.lua", 2)   # `workers`: at once even in one process


def test_zz_drains_and_logged_no_unexpected_error(combination):
    """Last for its combination: stopping drains every request (finish handlers included),
    so the whole log is there to read."""
    _, s = combination
    assert s.stop() == 0
    log = s.daemon.log()
    unexpected = [line for line in log.splitlines()
                  if " ERROR " in line and EXPECTED_ERROR not in line]
    assert unexpected == []
    assert "busy=0" in log
