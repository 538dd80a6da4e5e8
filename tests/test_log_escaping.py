"""No request and no script can forge a log line: every field is written with its control
bytes, backslashes and bytes that are not UTF-8 as \\xNN, as nginx writes them. Through
nginx with the shipped snippet, which decodes "%0a" in a URI into SCRIPT_FILENAME."""

import re

import pytest

from conftest import RawClient, wait_for
from luafcgid.ops.logs import escape
from servers import Nginx, server_stack  # noqa: F401, F811  (a fixture)

# what an attacker would like a log to show, after a line feed of their own
FORGED = "2024-01-01T00:00:00+0000 GET /admin 200 5 0.001 /srv/www/admin"


def url(text):
    """`text` in a URL path, with its spaces, line feeds, ... percent-encoded."""
    return "".join(c if c.isalnum() or c in "/-_.:+,[" else "%%%02X" % ord(c) for c in text)


def lines_of(path, count):
    wait_for(lambda: path.exists() and path.read_text().count("\n") >= count,
             what=f"{count} lines in {path.name}")
    return path.read_text().splitlines()


@pytest.mark.parametrize("text, shown", [
    ("plain /x.lua?a=1", "plain /x.lua?a=1"),
    ("é ü 日本", "é ü 日本"),                          # UTF-8 stays readable
    ("a\nb\r\nc\x1b[31m\x00\t\x7f", "a\\x0Ab\\x0D\\x0Ac\\x1B[31m\\x00\\x09\\x7F"),
    ("back\\slash", "back\\x5Cslash"),                  # so that \\x0A always means a byte
    ("C1 \x85 \x9b", "C1 \\xC2\\x85 \\xC2\\x9B"),       # NEL, CSI: the bytes that were there
    ("LS \u2028 PS \u2029", "LS \\xE2\\x80\\xA8 PS \\xE2\\x80\\xA9"),   # line breaks too
    (b"not \xff\xfe UTF-8 \xc3", "not \\xFF\\xFE UTF-8 \\xC3"),
    ("/a\udcff.lua", "/a\\xFF.lua"),                     # os.fsdecode's undecodable byte
])
def test_escape_writes_unsafe_bytes_as_hex(text, shown):
    assert escape(text) == shown


def test_escape_keeps_only_continuation_lines_of_a_multi_line_entry():
    assert (escape("slow\n\tframe 1\n\tframe\n2\x1b", continued=True)
            == "slow\n\tframe 1\n\tframe\\x0A2\\x1B")


def test_a_line_feed_in_a_url_forges_no_access_log_line(server_stack, tmp_path):
    access = tmp_path / "access.log"
    s = server_stack(Nginx, {"access_log": str(access)})
    forged = {"\n": "\\x0A", "\r\n": "\\x0D\\x0A", "\x1b[2J\r": "\\x1B[2J\\x0D"}
    for bad in forged:
        assert s.server.request(url(f"/x{bad}{FORGED}.lua"))[0] == 404
    # a raw FastCGI client sends what it likes, bytes that are not UTF-8 too
    client = RawClient(s.daemon.address)
    client.request({b"SCRIPT_FILENAME": s.site.file("nothing.lua").encode(),
                    b"REQUEST_METHOD": b"GET\nPOST", b"REQUEST_URI": b"/a\xff\\b\r\n"})
    client.response()
    client.close()
    lines = lines_of(access, len(forged) + 1)
    assert len(lines) == len(forged) + 1
    for line, (bad, shown) in zip(sorted(lines[:-1]), sorted(forged.items())):
        # time, method, URI (as sent, percent-encoded), status, bytes, seconds, script
        assert line.split(" ", 4)[1:4] == ["GET", url(f"/x{bad}{FORGED}.lua"), "404"]
        assert line.endswith(s.site.file(f"x{shown}{FORGED}.lua"))
    assert lines[-1].split(" ")[1:4] == ["GET\\x0APOST", "/a\\xFF\\x5Cb\\x0D\\x0A", "404"]


# and an error log line
FORGED_ERROR = "1999-01-01 00:00:00,000 ERROR [worker-1] FORGED"


def error_log(daemon, marker):
    """The daemon's log lines, once one holds `marker`; asserts that none was forged."""
    wait_for(lambda: marker in daemon.log(), what=marker)
    lines = daemon.log().splitlines()
    assert not [line for line in lines if line.startswith(("1999-", "FORGED"))]
    return [line for line in lines if marker in line]


def test_a_line_feed_in_a_refused_script_name_forges_no_error_log_line(server_stack, tmp_path):
    s = server_stack(Nginx, {"roots": [str(tmp_path)]})   # every page is outside them
    assert s.server.request(url(f"/dir/x\n{FORGED_ERROR} y.lua"))[0] == 403
    shown = s.site.file("dir/x\\x0A" + FORGED_ERROR + " y.lua")
    [refused] = error_log(s.daemon, "refused")
    assert f"refused {shown}: {shown} is outside every root" in refused


def test_a_line_feed_in_a_script_name_or_lua_message_forges_no_error_log_line(server_stack):
    s = server_stack(Nginx)
    name = f"bad\n{FORGED_ERROR}.lua"
    s.write(name, 'function main(env, con) error("one\\nFORGED two \\27[31m", 0) end')
    assert s.server.request(url("/" + name))[0] == 500
    [error] = error_log(s.daemon, "Runtime Error")
    shown = s.site.file("bad\\x0A" + FORGED_ERROR + ".lua")
    assert error.endswith(f"Runtime Error in {shown}: one\\x0AFORGED two \\x1B[31m")


def test_con_log_forges_no_error_log_line(server_stack):
    s = server_stack(Nginx)
    s.write("log.lua", r"""
        function main(env, con)
          con:log("one\nFORGED line\r\n\27[2J\\")
          con:puts("ok")
        end""")
    assert s.server.request("/log.lua")[::2] == (200, b"ok")
    [logged] = error_log(s.daemon, "FORGED line")
    assert logged.endswith(s.site.file("log.lua") + ": one\\x0AFORGED line\\x0D\\x0A\\x1B[2J\\x5C")


def test_the_slowlog_keeps_its_frames_on_their_lines_and_forges_none(daemon, site, tmp_path):
    slow = tmp_path / "slow.log"
    d = daemon(lua="5.4", slowlog=str(slow), slowlog_timeout=0.2)
    # runs until its slowlog entry is written (a frame of it names the script)
    path = site.write("slow\nFORGED.lua", f"""
        function wait_for_entry()
          while true do
            local f = io.open("{slow}")
            local text = f and f:read("a") or ""
            if f then f:close() end
            if text:find("traceback", 1, true) then return end
          end
        end
        function main(env, con) wait_for_entry(); con:puts("done") end
    """)
    client = RawClient(d.address, timeout=60)
    client.request({b"SCRIPT_FILENAME": path.encode(), b"REQUEST_METHOD": b"GET",
                    b"REQUEST_URI": b"/slow\n1999 FORGED\n\tframe"})
    assert client.response()[0].endswith(b"done")
    client.close()
    first, *rest = slow.read_text().splitlines()
    assert " slow request: GET /slow\\x0A1999 FORGED\\x0A\\x09frame ran " in first
    # every line after the first is a frame (a tab first), the script named in one
    assert rest[0] == "stack traceback:" and all(line[0] == "\t" for line in rest[1:])
    assert [line for line in rest
            if re.search(r"slow\\x0AFORGED\.lua:\d+: in function 'wait_for_entry'", line)]
