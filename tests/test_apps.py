"""Other people's Lua applications, unchanged, from their Debian packages, through nginx with
the shipped configuration: Orbit's examples (lua-orbit), the sample page of the wsapi.cgi(1)
man page (lua-wsapi) and CGILua's Lua Pages (lua-cgi)."""

import gzip
import os
import re
import shutil

import pytest

from conftest import skip_unless
from servers import Nginx, started

ORBIT = "/usr/share/doc/lua-orbit"
WSAPI_CGI_MAN = "/usr/share/man/man1/wsapi.cgi.1.gz"
CGILUA_EXAMPLES = "/usr/share/doc/lua-cgi/examples"


def packaged(path, package):
    skip_unless(os.path.exists(path), f"{path} is missing: install Debian's {package} "
                "(.ci/packages-servers.txt; a dpkg path-exclude for /usr/share/doc or "
                "/usr/share/man drops it too)")
    return path


def nginx_location(extension):
    """The shipped snippet's location, for files ending in `extension` instead of .lua."""
    with open(os.path.join(os.path.dirname(__file__), "..", "nginx", "luafcgid.conf")) as stream:
        snippet = stream.read()
    return snippet.replace(r"\.lua", "\\" + extension)


# CGILua serves .lp pages through one launcher script, which nginx names as the script while
# PATH_TRANSLATED names the page, as for Debian's cgilua.fcgi launcher. (Not cgilua.lua: the
# script's directory comes first in package.path, and require("cgilua") would find it.)
CGILUA_LAUNCHER = 'return require("wsapi.sapi").run\n'
CGILUA_LOCATION = """
    location ~ [^/]\\.lp$ {{
        include fastcgi_params;
        fastcgi_param SCRIPT_FILENAME {launcher};
        fastcgi_param PATH_TRANSLATED $document_root$fastcgi_script_name;
        fastcgi_pass luafcgid;
        fastcgi_keep_conn on;
    }}
"""


@pytest.fixture(scope="module", params=("luajit", "5.1"))
def apps(request):
    """nginx and a daemon serving .lua, Orbit's .ws launchers and CGILua's .lp pages. Debian
    ships Orbit, WSAPI and CGILua for Lua 5.1 (and so LuaJIT)."""
    launcher = "/lp-launcher.lua"   # in the site, replaced below once its path is known
    locations = nginx_location(".ws") + CGILUA_LOCATION.format(launcher="$document_root"
                                                                        + launcher)
    with started(Nginx, {"lua": request.param, "extensions": [".lua", ".ws"]},
                 locations=locations) as s:
        s.write(launcher.lstrip("/"), CGILUA_LAUNCHER)
        yield request.param, s


def copy_into(s, source, name=None):
    shutil.copy(source, s.site.file(name or os.path.basename(source)))


def test_orbit_hello_served_directly(apps):
    """hello.lua is a module (`module("hello", package.seeall, orbit.new)`) that returns
    nothing: the application is what module() left in package.loaded."""
    _, s = apps
    copy_into(s, packaged(f"{ORBIT}/hello/hello.lua", "lua-orbit"))
    status, _, body = s.server.request("/hello.lua")
    assert status == 200, body
    assert b'<p class="hello">Hello World!</p>' in body
    status, _, body = s.server.request("/hello.lua/say/Ann?greeting=Hi+")
    assert status == 200, body
    assert b'<p class="hello">Hi Ann!</p>' in body


def test_orbit_hello_through_its_ws_launcher(apps):
    """hello.ws is `return require("hello")`: it finds hello.lua beside it."""
    _, s = apps
    os.makedirs(s.site.file("launched"), exist_ok=True)
    for name in ("hello.lua", "hello.ws"):
        copy_into(s, packaged(f"{ORBIT}/hello/{name}", "lua-orbit"), f"launched/{name}")
    status, _, body = s.server.request("/launched/hello.ws/say/Bob")
    assert status == 200, body
    assert b'<p class="hello">Hello Bob!</p>' in body


