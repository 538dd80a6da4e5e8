"""The status and ping pages, the access log and the slowlog."""

import json
import re

import pytest

from conftest import RawClient, split_response, wait_for


def fetch(address, script_name, query="", remote="127.0.0.1", **params):
    client = RawClient(address)
    try:
        client.request({b"SCRIPT_NAME": script_name.encode(), b"QUERY_STRING": query.encode(),
                        b"REMOTE_ADDR": remote.encode(), b"REQUEST_METHOD": b"GET",
                        b"REQUEST_URI": f"{script_name}?{query}".encode(),
                        **{k.encode(): v.encode() for k, v in params.items()}})
        return split_response(client.response()[0])
    finally:
        client.close()


def run(address, site, name, remote="127.0.0.1"):
    return fetch(address, "/" + name, remote=remote, SCRIPT_FILENAME=site.file(name))


@pytest.fixture
def pages(daemon):
    return daemon(status_path="/status", ping_path="/ping")


def test_ping_answers_pong(pages):
    status, headers, body = fetch(pages.address, "/ping")
    assert (status, body) == ("200 OK", b"pong\n")
    assert headers["content-type"].startswith("text/plain")


def test_status_and_ping_refuse_a_disallowed_peer(pages):
    for path in ("/status", "/ping"):
        assert fetch(pages.address, path, remote="10.1.2.3")[0] == "403 Forbidden"
        assert fetch(pages.address, path, remote="")[0] == "403 Forbidden"
    assert fetch(pages.address, "/ping", remote="::1")[0] == "200 OK"


def test_status_allow_takes_networks(daemon):
    d = daemon(ping_path="/ping", status_allow=["10.0.0.0/8"])
    assert fetch(d.address, "/ping", remote="10.1.2.3")[0] == "200 OK"
    assert fetch(d.address, "/ping", remote="127.0.0.1")[0] == "403 Forbidden"


def test_without_the_settings_the_paths_are_scripts(daemon, site):
    d = daemon()
    assert fetch(d.address, "/ping", SCRIPT_FILENAME=site.file("ping"))[0] == "404 Not Found"


def test_status_json_counters_move(pages, site):
    site.write("count.lua", "function main(env, con) con:puts('x') end")
    site.write("fail.lua", "function main(env, con) error('boom') end")
    before = json.loads(fetch(pages.address, "/status", "json")[2])
    for _ in range(5):
        assert run(pages.address, site, "count.lua")[2] == b"x"
    assert run(pages.address, site, "fail.lua")[0].startswith("500")
    # the five, the failure, the first status request and this one; a worker counts its
    # request just after the client has the response, so the last one may show a moment
    # later
    wait_for(lambda: json.loads(fetch(pages.address, "/status", "json")[2])["accepted conn"]
             >= before["accepted conn"] + 8, what="the counters")
    status, headers, body = fetch(pages.address, "/status", "json")
    assert headers["content-type"] == "application/json"
    after = json.loads(body)
    assert after["failed_requests"] == before["failed_requests"] + 1
    assert after["start since"] >= before["start since"]
    assert after["total processes"] == 3
    assert after["active processes"] >= 1   # this status request itself
    assert after["listen queue"] == 0   # a Unix socket: read through ss
    script = {s["path"]: s for s in after["scripts"]}[site.file("count.lua")]
    assert script["clones"] == 1 and script["requests"] == 5
    assert script["memory_kb"] > 0 and script["loaded_at"] > after["start time"] - 1


def test_status_plain_text(pages, site):
    site.write("a.lua", "function main(env, con) con:puts('a') end")
    run(pages.address, site, "a.lua")
    line = f"script: {site.file('a.lua')} clones 1 requests 1 loaded "
    # memory shows once the worker has given the state back
    wait_for(lambda: " KiB" in fetch(pages.address, "/status")[2].decode(), what="the state")
    status, headers, body = fetch(pages.address, "/status")
    text = body.decode()
    assert headers["content-type"].startswith("text/plain")
    assert int(text.split("\naccepted conn:        ")[1].split("\n")[0]) >= 2
    assert "idle processes:       " in text and "total processes:      3\n" in text
    assert line in text


def _samples(body):
    """Parsed by prometheus_client's OpenMetrics parser (strict: # EOF, TYPE, _total)."""
    parser = pytest.importorskip("prometheus_client.openmetrics.parser")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(body.decode())
            for s in family.samples}


