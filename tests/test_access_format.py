"""access_format: php-fpm's access.format codes, checked field by field through nginx."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, RawClient, split_response, wait_for
from luafcgid import config
from luafcgid.ops import access_format

PAGE = """
function main(env, con)
  local body = con:gets()
  con:header("Status", "201 Created")
  con:header("X-Page", "made here")
  con:puts("got ", #body, " bytes")
  local t = {}
  for i = 1, 20000 do t[i] = i end   -- some memory, some CPU
end
"""

CODES = ["%R", "%u", "%m", "%r", "%Q", "%q", "%s", "%O", "%f", "%l", "%d", "%{mili}d",
         "%{micro}d", "%M", "%{kilo}M", "%C", "%{%Y}t", "%T", "%{HTTP_X_TRACE}e",
         "%{SERVER_PROTOCOL}e", "%{x-page}o", "%{X-None}o", "%n", "%p", "%P", "%%"]


def _lines(path, count):
    wait_for(lambda: os.path.exists(path) and len(open(path).read().splitlines()) >= count,
             what=f"{count} access log line(s)")
    return open(path).read().splitlines()


def test_every_code_through_nginx(stack, tmp_path):
    log = str(tmp_path / "access.log")
    s = stack(access_log=log, access_format="|".join(CODES))
    s.write("page.lua", PAGE)
    before = time.time()
    status, headers, body = s.get("/page.lua?a=1&b=two", method="POST", body=b"x" * 300,
                                  headers={"X-Trace": "trace-7",
                                           "Content-Type": "application/x-www-form-urlencoded"})
    assert (status, body) == (201, b"got 300 bytes")
    fields = dict(zip(CODES, _lines(log, 1)[0].split("|")))
    assert fields["%R"] == "127.0.0.1"
    assert fields["%u"] == ""          # no remote user: empty, as php-fpm writes it
    assert fields["%m"] == "POST"
    assert fields["%r"] == "/page.lua"
    assert (fields["%Q"], fields["%q"]) == ("?", "a=1&b=two")
    assert fields["%s"] == "201"
    assert int(fields["%O"]) > len(body) + len("Status: 201 Created\r\nX-Page: made here\r\n")
    assert fields["%f"] == s.site.file("page.lua")
    assert fields["%l"] == "300"
    seconds, mili, micro = float(fields["%d"]), float(fields["%{mili}d"]), int(fields["%{micro}d"])
    assert re.fullmatch(r"\d+\.\d{3}", fields["%d"]) and re.fullmatch(r"\d+\.\d{3}", fields["%{mili}d"])
    assert 0 < micro < 10_000_000 and abs(mili - micro / 1000) < 0.002 and seconds <= mili
    memory = int(fields["%M"])
    assert memory > 20000 * 8 and int(fields["%{kilo}M"]) == memory // 1024   # the table
    assert re.fullmatch(r"\d+\.\d\d", fields["%C"]) and float(fields["%C"]) > 0
    assert fields["%{%Y}t"] == time.strftime("%Y", time.localtime(before))
    written = time.mktime(time.strptime(fields["%T"], "%d/%b/%Y:%H:%M:%S %z"))
    assert before - 2 <= written <= time.time() + 1
    assert fields["%{HTTP_X_TRACE}e"] == "trace-7"
    assert fields["%{SERVER_PROTOCOL}e"] == "HTTP/1.1"
    assert fields["%{x-page}o"] == "made here"
    assert fields["%{X-None}o"] == "-"
    assert fields["%n"] == "www"
    assert fields["%p"] == str(s.daemon.proc.pid)
    assert fields["%P"] == str(os.getpid())   # the test started the daemon
    assert fields["%%"] == "%"


def test_the_default_line_is_the_one_luafcgid_always_wrote(stack, tmp_path):
    log = str(tmp_path / "access.log")
    s = stack(access_log=log)
    s.write("hi.lua", "function main(env, con) con:puts('hello') end")
    assert s.get("/hi.lua?x=1")[0] == 200
    stamp, method, uri, status, sent, seconds, script = _lines(log, 1)[0].split(" ")
    assert time.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")
    assert (method, uri, status, script) == ("GET", "/hi.lua?x=1", "200", s.site.file("hi.lua"))
    assert int(sent) > len("hello") and re.fullmatch(r"\d+\.\d{6}", seconds)


def test_json_lines(stack, tmp_path):
    log = str(tmp_path / "access.log")
    s = stack(access_log=log, access_format="json")
    s.write("j.lua", 'function main(env, con) con:puts("j") end')
    assert s.get('/j.lua?q="quoted"')[0] == 200
    entry = json.loads(_lines(log, 1)[0])
    assert entry["method"] == "GET" and entry["uri"] == '/j.lua?q="quoted"'
    assert entry["status"] == 200 and isinstance(entry["bytes"], int) and entry["bytes"] > 1
    assert isinstance(entry["seconds"], float) and entry["script"] == s.site.file("j.lua")
    assert entry["remote_addr"] == "127.0.0.1" and entry["pid"] == s.daemon.proc.pid
    assert time.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S%z")


def test_a_mapping_names_its_own_fields(stack, tmp_path):
    log = str(tmp_path / "access.log")
    s = stack(access_log=log, access_format={"who": "%R %u", "code": "%s", "ua": "%{HTTP_USER_AGENT}e"})
    s.write("m.lua", 'function main(env, con) con:puts("m") end')
    assert s.get("/m.lua", headers={"User-Agent": 'say "hi"\\'})[0] == 200
    # the value a JSON reader gets is the text line's field: escaped for the log
    assert json.loads(_lines(log, 1)[0]) == {"who": "127.0.0.1 ", "code": 200,
                                             "ua": 'say "hi"\\x5C'}


def test_every_field_is_escaped_in_text_and_json(daemon, site, tmp_path):
    for spec, parse in (("%m|%{HTTP_X_EVIL}e|%f",
                         lambda line: dict(zip(("m", "evil", "f"), line.split("|")))),
                        ({"m": "%m", "evil": "%{HTTP_X_EVIL}e", "f": "%f"}, json.loads)):
        log = tmp_path / f"access-{type(spec).__name__}.log"
        d = daemon(access_log=str(log), access_format=spec)
        site.write("e.lua", "function main(env, con) con:puts('e') end")
        client = RawClient(d.address)
        client.request({b"SCRIPT_FILENAME": site.file("e.lua").encode(),
                        b"REQUEST_METHOD": b"GET\nforged 200",
                        b"HTTP_X_EVIL": b"a\r\nb\x1b[31m\xff\\"})
        assert split_response(client.response()[0])[2] == b"e"
        client.close()
        lines = _lines(str(log), 1)
        assert len(lines) == 1
        assert parse(lines[0]) == {"m": "GET\\x0Aforged 200",
                                   "evil": "a\\x0D\\x0Ab\\x1B[31m\\xFF\\x5C",
                                   "f": site.file("e.lua")}
        d.stop()


@pytest.mark.parametrize("spec, message", [
    ("%x", "unknown code %x"),
    ("%{a}m", "%m takes no {argument}"),
    ("%e", "%e needs a name in braces"),
    ("%{hours}d", "%d takes seconds, mili"),
    ("%{giga}M", "%M takes bytes, kilo"),
    ("%{user}C", "%C takes {total} only"),
    ("%{nope", "a { without its closing }"),
    ("a%", "a % code is missing"),
    ("one\nline", "control characters"),
    ({"status": 200}, "a mapping of JSON names to formats"),
])
def test_a_bad_format_is_refused_with_what_is_wrong(spec, message):
    with pytest.raises(config.ConfigError) as refused:
        config.defaults(access_format=spec)
    assert "access_format: " in str(refused.value) and message in str(refused.value)


def test_check_refuses_a_bad_format(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("access_format: '%R %{HTTP_HOST}x'\n")
    checked = subprocess.run([sys.executable, "-m", "luafcgid", "-c", str(path), "--check"],
                             capture_output=True, text=True, cwd=ROOT)
    assert checked.returncode != 0
    assert "access_format: at '%{HTTP_HOST}x' (offset 3): unknown code %x" in checked.stderr


def test_the_format_says_what_it_needs_measured():
    assert not access_format.compile(access_format.DEFAULT).measure_cpu
    assert not access_format.compile("json").measure_memory
    both = access_format.compile("%C %{mega}M")
    assert both.measure_cpu and both.measure_memory
