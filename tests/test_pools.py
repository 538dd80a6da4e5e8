"""Several pools in one daemon (php-fpm's [pool] sections), through raw FastCGI on each pool's
own socket: each serves its own roots with its own handler, status page, access log and
users; SIGHUP adds and removes pools; the config names each pool's problems."""

import contextlib
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import tempfile

import pytest
import yaml

from conftest import (AS_ROOT, ROOT, Fifo, InThread, RawClient, can_connect, skip_unless,
                      split_response, wait_for)
from luafcgid import config

A_PAGE = 'function main(env, con) con:puts("A") end\n'
B_PAGE = 'function run(env, con) con:puts("B") end\n'


def _get(address, script, **params):
    client = RawClient(address)
    try:
        params = {"SCRIPT_FILENAME": script, "SCRIPT_NAME": "/" + os.path.basename(script),
                  "REQUEST_METHOD": "GET", "REMOTE_ADDR": "127.0.0.1",
                  **{k.upper(): v for k, v in params.items()}}
        client.request({k.encode(): v.encode() for k, v in params.items()})
        status, _, body = split_response(client.response()[0])
    finally:
        client.close()
    return status, body.decode()


def _sites(tmp_path):
    """Two document roots, a (a main handler) and b (a run handler)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "page.lua").write_text(A_PAGE)
    (b / "page.lua").write_text(B_PAGE)
    return str(a), str(b)


def _two_pools(daemon, tmp_path, **top):
    a, b = _sites(tmp_path)
    shop = str(tmp_path / "shop.sock")
    d = daemon(listen=str(tmp_path / "www.sock"), **top, pools={
        "www": {"roots": [a]},
        "shop": {"listen": shop, "roots": [b], "handler": "run", "processes": 2}})
    wait_for(lambda: can_connect(shop), what="pool shop to listen")
    return d, shop, os.path.join(a, "page.lua"), os.path.join(b, "page.lua")


def test_two_pools_serve_their_own_roots_with_their_own_handlers(daemon, tmp_path):
    """Each socket runs its pool's scripts with its pool's handler; a script under the other
    pool's root is refused there (403, as any script outside roots), never run."""
    d, shop, a_page, b_page = _two_pools(daemon, tmp_path)
    assert _get(d.address, a_page) == ("200 OK", "A")
    assert _get(shop, b_page) == ("200 OK", "B")
    assert _get(d.address, b_page)[0].startswith("403")
    assert _get(shop, a_page)[0].startswith("403")
    log = d.log()
    assert "pool shop: process 2 (pid" in log and "pool www: process 1 (pid" in log
    # the worker threads are named for their pool
    assert "[shop/worker-" in log and f"refused {a_page}" in log


def _status(address):
    status, body = _get(address, "/status", script_name="/status", query_string="json")
    assert status == "200 OK"
    return json.loads(body)


def test_each_pool_has_its_own_status_page_and_counters(daemon, tmp_path):
    """status?json names the pool and counts its requests only (php-fpm's `pool` and
    `accepted conn`), whichever of its processes answers."""
    d, shop, a_page, b_page = _two_pools(daemon, tmp_path, status_path="/status")
    for _ in range(5):
        assert _get(d.address, a_page) == ("200 OK", "A")
    assert _get(shop, b_page) == ("200 OK", "B")
    # the processes publish their counters every second; the status request itself is
    # accepted (running) as it is answered
    wait_for(lambda: _status(d.address)["accepted conn"] == 6, what="pool www's 5 requests")
    wait_for(lambda: _status(shop)["accepted conn"] == 2, what="pool shop's 1 request")
    assert (_status(d.address)["pool"], _status(shop)["pool"]) == ("www", "shop")
    assert _status(shop)["total processes"] == 2 * 3   # its 2 processes' workers
    metrics = _get(shop, "/status", script_name="/status", query_string="openmetrics")[1]
    assert 'luafcgid_pool{pool="shop"} 1\n' in metrics


HELD_PAGE = """
function main(env, con)
  io.open("{marks}/" .. env.QUERY_STRING, "w"):close()
  io.open("{fifo}"):read("*a")
  con:puts("held")
end
"""


