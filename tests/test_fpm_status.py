"""The status page in php-fpm's forms: what php-fpm's exporters and dashboards read, checked
against php-fpm's field list (fpm_status.c) and, where php-fpm is installed, against the
page php-fpm itself serves."""

import glob
import json
import os
import re
import socket
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest

from conftest import Fifo, InThread, RawClient, skip_unless, split_response, wait_for
from luafcgid import config
from luafcgid.ops import fpm_status
from luafcgid.ops.scoreboard import Scoreboard
from luafcgid.ops.status import Status
from luafcgid.states.pool import StatePool
from luafcgid.states.worker import Workers

# php-fpm_exporter's request (hipages/php-fpm_exporter, phpfpm.go: Pool.Update, and the
# method and length its FastCGI client's Get adds), sent straight to the FastCGI socket
EXPORTER = {b"SCRIPT_FILENAME": b"/status", b"SCRIPT_NAME": b"/status",
            b"SERVER_SOFTWARE": b"go / php-fpm_exporter", b"REMOTE_ADDR": b"127.0.0.1",
            b"QUERY_STRING": b"json&full", b"REQUEST_METHOD": b"GET",
            b"CONTENT_LENGTH": b"0"}
# the Go types it decodes php-fpm's JSON into (a float or a string where it wants an
# integer fails the whole scrape)
HEADER_TYPES = {"pool": str, "process manager": str, "start time": int, "start since": int,
                "accepted conn": int, "listen queue": int, "max listen queue": int,
                "listen queue len": int, "idle processes": int, "active processes": int,
                "total processes": int, "max active processes": int,
                "max children reached": int, "slow requests": int}
PROCESS_TYPES = {"pid": int, "state": str, "start time": int, "start since": int,
                 "requests": int, "request duration": int, "request method": str,
                 "request uri": str, "content length": int, "user": str, "script": str,
                 "last request cpu": (int, float), "last request memory": int}


def ask(address, params):
    client = RawClient(address)
    try:
        client.request(params)
        return split_response(client.response()[0])
    finally:
        client.close()


def typed(data, types):
    return {name: type(data[name]).__name__ for name in types
            if isinstance(data.get(name), types[name]) and type(data[name]) is not bool}


def test_the_field_lists_are_php_fpms():
    assert fpm_status.HEADER == tuple(HEADER_TYPES)
    assert fpm_status.PROCESS == tuple(PROCESS_TYPES)


def test_php_fpm_exporters_request_decodes(daemon, site):
    d = daemon(status_path="/status", workers=2, states=2)
    site.write("a.lua", "function main(env, con) con:puts('a') end")
    ask(d.address, {b"SCRIPT_NAME": b"/a.lua", b"SCRIPT_FILENAME": site.file("a.lua").encode()})
    status, headers, body = ask(d.address, EXPORTER)
    assert status == "200 OK" and headers["content-type"] == "application/json"
    data = json.loads(body)
    assert list(data)[:len(HEADER_TYPES)] == list(HEADER_TYPES)
    assert len(typed(data, HEADER_TYPES)) == len(HEADER_TYPES)
    assert data["pool"] == "www" and data["process manager"] == "static"
    assert data["total processes"] == 2 == len(data["processes"])
    assert data["idle processes"] + data["active processes"] == 2
    for entry in data["processes"]:
        assert list(entry) == list(PROCESS_TYPES)
        assert len(typed(entry, PROCESS_TYPES)) == len(PROCESS_TYPES)
        # the states php-fpm_exporter counts (--phpfpm.fix-process-count)
        assert entry["state"] in ("Idle", "Running")
    # each worker apart, as the exporter labels them: by start time and pid
    assert len({(e["start time"], e["pid"]) for e in data["processes"]}) == 2

    def counted():   # a worker counts its request just after the client has the response
        return sum(e["requests"] for e in json.loads(ask(d.address, EXPORTER)[2])["processes"])

    wait_for(lambda: counted() >= 1, what="a.lua's request counted")
    # luafcgid's own figures, under their own names
    assert {"failed_requests", "stuck", "states", "scripts"} <= set(data)


def _php_fpm():
    found = sorted(glob.glob("/usr/sbin/php-fpm*"))
    return found[-1] if found else None


