"""Confinement: scripts run only from `roots` and with allowed `extensions`, and a Lua state
has no way to reach a Python object's attributes."""

import os

import pytest

from conftest import RawClient, Stack, split_response, wait_for

SECRET = """
    io.open(os.getenv("MARKER") or "{marker}", "w"):close()
    function main(env, con) con:puts("secret") end
"""


@pytest.fixture
def confined(tmp_path):
    """www/public is the only root (given relative to the config file); www/private holds a
    script that leaves a marker file if it ever runs. The root exists before the start,
    which refuses a missing one."""
    s = Stack(tmp_path / "stack", {"roots": ["../www/public"]})
    s.marker = str(tmp_path / "ran")
    s.write("public/ok.lua", "function main(env, con) con:puts('ok') end")
    s.write("private/secret.lua", SECRET.format(marker=s.marker))
    s.write("public2/secret.lua", SECRET.format(marker=s.marker))
    s.write("public/data.txt", SECRET.format(marker=s.marker))
    yield s.start()
    s.stop()


def raw_status(s, script):
    client = RawClient(s.daemon.address)
    client.request({b"SCRIPT_FILENAME": script.encode(), b"REQUEST_METHOD": b"GET"})
    status, _, body = split_response(client.response()[0])
    client.close()
    return status, body


def test_a_script_inside_the_roots_runs(confined):
    assert confined.get("/public/ok.lua")[:3:2] == (200, b"ok")


@pytest.mark.parametrize("path", ["/private/secret.lua", "/public2/secret.lua"],
                         ids=["outside", "sibling-with-the-root-as-prefix"])
def test_a_script_outside_the_roots_gets_403_and_never_runs(confined, path):
    assert confined.get(path)[0] == 403
    assert not os.path.exists(confined.marker)
    assert "is outside every root" in confined.daemon.log()


def test_a_symbolic_link_out_of_the_roots_gets_403(confined):
    os.symlink(confined.site.file("private/secret.lua"), confined.site.file("public/link.lua"))
    assert confined.get("/public/link.lua")[0] == 403
    assert not os.path.exists(confined.marker)


def test_dot_dot_out_of_the_roots_gets_403(confined):
    status, _ = raw_status(confined, confined.site.file("public/../private/secret.lua"))
    assert status.startswith("403")
    assert not os.path.exists(confined.marker)


def test_a_root_reached_through_a_symbolic_link_is_the_same_root(confined):
    os.symlink(confined.site.file("public"), confined.site.file("linked"))
    assert confined.get("/linked/ok.lua")[:3:2] == (200, b"ok")


def test_a_symlink_swap_deploy_serves_the_new_release_without_a_reload(tmp_path):
    # Capistrano's layout: the root is `current`, a symbolic link to the live release
    s = Stack(tmp_path, {"roots": ["../www/current"]})
    for release in ("r1", "r2"):
        s.write(f"releases/{release}/page.lua",
                f"function main(env, con) con:puts('{release}') end")
    os.symlink(s.site.file("releases/r1"), s.site.file("current"))
    s.start()
    try:
        assert s.get("/current/page.lua")[::2] == (200, b"r1")
        # the deploy: a new link renamed over the old one, atomically
        os.symlink(s.site.file("releases/r2"), s.site.file("current.new"))
        os.rename(s.site.file("current.new"), s.site.file("current"))
        answers = []

        def new_release_served():
            answers.append(s.get("/current/page.lua")[::2])
            return answers[-1] == (200, b"r2")

        wait_for(new_release_served, what="the new release to be served")
        assert set(answers) <= {(200, b"r1"), (200, b"r2")}
        assert "outside every root" not in s.daemon.log()
    finally:
        s.stop()


def test_another_extension_gets_403_and_never_runs(confined):
    status, _ = raw_status(confined, confined.site.file("public/data.txt"))
    assert status.startswith("403")
    os.symlink(confined.site.file("public/data.txt"), confined.site.file("public/alias.lua"))
    assert confined.get("/public/alias.lua")[0] == 403   # the file that would run is .txt
    assert not os.path.exists(confined.marker)
    assert "does not end with one of .lua" in confined.daemon.log()