def test_max_children_reached_counts_requests_waiting_on_a_full_pool(daemon, tmp_path):
    """php-fpm's `max children reached`, per pool: a request that waits while its pool
    runs all its processes counts once (and is served when a process is free)."""
    a, b = _sites(tmp_path)
    marks, fifo = tmp_path / "marks", Fifo(tmp_path / "fifo")
    marks.mkdir()
    held = os.path.join(b, "held.lua")
    with open(held, "w") as stream:
        stream.write(HELD_PAGE.format(marks=marks, fifo=fifo.path))
    shop = str(tmp_path / "shop.sock")
    d = daemon(listen=str(tmp_path / "www.sock"), status_path="/status", pools={
        "www": {"roots": [a]},
        "shop": {"listen": shop, "roots": [b], "pm": "ondemand", "processes": 1,
                 "workers": 2}})
    requests = [InThread(lambda n=n: _get(shop, held, query_string=str(n))) for n in range(2)]
    wait_for(lambda: len(os.listdir(marks)) == 2, what="two requests held in shop's process")
    waiting = InThread(lambda: _get(shop, held, query_string="2"))
    wait_for(lambda: "pool shop: a request waits, and the pool runs all its 1 processes"
             in d.log(), what="the third request to wait")

    def released():
        fifo.release()
        return all(r.done() for r in requests + [waiting])

    wait_for(released, what="the held requests to finish")
    assert [r.result() for r in requests + [waiting]] == [("200 OK", "held")] * 3
    assert _status(shop)["max children reached"] == 1
    assert _status(d.address)["max children reached"] == 0


def test_each_pool_writes_its_own_access_log(daemon, tmp_path):
    """A pool's access_log gets its own requests, %n naming the pool, and none of the
    other's."""
    d, shop, a_page, b_page = _two_pools(
        daemon, tmp_path, access_format="%n %f", access_log=str(tmp_path / "www.access"))
    d.write_config(pools={**d.settings["pools"], "shop": {
        **d.settings["pools"]["shop"], "access_log": str(tmp_path / "shop.access")}})
    d.signal(signal.SIGHUP)
    wait_for(lambda: os.path.exists(tmp_path / "shop.access"), what="shop's access log")
    wait_for(lambda: "reloaded" in d.log() and d.log().count("reloaded") >= 3,
             what="every process to reload")
    _get(d.address, a_page)
    _get(shop, b_page)
    _get(shop, b_page)
    # a worker writes its line once the response has gone
    wait_for(lambda: (tmp_path / "shop.access").read_text().count("\n") == 2,
             what="shop's two lines")
    wait_for(lambda: (tmp_path / "www.access").read_text().count("\n") == 1,
             what="www's line")
    assert (tmp_path / "shop.access").read_text() == f"shop {b_page}\n" * 2
    assert (tmp_path / "www.access").read_text() == f"www {a_page}\n"


SHARED_PAGE = """
local cache = require("luafcgid").shared.cache
function main(env, con)
  if env.QUERY_STRING then cache:set("owner", env.QUERY_STRING) end
  con:puts(tostring(cache:get("owner")))
end
"""


def test_each_pool_has_its_own_shared_dictionaries(daemon, tmp_path):
    """Two pools with a dictionary of the same name: what one pool's scripts store, the
    other's never read."""
    a, b = _sites(tmp_path)
    for root in (a, b):
        with open(os.path.join(root, "shared.lua"), "w") as stream:
            stream.write(SHARED_PAGE)
    shop = str(tmp_path / "shop.sock")
    d = daemon(listen=str(tmp_path / "www.sock"), shared={"cache": "1M"}, pools={
        "www": {"roots": [a]}, "shop": {"listen": shop, "roots": [b]}})
    wait_for(lambda: can_connect(shop), what="pool shop to listen")
    assert _get(d.address, os.path.join(a, "shared.lua"), query_string="www") == (
        "200 OK", "www")
    assert _get(shop, os.path.join(b, "shared.lua")) == ("200 OK", "nil")
    assert _get(shop, os.path.join(b, "shared.lua"), query_string="shop") == ("200 OK", "shop")
    assert _get(d.address, os.path.join(a, "shared.lua")) == ("200 OK", "www")