def test_the_same_page_as_php_fpms_own(daemon, tmp_path):
    """php-fpm 8 serves its page from a pool like ours; both are asked the exporter's way,
    and must hold the same fields, in the same order, of the same JSON types."""
    binary = _php_fpm()
    skip_unless(binary, "php-fpm is not installed")
    sock = tmp_path / "php.sock"
    conf = tmp_path / "php-fpm.conf"
    conf.write_text(f"[global]\nerror_log = {tmp_path / 'php.log'}\ndaemonize = no\n"
                    f"[www]\nlisten = {sock}\npm = static\npm.max_children = 2\n"
                    f"pm.status_path = /status\n")
    php = subprocess.Popen([binary, "-y", str(conf), "-R"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sock.exists(), what="php-fpm to listen")
        theirs = json.loads(ask(str(sock), EXPORTER)[2])
    finally:
        php.terminate()
        php.wait(10)
    ours = json.loads(ask(daemon(status_path="/status", workers=2, states=2).address,
                          EXPORTER)[2])
    assert [k for k in ours if k in theirs] == list(theirs)
    assert typed(ours, HEADER_TYPES) == typed(theirs, HEADER_TYPES)
    assert list(ours["processes"][0]) == list(theirs["processes"][0])
    for mine, php_fpms in zip(ours["processes"], theirs["processes"]):
        assert typed(mine, PROCESS_TYPES) == typed(php_fpms, PROCESS_TYPES)


SLOW = """
function main(env, con)
  local gate = io.open("{fifo}")   -- blocks until the test opens the FIFO for writing
  gate:read(2)
  gate:close()
  local t = {{}}
  for i = 1, 5000 do t[i] = i end
  con:puts("done")
end
"""


def test_a_slow_request_is_listed_with_its_uri_under_json_full(stack, tmp_path):
    s = stack(status_path="/status.lua", workers=3, states=3)
    gates = [Fifo(tmp_path / "gate1"), Fifo(tmp_path / "gate2")]
    for number, gate in enumerate(gates, 1):
        s.write(f"slow{number}.lua", SLOW.format(fifo=gate.path))
    slow = [InThread(s.get, "/slow1.lua?id=7"), InThread(s.get, "/slow2.lua")]

    def page():
        return json.loads(s.get("/status.lua?json&full")[2])

    def running():
        now = page()
        found = {e["request uri"]: e for e in now["processes"] if e["state"] == "Running"}
        return {"/slow1.lua?id=7", "/slow2.lua"} <= set(found) and (now, found)

    try:
        wait_for(running, what="the slow requests on the status page")
        now, found = running()
        entry = found["/slow1.lua?id=7"]
        assert entry["request method"] == "GET" and entry["script"] == s.site.file("slow1.lua")
        assert entry["request duration"] > 0 and entry["last request memory"] == 0
        assert now["active processes"] == 3 and now["idle processes"] == 0   # and the page's
        assert now["max active processes"] == 3
        # the third worker serves a page, then the second slow request ends: whichever of
        # the two serves the next status page, the other shows its last request, idle, as
        # php-fpm shows an idle process's
        s.write("a.lua", "function main(env, con) local t = {} for i = 1, 5000 do t[i] = i "
                         "end con:puts('a') end")
        assert s.get("/a.lua")[2] == b"a"
        wait_for(gates[1].release, what="the second slow request at its gate")
        assert slow[1].result()[2] == b"done"
        idle = []

        def one_idle():
            # a worker counts its request just after the client has the response
            idle[:] = [e for e in page()["processes"] if e["state"] == "Idle"]
            return len(idle) == 1

        wait_for(one_idle, what="the worker of the second slow request idle again")
        assert idle[0]["request uri"] in ("/a.lua", "/slow2.lua")
        assert idle[0]["last request memory"] > 5000 * 8 and idle[0]["requests"] >= 1
        assert 0 < idle[0]["request duration"] and idle[0]["last request cpu"] >= 0
        assert [e["request uri"] for e in page()["processes"]
                if e["pid"] == entry["pid"]] == ["/slow1.lua?id=7"]   # still running
    finally:
        for thread, gate in zip(slow, gates):
            if not thread.done():
                wait_for(gate.release, what="a slow request at its gate")
    assert slow[0].result()[2] == b"done"


def test_plain_text_full_reads_as_php_fpms(daemon):
    d = daemon(status_path="/status", workers=3)
    body = ask(d.address, {b"SCRIPT_NAME": b"/status", b"QUERY_STRING": b"full",
                           b"REMOTE_ADDR": b"127.0.0.1"})[2].decode()
    header, *blocks = body.split("\n\n************************\n")
    # what the php-fpm scripts of monitoring tools match
    fields = dict(re.findall(r"^([a-z ]+):\s+(.+)$", header, re.MULTILINE))
    assert fields["pool"] == "www" and fields["total processes"] == "3"
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}", fields["start time"])
    assert int(fields["accepted conn"]) >= 1 and fields["failed requests"] == "0"
    assert len(blocks) == 3
    for block in blocks:
        lines = block.strip().split("\n")
        assert [line[:22].rstrip().rstrip(":") for line in lines] == [
            "request URI" if name == "request uri" else name for name in fpm_status.PROCESS]