def test_orbit_songs(apps):
    _, s = apps
    copy_into(s, packaged(f"{ORBIT}/songs/songs.lua", "lua-orbit"))
    status, headers, body = s.server.request("/songs.lua")
    assert status == 200, body
    songs = re.findall(rb"<tr><td>([^<]+)</td></tr>", body)
    assert len(songs) == 13
    assert (songs[0], songs[-1]) == (b"Sgt. Pepper's Lonely Hearts Club Band",
                                     b"A Day in the Life")


def man_page_sample(path):
    """The sample page of wsapi.cgi(1), as its DESCRIPTION shows it."""
    with gzip.open(path, "rt") as stream:
        roff = stream.read()
    block = roff.split("A sample dynamic page follows:", 1)[1]
    block = block.split(".fam C\n", 1)[1].split(".fam T", 1)[0]
    return "\n".join(line[4:] for line in block.replace("\\.", ".").splitlines())


def test_the_wsapi_cgi_man_page_sample(apps):
    """`module(..., package.seeall)` and a global run(): the chunk gets its module name."""
    _, s = apps
    sample = man_page_sample(packaged(WSAPI_CGI_MAN, "lua-wsapi"))
    assert "module(..., package.seeall)" in sample and "function run(wsapi_env)" in sample
    s.write("sample.lua", sample)
    status, headers, body = s.server.request("/sample.lua/extra/path")
    assert status == 200, body
    assert body == (b"<html><body><p>Hello Wsapi!</p><p>PATH_INFO: /extra/path</p>"
                    b"<p>SCRIPT_NAME: /sample.lua</p></body></html>")
    assert [v for k, v in headers if k.lower() == "content-type"] == ["text/html"]


# A CGILua form posting to itself, with a cookie. (Not through cgilua.cookies: that module
# keeps the SAPI functions of the request it was loaded in, so in a state that lives on
# between requests, later requests would read and set the first one's cookies.
# CGILua's own examples/test.lp uses it, and reaches it as cgilua.cookies, which Debian's
# CGILua no longer sets.)
CGILUA_FORM = """<%
if cgilua.POST.name then cgilua.header("Set-Cookie", "name=" .. cgilua.POST.name:gsub(" ", "+")) end
%>
<form method="post" action="form.lp?from=form"><input name="name"><input type="submit"></form>
<p>Posted: <%= cgilua.POST.name or "(nothing)" %> from <%= cgilua.QUERY.from or "(nowhere)" %></p>
<p>Cookie: <%= cgilua.servervariable("HTTP_COOKIE") or "(none)" %></p>
"""


def test_cgilua_lua_pages_and_a_form(apps):
    """CGILua's welcome page (a Lua Page) and a form. Debian's CGILua compiles pages with
    load(string), which PUC Lua 5.1 refuses (it fails the same under cgilua.cgi): LuaJIT
    only."""
    vm, s = apps
    if vm != "luajit":
        pytest.skip("Debian's CGILua calls load() with a string, which Lua 5.1 refuses")
    copy_into(s, packaged(f"{CGILUA_EXAMPLES}/index.lp", "lua-cgi"))
    os.makedirs(s.site.file("doc/us"), exist_ok=True)   # the page lists the directories in doc/
    s.write("form.lp", CGILUA_FORM)

    status, headers, body = s.server.request("/index.lp")
    assert status == 200, body
    assert b"<title>Welcome to Kepler!</title>" in body
    assert b'<li><strong><a href="doc/us/index.html">us</a></strong></li>' in body
    assert b"<strong>WSAPI SAPI 1.0</strong> and <strong>Lua 5.1</strong>" in body

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, headers, body = s.server.request("/form.lp?from=form", "POST", b"name=Ann+Lee", form)
    assert status == 200, body
    assert b"<p>Posted: Ann Lee from form</p>" in body
    assert [v for k, v in headers if k.lower() == "set-cookie"] == ["name=Ann+Lee"]

    status, _, body = s.server.request("/form.lp", headers={"Cookie": "name=Ann+Lee"})
    assert status == 200, body
    assert b"<p>Posted: (nothing) from (nowhere)</p>" in body   # each request starts afresh
    assert b"<p>Cookie: name=Ann+Lee</p>" in body