# Stores "marker of POOL;" in the pool's dictionary, then lists this process's anonymous
# shared mappings (what it inherited from the supervisor), each with the pools whose marker
# its memory holds, read through the FFI as a hostile script would.
MEMORY_PAGE = """
local ffi = require("ffi")
local cache = require("luafcgid").shared.cache

local function scan()
  local lines = {}
  for line in io.lines("/proc/self/maps") do
    local first, last = line:match("^(%x+)-(%x+) rw%-s .* /dev/zero %(deleted%)$")
    if first then
      local at = tonumber(first, 16)
      local memory = ffi.string(ffi.cast("const char *", at), tonumber(last, 16) - at)
      local pools = {}
      for pool in memory:gmatch("marker of (%w+);") do pools[#pools + 1] = pool end
      lines[#lines + 1] = first .. "-" .. last .. " " .. table.concat(pools, ",")
    end
  end
  return table.concat(lines, "\\n")
end

function main(env, con)
  cache:set("marker", "marker of " .. env.QUERY_STRING .. ";")
  con:puts(cache:get("marker"), "\\n", scan())
end
"""
WWW_SIZE, SHOP_SIZE = 1100 << 10, 1300 << 10   # distinctive dictionary sizes


def _memory_sites(tmp_path):
    a, b = _sites(tmp_path)
    for root in (a, b):
        with open(os.path.join(root, "memory.lua"), "w") as stream:
            stream.write(MEMORY_PAGE)
    return os.path.join(a, "memory.lua"), os.path.join(b, "memory.lua")


def _pool(root, size, **settings):
    return {"roots": [os.path.dirname(root)], "shared": {"cache": f"{size >> 10}K"}, **settings}


def _memory(address, page, pool):
    """What pool `pool`'s memory page read back from its dictionary, and its process's
    shared mappings: address range -> the pools whose marker it holds."""
    status, body = _get(address, page, query_string=pool)
    assert status == "200 OK", body
    got, *lines = body.split("\n")
    mappings = {}
    for line in lines:
        span, _, pools = line.partition(" ")
        mappings[span] = set(filter(None, pools.split(",")))
    return got, mappings


def _size(span):
    first, last = (int(end, 16) for end in span.split("-"))
    return last - first


def _shared_mappings(pid):
    with open(f"/proc/{pid}/maps") as stream:
        return {line.split()[0] for line in stream
                if line.split()[1] == "rw-s" and line.rstrip().endswith("/dev/zero (deleted)")}


def _only_its_own(d, pool, mappings, size, others, other_size):
    """A process of `pool` maps its own dictionary (of `size`; the scan found its marker
    there, and so reads the memory) and nothing of the other pool's (`others`, its
    process's mappings, its dictionary of `other_size`): no mapping in common, no marker;
    the supervisor maps both."""
    assert [_size(span) for span, pools in mappings.items() if pools] == [size]
    assert all(pools == {pool} for pools in mappings.values() if pools)
    assert other_size not in map(_size, mappings)
    assert not set(mappings) & set(others)
    assert set(mappings) | set(others) <= _shared_mappings(d.proc.pid)


def test_a_pools_processes_do_not_map_the_other_pools_memory(daemon, tmp_path):
    """With the FFI a script reads any memory of its process: a serving process keeps its
    own pool's dictionaries, scoreboard and hand-off mapped and unmaps every other pool's,
    which the supervisor, which forks them all, keeps."""
    www_page, shop_page = _memory_sites(tmp_path)
    shop = str(tmp_path / "shop.sock")
    d = daemon(listen=str(tmp_path / "www.sock"), ffi=True, pools={
        "www": _pool(www_page, WWW_SIZE),
        "shop": _pool(shop_page, SHOP_SIZE, listen=shop, processes=2)})
    wait_for(lambda: can_connect(shop), what="pool shop to listen")
    got, shop_mappings = _memory(shop, shop_page, "shop")
    assert got == "marker of shop;"
    got, www_mappings = _memory(d.address, www_page, "www")
    assert got == "marker of www;"
    _only_its_own(d, "www", www_mappings, WWW_SIZE, shop_mappings, SHOP_SIZE)


def test_a_pool_added_by_sighup_does_not_map_the_others_memory(daemon, tmp_path):
    """The processes of a pool added at a reload are forked from the supervisor, which
    holds the other pools' memory: they unmap it too."""
    www_page, shop_page = _memory_sites(tmp_path)
    shop = str(tmp_path / "shop.sock")
    d = daemon(listen=str(tmp_path / "www.sock"), ffi=True,
               pools={"www": _pool(www_page, WWW_SIZE)})
    got, www_mappings = _memory(d.address, www_page, "www")
    assert got == "marker of www;"
    d.write_config(pools={"www": _pool(www_page, WWW_SIZE),
                          "shop": _pool(shop_page, SHOP_SIZE, listen=shop)})
    d.signal(signal.SIGHUP)
    wait_for(lambda: can_connect(shop), what="the added pool to listen")
    got, shop_mappings = _memory(shop, shop_page, "shop")
    assert got == "marker of shop;"
    _only_its_own(d, "shop", shop_mappings, SHOP_SIZE, www_mappings, WWW_SIZE)