def test_status_openmetrics(pages, site):
    site.write("m.lua", "function main(env, con) con:puts('m') end")
    first = fetch(pages.address, "/status", "openmetrics")
    assert first[1]["content-type"].startswith("application/openmetrics-text")
    assert first[2].endswith(b"# EOF\n")
    for line in first[2].decode().splitlines():
        assert re.match(r"(# (HELP|TYPE) )?(luafcgid|phpfpm)_|# EOF$", line)
    for _ in range(3):
        run(pages.address, site, "m.lua")
    before = _samples(first[2])
    wait_for(lambda: _samples(fetch(pages.address, "/status", "openmetrics")[2])[
        ("phpfpm_accepted_connections", ())] >= before[("phpfpm_accepted_connections", ())] + 4,
        what="the counters")
    after = _samples(fetch(pages.address, "/status", "openmetrics")[2])
    script = (("script", site.file("m.lua")),)
    assert after[("luafcgid_script_requests_total", script)] == 3
    assert after[("luafcgid_script_memory_bytes", script)] > 0
    assert after[("phpfpm_idle_processes", ())] <= 2


def test_luafcgid_own_openmetrics_families_whole():
    # every family, in order, with its samples as written: the pool's, two scripts (one
    # whose memory is unknown, and a path that needs escaping) and two shared dictionaries
    from luafcgid.ops.status import openmetrics
    own = {"failed_requests": 2, "stuck": [{}], "states": {"states": 3},
           "scripts": [{"path": "/www/a.lua", "clones": 2, "requests": 7,
                        "loaded_at": 1700000000.25, "memory_kb": 1.5},
                       {"path": '/www/q"\\b.lua', "clones": 1, "requests": 0,
                        "loaded_at": 1700000001.0, "memory_kb": None}],
           "shared": [{"name": "cache", "capacity": 65536, "free_space": 60000, "keys": 4},
                      {"name": "t", "capacity": 1048576, "free_space": 1048576, "keys": 0}]}
    assert openmetrics(own, "www") == [
        "# TYPE luafcgid_pool gauge",
        "# HELP luafcgid_pool The pool this page reports on: its name in the label.",
        'luafcgid_pool{pool="www"} 1',
        "# TYPE luafcgid_failed_requests counter",
        "# HELP luafcgid_failed_requests Requests answered with a 5xx status.",
        "luafcgid_failed_requests_total 2",
        "# TYPE luafcgid_stuck_workers gauge",
        "# HELP luafcgid_stuck_workers Workers stuck in Lua past request_timeout, which could "
        "not stop them.",
        "luafcgid_stuck_workers 1",
        "# TYPE luafcgid_states gauge",
        "# HELP luafcgid_states Lua states in the pool.",
        "luafcgid_states 3",
        "# TYPE luafcgid_script_clones gauge",
        "# HELP luafcgid_script_clones Lua states holding the script.",
        'luafcgid_script_clones{script="/www/a.lua"} 2',
        'luafcgid_script_clones{script="/www/q\\"\\\\b.lua"} 1',
        "# TYPE luafcgid_script_requests counter",
        "# HELP luafcgid_script_requests Requests served by the script's loaded states.",
        'luafcgid_script_requests_total{script="/www/a.lua"} 7',
        'luafcgid_script_requests_total{script="/www/q\\"\\\\b.lua"} 0',
        "# TYPE luafcgid_script_load_time_seconds gauge",
        "# HELP luafcgid_script_load_time_seconds Unix time the script was last loaded.",
        'luafcgid_script_load_time_seconds{script="/www/a.lua"} 1700000000.25',
        'luafcgid_script_load_time_seconds{script="/www/q\\"\\\\b.lua"} 1700000001.0',
        "# TYPE luafcgid_script_memory_bytes gauge",
        "# HELP luafcgid_script_memory_bytes Lua memory of the script's idle states.",
        'luafcgid_script_memory_bytes{script="/www/a.lua"} 1536',
        "# TYPE luafcgid_shared_capacity_bytes gauge",
        "# HELP luafcgid_shared_capacity_bytes Capacity of the shared dictionary.",
        'luafcgid_shared_capacity_bytes{dict="cache"} 65536',
        'luafcgid_shared_capacity_bytes{dict="t"} 1048576',
        "# TYPE luafcgid_shared_free_bytes gauge",
        "# HELP luafcgid_shared_free_bytes Free space in the shared dictionary.",
        'luafcgid_shared_free_bytes{dict="cache"} 60000',
        'luafcgid_shared_free_bytes{dict="t"} 1048576',
        "# TYPE luafcgid_shared_keys gauge",
        "# HELP luafcgid_shared_keys Keys stored in the shared dictionary (expired ones until "
        "they are reclaimed).",
        'luafcgid_shared_keys{dict="cache"} 4',
        'luafcgid_shared_keys{dict="t"} 0',
    ]


