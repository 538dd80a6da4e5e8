"""What the ecosystem tests share: the Lua VMs and which Debian packages exist for them."""

import http.client
import os

import pytest

from conftest import Stack

# Every `lua` choice luafcgid offers (lupa ships them all).
VMS = ("luajit", "5.1", "5.2", "5.3", "5.4", "5.5")

# Debian 12's lua-cjson, lua-lpeg, lua-socket, lua-sql-sqlite3, lua-filesystem and
# lua-penlight install for Lua 5.1 (used by LuaJIT too) to 5.4; there is no Lua 5.5 in it.
DEBIAN_MODULES = ("luajit", "5.1", "5.2", "5.3", "5.4")
# Debian 12's lua-wsapi installs for Lua 5.1 and 5.2 only.
DEBIAN_WSAPI = ("luajit", "5.1", "5.2")


def require_debian_modules(vm):
    if vm not in DEBIAN_MODULES:
        pytest.skip(f"Debian 12 ships no Lua modules for Lua {vm} "
                    "(its lua-* packages build for 5.1 to 5.4)")


def require_debian_wsapi(vm):
    if vm not in DEBIAN_WSAPI:
        pytest.skip(f"Debian 12's lua-wsapi installs for Lua 5.1 and 5.2 only, not {vm}")


def start_stack(path, **settings):
    return Stack(path, settings).start()


def raw_headers(port, path, method="GET", body=None, headers=None):
    """(status, [(name, value), ...] in order with repeats, body) through nginx."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def lua_headers_dir():
    """The Lua 5.1 C headers (liblua5.1-0-dev), or None."""
    for candidate in ("/usr/include/lua5.1", "/usr/include/luajit-2.1"):
        if os.path.exists(os.path.join(candidate, "lauxlib.h")):
            return candidate
    return None