def test_extensions_are_configurable(daemon, site):
    site.write("page.lp", "function main(env, con) con:puts('lp') end")
    d = daemon(extensions=[".lua", ".lp"])
    client = RawClient(d.address)
    client.request({b"SCRIPT_FILENAME": site.file("page.lp").encode()})
    assert split_response(client.response()[0])[2] == b"lp"


# -- the Python bridge ----------------------------------------------------------------------

ESCAPES = r"""
local reached, seen, objects = {}, {}, {}
local registry = debug.getregistry()
local pobject = registry.POBJECT
local function note(what) reached[#reached + 1] = what end

-- every value reachable from the globals, the registry, metatables and upvalues
local function walk(v, depth)
  if depth > 8 or seen[v] then return end
  local t = type(v)
  if t ~= "table" and t ~= "function" and t ~= "userdata" and t ~= "thread" then return end
  seen[v] = true
  if t == "userdata" and (getmetatable(v) == pobject and pobject ~= nil
                          or tostring(v):find("^<") or tostring(v) == "None") then
    objects[#objects + 1] = v
  end
  if t == "table" then
    for k, x in pairs(v) do walk(k, depth + 1); walk(x, depth + 1) end
  elseif t == "function" then
    for i = 1, 255 do
      local name, x = debug.getupvalue(v, i)
      if name == nil then break end
      walk(x, depth + 1)
    end
  end
  local ok, mt = pcall(getmetatable, v)
  if ok and mt then walk(mt, depth + 1) end
end
walk(_G, 0); walk(registry, 0); walk(getmetatable(con), 0); walk(con, 0)

if python ~= nil or package.loaded.python ~= nil then note("python module") end
if pcall(function() return python.eval("1") end) then note("python.eval") end
if #objects == 0 then note("found no Python objects to try (test is broken)") end

local names = {"__class__", "__globals__", "__init__", "__dict__", "__self__", "__code__",
               "__builtins__", "__subclasses__", "__reduce__", "decode", "write", "out"}
for _, obj in ipairs(objects) do
  for _, name in ipairs(names) do
    local ok, x = pcall(function() return obj[name] end)
    if ok and x ~= nil then note("index " .. name) end
    local mt = getmetatable(obj)
    if type(mt) == "table" and type(mt.__index) == "function" then
      ok, x = pcall(mt.__index, obj, name)
      if ok and x ~= nil then note("__index " .. name) end
    end
    if pcall(function() obj[name] = 1 end) then note("newindex " .. name) end
  end
  -- odd arguments: every call must fail cleanly or return nothing
  for _, args in ipairs({{}, {nil}, {{}}, {1, 2, 3}, {obj}, {print}, {"a", {}}, {{}, "b"}}) do
    local ok, x = pcall(obj, (table.unpack or unpack)(args, 1, 3))
    if ok and x ~= nil then note("call returned " .. tostring(x)) end
  end
end
con:puts(#objects, " objects; reached: ", table.concat(reached, ", "))
"""


@pytest.mark.parametrize("lua", ["luajit", "5.4"])
def test_no_route_from_lua_to_python(stack, lua):
    s = stack(lua=lua)
    s.write("escape.lua", "function main(env, con)\n" + ESCAPES + "\nend\n")
    status, _, body = s.get("/escape.lua")
    assert status == 200, body
    count, _, reached = body.partition(b" objects; reached: ")
    assert int(count) >= 2   # at least the two callbacks were found and tried
    assert reached == b""
    s.write("after.lua", "function main(env, con) con:puts('still serving') end")
    assert s.get("/after.lua")[2] == b"still serving"


def test_os_exit_does_not_stop_the_daemon(shared_stack):
    shared_stack.write("exit.lua", "function main(env, con) os.exit(1) end")
    status, _, body = shared_stack.get("/exit.lua")
    assert status == 500 and b"os.exit is not available" in body
    shared_stack.write("alive.lua", "function main(env, con) con:puts('alive') end")
    assert shared_stack.get("/alive.lua")[2] == b"alive"