def test_sighup_adds_a_pool_and_removes_one(daemon, tmp_path):
    """A pool added to the file is bound and served at a reload; one removed stops (its
    socket refuses, its file is gone), and the others serve on."""
    a, b = _sites(tmp_path)
    shop = str(tmp_path / "shop.sock")
    d = daemon(listen=str(tmp_path / "www.sock"), pools={"www": {"roots": [a]}})
    assert not os.path.exists(shop)
    d.write_config(pools={"www": {"roots": [a]},
                          "shop": {"listen": shop, "roots": [b], "handler": "run"}})
    d.signal(signal.SIGHUP)
    wait_for(lambda: can_connect(shop), what="the added pool to listen")
    assert _get(shop, os.path.join(b, "page.lua")) == ("200 OK", "B")
    d.write_config(pools={"shop": {"listen": shop, "roots": [b], "handler": "run"}})
    d.signal(signal.SIGHUP)
    wait_for(lambda: not os.path.exists(d.address), what="the removed pool's socket file")
    assert not can_connect(d.address)
    wait_for(lambda: "pool www: removed from the configuration" in d.log(), what="the log")
    assert _get(shop, os.path.join(b, "page.lua")) == ("200 OK", "B")
    assert d.stop() == 0


def test_a_bad_reload_keeps_every_pool_serving(daemon, tmp_path):
    d, shop, a_page, b_page = _two_pools(daemon, tmp_path)
    d.write_config(pools={"www": {}, "shop": {"logfile": "x.log", "workers": "many"}})
    d.signal(signal.SIGHUP)
    wait_for(lambda: "pools.shop.workers: expected an integer" in d.log(), what="the refusal")
    assert "logfile: applies to the whole daemon; set it at the top level, not in pool " \
           "'shop'" in d.log()
    assert _get(d.address, a_page) == ("200 OK", "A")
    assert _get(shop, b_page) == ("200 OK", "B")


# -- the config ---------------------------------------------------------------------------

def problems(tmp_path, text):
    path = tmp_path / "luafcgid.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    return info.value.problems


def test_without_pools_there_is_one_pool_named_www(tmp_path):
    c = config.defaults(workers=2)
    assert list(c.pools) == ["www"]
    assert (c.pools["www"].workers, c.pools["www"].pool_name) == (2, "www")


def test_top_level_settings_are_every_pools_defaults(tmp_path):
    path = tmp_path / "luafcgid.yaml"
    path.write_text("workers: 5\nhandler: serve\npools:\n  www:\n  shop: {workers: 2, "
                    "listen: ./shop.sock}\n")
    c = config.load(str(path))
    www, shop = c.pools["www"], c.pools["shop"]
    assert (www.workers, www.handler, shop.workers, shop.handler) == (5, "serve", 2, "serve")
    assert shop.listen == str(tmp_path / "shop.sock")   # relative to the file, as at top


@pytest.mark.parametrize("text, problem", [
    ("pools: {shop: {bogus: 1, listen: s.sock}}", "pools.shop.bogus: unknown setting"),
    ("pools: {shop: {logfile: x.log, listen: s.sock}}",
     "logfile: applies to the whole daemon; set it at the top level, not in pool 'shop'"),
    ("pools: {shop: {lua: '5.4'}}",
     "lua: applies to the whole daemon; set it at the top level, not in pool 'shop'"),
    ("pools: {shop: {workers: many}}",
     "pools.shop.workers: expected an integer, got a string ('many')"),
    ("pools: {'shop site': {}}",
     "pools: 'shop site': a pool's name is letters, digits, - and _ (as php-fpm's)"),
    ("pools: {}", "pools: empty: name at least one pool (e.g. www: {}), or leave pools out "
                  "for one pool named www"),
    ("pools: {www: {}, shop: {}}",
     "pools.shop.listen: /run/luafcgid/luafcgid.sock is pool 'www's already; each pool "
     "listens on its own socket"),
    ("pools: {www: {}, shop: {listen: ./s.sock, workers: 8, states: 4}}",
     "pools.shop.states: must be at least workers (8), got 4"),
    ("pools: {shop: [1]}",
     "pools: shop: expected a mapping of the settings the pool changes ({} for none), got "
     "a list"),
])
def test_each_pool_problem_is_named(tmp_path, text, problem):
    assert problem in problems(tmp_path, text + "\n")