def test_xml_html_and_openmetrics(daemon):
    d = daemon(status_path="/status", workers=2, states=2)

    def page(query):
        return ask(d.address, {b"SCRIPT_NAME": b"/status", b"QUERY_STRING": query,
                               b"REMOTE_ADDR": b"127.0.0.1"})

    status, headers, body = page(b"xml&full")
    assert headers["content-type"].startswith("text/xml")
    root = ElementTree.fromstring(body)
    assert [child.tag for child in root][:14] == [n.replace(" ", "-") for n in fpm_status.HEADER]
    assert len(root.find("processes")) == 2
    assert any(uri.text == "/status?xml&full" for uri in root.iter("request-uri"))
    status, headers, body = page(b"html")
    assert headers["content-type"].startswith("text/html")
    assert b"<tr><th>total processes</th><td>2</td></tr>" in body
    status, headers, body = page(b"openmetrics")
    parser = pytest.importorskip("prometheus_client.openmetrics.parser")
    samples = {s.name: s.value for family in parser.text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples["phpfpm_up"] == 1 and samples["phpfpm_total_processes"] == 2
    assert samples["phpfpm_accepted_connections"] >= 3
    assert samples["luafcgid_failed_requests_total"] == 0


def test_full_lists_the_workers_of_every_process(daemon, site):
    d = daemon(processes=2, workers=2, states=2, status_path="/status")
    site.write("p.lua", "function main(env, con) con:puts('p') end")

    def every_worker():
        ask(d.address, {b"SCRIPT_NAME": b"/p.lua", b"SCRIPT_FILENAME": site.file("p.lua").encode()})
        page = json.loads(ask(d.address, EXPORTER)[2])
        return len(page.get("serving_processes", ())) == 2 and len(page["processes"]) == 4 \
            and page

    wait_for(every_worker, what="both processes' workers on the page")
    page = every_worker()
    assert page["total processes"] == 4
    assert len({entry["pid"] for entry in page["processes"]}) == 4   # thread ids
    for entry in page["processes"]:
        assert len(typed(entry, PROCESS_TYPES)) == len(PROCESS_TYPES)
    tids = {pid: set(os.listdir(f"/proc/{pid}/task")) for pid in
            (slot["pid"] for slot in page["serving_processes"])}
    # each worker's pid is a thread of one serving process, two in each
    owners = [[pid for pid, threads in tids.items() if str(e["pid"]) in threads]
              for e in page["processes"]]
    assert all(len(owner) == 1 for owner in owners)
    assert sorted(len([o for o in owners if o[0] == pid]) for pid in tids) == [2, 2]


def test_a_full_listing_in_one_process_is_seen_by_every_process(tmp_path):
    """A request's CPU time and its state's memory (last request cpu and memory) cost two
    system calls and a call into the state: workers take them only once the workers were
    listed in full (test_a_slow_request_is_listed... shows them then), and the process that
    answered the listing tells the others through the supervisor's scoreboard, which every
    process reads at its tick."""
    board, listener = Scoreboard(2), socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    listener.listen()
    answering, other = (Status(Workers(str), lambda: listener, board, publish=lambda: None)
                        for _ in range(2))
    assert not other.listed()
    pool_config = next(iter(config.defaults().pools.values()))
    answering.status_page({b"QUERY_STRING": b"json&full"}, pool_config, StatePool(
        None, 1, 1, 0))
    assert answering.listed() and other.listed()
    board.max_children_reached += 1   # the supervisor's field is apart
    assert board.listed and board.max_children_reached == 1
