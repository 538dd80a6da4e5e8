"""What scripts see of the daemon's environment (issue 18): with clear_env (the default)
only `env`, in Lua's os.getenv and in what C code and child programs read; the daemon
itself still reads its own variables (systemd's, LUA_PATH)."""

from conftest import Daemon, libfcgi_request

SECRET = "AKIA-not-a-real-secret-0123456789"

# os.getenv from Lua, the C environment as a program the script runs sees it, and a module
# found through the daemon's LUA_PATH
PAGE = """
local found = require("fromenv")
function main(env, con)
  con:puts("module:", found, "\\n")
  for _, name in ipairs({"AWS_SECRET_ACCESS_KEY", "PATH", "HOME", "FROM_DAEMON"}) do
    con:puts(name, "=>", tostring(os.getenv(name)), "\\n")
  end
  local child = io.popen("/usr/bin/env")
  con:puts(child:read("*a"))
  child:close()
end
"""


def serve_page(tmp_path, **settings):
    """The page's output from a daemon started with a secret, HOME, NOTIFY_SOCKET and
    LUA_PATH in its environment."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "fromenv.lua").write_text("return 'found through LUA_PATH'")
    page = tmp_path / "page.lua"
    page.write_text(PAGE)
    d = Daemon(tmp_path / "daemon", settings)
    d.launcher = ("/usr/bin/env", f"AWS_SECRET_ACCESS_KEY={SECRET}", "HOME=/root",
                  f"NOTIFY_SOCKET={tmp_path}/no-systemd-here", f"LUA_PATH={modules}/?.lua;;")
    d.start()
    try:
        status, _, body = libfcgi_request(d.address, {"SCRIPT_FILENAME": str(page)})
        assert status == "200 OK", body
        return body.decode()
    finally:
        assert d.stop() == 0


def test_scripts_see_only_env_by_default(tmp_path):
    body = serve_page(tmp_path, env={"PATH": "/usr/bin:/bin", "FROM_DAEMON": "$HOME"})
    assert SECRET not in body   # neither os.getenv nor the child program's environment
    assert "AWS_SECRET_ACCESS_KEY=>nil\n" in body and "HOME=>nil\n" in body
    assert "PATH=>/usr/bin:/bin\n" in body and "PATH=/usr/bin:/bin\n" in body
    assert "FROM_DAEMON=>/root\n" in body   # $NAME takes the daemon's variable
    # the daemon read LUA_PATH from its own environment all the same
    assert "module:found through LUA_PATH\n" in body


def test_without_clear_env_scripts_see_the_daemon_environment_but_systemds(tmp_path):
    body = serve_page(tmp_path, clear_env=False)
    assert f"AWS_SECRET_ACCESS_KEY=>{SECRET}\n" in body
    assert f"AWS_SECRET_ACCESS_KEY={SECRET}\n" in body
    assert "NOTIFY_SOCKET" not in body   # the service manager's word is the daemon's alone


def test_env_values_must_be_strings(tmp_path):
    d = Daemon(tmp_path, {"env": {"PORT": 8080}})
    d.start(wait=False)
    assert d.proc.wait(30) == 2
    assert "env: PORT: expected a string (quote numbers), got 8080" in d.output()