def test_tcp_listen_queue_is_read_from_proc(daemon):
    from conftest import free_port
    d = daemon(listen=f"127.0.0.1:{free_port()}", status_path="/status", backlog=77)
    page = json.loads(fetch(d.address, "/status", "json")[2])
    assert (page["listen queue"], page["max listen queue"], page["listen queue len"]) == (0, 0, 77)


def test_access_log_has_one_line_per_request(daemon, site, tmp_path):
    access = tmp_path / "access.log"
    d = daemon(access_log=str(access))
    site.write("hi.lua", "function main(env, con) con:puts('hello') end")
    run(d.address, site, "hi.lua")
    fetch(d.address, "/missing.lua", SCRIPT_FILENAME=site.file("missing.lua"))
    wait_for(lambda: access.exists() and len(access.read_text().splitlines()) == 2,
             what="two access log lines")
    # workers write their lines as they finish: sorted by URI, /hi.lua comes first
    first, second = sorted((line.split(" ") for line in access.read_text().splitlines()),
                           key=lambda fields: fields[2])
    # time, method, URI, status, bytes, seconds, script
    assert first[1:4] == ["GET", "/hi.lua?", "200"]
    assert int(first[4]) > len("hello") and float(first[5]) >= 0
    assert first[6] == site.file("hi.lua")
    assert second[3] == "404"


BUSY = """
function spin(seconds)
  local stop = os.time() + seconds
  while os.time() < stop do end
end
function main(env, con)
  spin(2)
  con:puts("done")
end
"""


@pytest.mark.parametrize("lua", ["5.4", "5.3", "luajit"])
def test_slowlog_writes_the_lua_traceback_once(daemon, site, tmp_path, lua):
    slow = tmp_path / "slow.log"
    d = daemon(lua=lua, slowlog=str(slow), slowlog_timeout=0.2, status_path="/status")
    site.write("busy.lua", BUSY)
    assert run(d.address, site, "busy.lua")[2] == b"done"
    wait_for(lambda: slow.exists() and "traceback" in slow.read_text(), what="the slowlog entry")
    text = slow.read_text()
    assert text.count("slow request: GET /busy.lua") == 1
    # where it was (LuaJIT names the loop's last line, and the handler by its local name)
    assert re.search(r"busy\.lua:[45]: in function 'spin'", text)
    assert "busy.lua:7: in function" in text
    wait_for(lambda: json.loads(fetch(d.address, "/status", "json")[2])["slow requests"] == 1,
             what="the slow request count")


def test_slowlog_under_lua_51_says_why_there_is_no_traceback(daemon, site, tmp_path):
    slow = tmp_path / "slow.log"
    d = daemon(lua="5.1", slowlog=str(slow), slowlog_timeout=0.2)
    site.write("busy.lua", BUSY)
    assert run(d.address, site, "busy.lua")[2] == b"done"
    wait_for(lambda: slow.exists() and "no Lua traceback" in slow.read_text(),
             what="the slowlog entry")
    assert "slow request: GET /busy.lua" in slow.read_text()
    assert "Lua 5.1 has no luaL_traceback" in slow.read_text()


SPIN_UNTIL = """
function main(env, con)
  while not io.open("{flag}") do end   -- in Lua until the slowlog has written it
  con:puts("done")
end
"""


def test_the_logs_name_the_script_apache_asked_for_without_its_proxy_prefix(
        daemon, site, tmp_path):
    """mod_proxy_fcgi sends SCRIPT_FILENAME as proxy:fcgi://HOST/path: the access log and
    the slowlog name /path, the script that ran."""
    from conftest import InThread
    access, slow, flag = tmp_path / "access.log", tmp_path / "slow.log", tmp_path / "flag"
    # Lua 5.4: LuaJIT runs no hooks in the loop it compiles
    d = daemon(lua="5.4", access_log=str(access), slowlog=str(slow), slowlog_timeout=0.1)
    script = site.write("spin.lua", SPIN_UNTIL.format(flag=flag))
    answer = InThread(lambda: fetch(d.address, "/spin.lua",
                                    SCRIPT_FILENAME=f"proxy:fcgi://localhost{script}"))
    try:
        wait_for(lambda: slow.exists() and "traceback" in slow.read_text(),
                 what="the slowlog entry")
    finally:
        flag.write_text("")
    assert answer.result()[2] == b"done"
    wait_for(lambda: access.exists() and access.read_text(), what="the access log line")
    assert access.read_text().split()[1:4] + access.read_text().split()[-1:] == [
        "GET", "/spin.lua?", "200", script]
    assert re.search(rf"slow request: GET /spin\.lua\? ran [\d.]+ s \(script {re.escape(script)}\)",
                     slow.read_text())
    assert "proxy:" not in access.read_text() + slow.read_text()