def test_check_names_a_pools_missing_root(tmp_path):
    """--check (preflight) checks every pool, and names it."""
    path = tmp_path / "luafcgid.yaml"
    path.write_text(yaml.safe_dump({
        "listen": str(tmp_path / "www.sock"), "logfile": None,
        "pools": {"www": {}, "shop": {"listen": str(tmp_path / "shop.sock"),
                                       "roots": [str(tmp_path / "missing")]}}}))
    result = subprocess.run([sys.executable, "-m", "luafcgid", "--check", "-c", str(path),
                             *AS_ROOT], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert f"pools.shop.roots: no such directory: {tmp_path / 'missing'}" in result.stderr


# -- users --------------------------------------------------------------------------------

UID_PAGE = """
function main(env, con)
  con:puts(io.open("/proc/self/status"):read("*a"):match("\\nUid:%s+(%d+)"))
end
"""


def _user(name):
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@contextlib.contextmanager
def _pools_of_two_users(daemon, tmp_path, code):
    """Pools www (as nobody) and shop (as luafcgid) serving a page of `code` from a directory
    both may read: (the daemon, shop's address, the page)."""
    skip_unless(_user("luafcgid") is not None and _user("nobody") is not None,
                "needs the users luafcgid and nobody (.ci/run creates luafcgid)")
    site = tempfile.mkdtemp(prefix="luafcgid-pools-")
    try:
        os.chmod(site, 0o755)
        page = os.path.join(site, "page.lua")
        with open(page, "w") as stream:
            stream.write(code)
        os.chmod(page, 0o644)
        shop = str(tmp_path / "shop.sock")
        d = daemon(listen=str(tmp_path / "www.sock"), roots=[site], pools={
            "www": {"user": "nobody"}, "shop": {"listen": shop, "user": "luafcgid"}})
        wait_for(lambda: can_connect(shop), what="pool shop to listen")
        yield d, shop, page
    finally:
        subprocess.run(["rm", "-rf", site], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_pools_of_different_users_run_as_their_user(daemon, tmp_path):
    """The supervisor stays root; each pool's processes run as its user."""
    with _pools_of_two_users(daemon, tmp_path, UID_PAGE) as (d, shop, page):
        assert _get(d.address, page) == ("200 OK", str(_user("nobody")))
        assert _get(shop, page) == ("200 OK", str(_user("luafcgid")))
        assert "the supervisor stays root" in d.log()
        # a reload replaces each process (its user may not read the file), which goes on
        # writing to the error log the supervisor (root) opened
        d.signal(signal.SIGHUP)
        wait_for(lambda: d.log().count(") is replaced by process 2 (pid ") == 2,
                 what="both processes to be replaced")
        assert "reload refused" not in d.log()
        assert _get(d.address, page) == ("200 OK", str(_user("nobody")))
        assert _get(shop, page) == ("200 OK", str(_user("luafcgid")))
        d.signal(signal.SIGUSR1)
        wait_for(lambda: d.log().count("SIGUSR1: log files reopened") == 3,
                 what="the supervisor and both processes to reopen the logs")
        assert "cannot reopen" not in d.output()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_sigusr1_moves_other_users_processes_to_the_new_error_log(daemon, tmp_path):
    """After logrotate moved the error log, SIGUSR1 replaces the processes that became
    another user (they may not open the root-owned file again): their successors write to
    the new file."""
    failing = 'function main(env, con) error("marker " .. env.QUERY_STRING) end'
    with _pools_of_two_users(daemon, tmp_path, failing) as (d, shop, page):
        assert _get(d.address, page, query_string="www-before")[0] == "500 Internal Server Error"
        assert "marker www-before" in d.log()
        rotated = d.settings["logfile"] + ".1"
        os.rename(d.settings["logfile"], rotated)
        d.signal(signal.SIGUSR1)
        replaced = re.compile(r"process 1 \(pid (\d+)\) is replaced by process 2")
        wait_for(lambda: len(replaced.findall(d.log())) == 2, what="both processes replaced")
        for pid in replaced.findall(d.log()):
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what=f"pid {pid} to end")
        assert _get(d.address, page, query_string="www-after")[0] == "500 Internal Server Error"
        assert _get(shop, page, query_string="shop-after")[0] == "500 Internal Server Error"
        assert "marker www-after" in d.log() and "marker shop-after" in d.log()
        with open(rotated) as stream:
            assert "marker www-before" in stream.read()
