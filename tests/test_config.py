"""The config file: checking, defaults, generated documents, --check."""

import os
import subprocess
import sys

import pytest

from conftest import AS_ROOT
from luafcgid import config
from luafcgid.reference import sample_config, settings_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    path = tmp_path / "luafcgid.yaml"
    path.write_text(text)
    return str(path)


def problems(tmp_path, text):
    with pytest.raises(config.ConfigError) as info:
        config.load(write(tmp_path, text))
    return info.value.problems


def test_defaults_are_the_originals_except_listen_showerrors_and_the_pool():
    c = config.defaults()
    # states: 64, not the original's 5, which serialised the pages of a real site, and retries
    # a time in ms (issue 17)
    assert (c.workers, c.states, c.max_clones, c.sweep, c.retries) == (3, 64, 3, 1000, 20)
    # the original showed Lua messages on error pages by default; PHP's production
    # display_errors does not, nor does luafcgid
    assert (c.showerrors, c.buffering, c.handler, c.httpstatus, c.contenttype) == (
        False, True, "main", "200 OK", "text/html")
    assert (c.maxpost, c.headers, c.finishhandler) == (1048576, ("X-Powered-By: Lua",), None)
    assert c.listen == "/run/luafcgid/luafcgid.sock"   # never a TCP port on every interface
    assert c.listen_mode == 0o660


def test_every_problem_is_named_with_its_key(tmp_path):
    found = problems(tmp_path, "workers: many\nbogus: 1\nshowerrors: 'yes'\nlua: 6.0\n")
    assert "bogus: unknown setting" in found
    assert any(p.startswith("workers: expected an integer") for p in found)
    assert any(p.startswith("showerrors: expected true or false") for p in found)
    assert any(p.startswith("lua: expected one of luajit") for p in found)


def test_states_below_workers_is_refused(tmp_path):
    assert problems(tmp_path, "workers: 8\nstates: 4\n") == [
        "states: must be at least workers (8), got 4"]


def test_headers_accept_the_original_string_and_a_list(tmp_path):
    c = config.load(write(tmp_path, 'headers: "X-A: 1\\r\\nX-B: 2\\r\\n"\n'))
    assert c.headers == ("X-A: 1", "X-B: 2")
    c = config.load(write(tmp_path, "headers: ['X-A: 1', 'X-B: 2']\n"))
    assert c.headers == ("X-A: 1", "X-B: 2")
    assert problems(tmp_path, "headers: ['no colon']\n")[0].startswith("headers: expected")


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    c = config.load(write(tmp_path, "listen: ./run/l.sock\nlogfile: logs/l.log\n"))
    assert c.listen == str(tmp_path / "run" / "l.sock")
    assert c.logfile == str(tmp_path / "logs" / "l.log")
    c = config.load(write(tmp_path, "listen: 127.0.0.1:9000\n"))
    assert c.listen == "127.0.0.1:9000"


def test_lua_version_written_as_a_yaml_number(tmp_path):
    assert config.load(write(tmp_path, "lua: 5.1\n")).lua == "5.1"


def test_shipped_sample_config_is_generated_from_the_table():
    with open(os.path.join(ROOT, "etc", "luafcgid.yaml")) as stream:
        assert stream.read() == sample_config(), "run: luafcgid settings --format yaml > etc/luafcgid.yaml"
    # and it loads as it is
    config.load(os.path.join(ROOT, "etc", "luafcgid.yaml"))


def test_settings_reference_is_generated_from_the_table():
    with open(os.path.join(ROOT, "docs", "settings.md")) as stream:
        assert stream.read() == settings_reference(), "run: luafcgid settings > docs/settings.md"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "luafcgid", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_check_passes_a_good_config_and_names_every_problem(tmp_path):
    good = run_cli("-c", write(tmp_path, f"workers: 2\nstates: 4\nlisten: {tmp_path}/l.sock\n"),
                   "--check", *AS_ROOT)
    assert good.returncode == 0 and "OK" in good.stdout
    bad = run_cli("-c", write(tmp_path, "workers: 0\nnope: 1\n"), "--check")
    assert bad.returncode == 2
    assert "nope: unknown setting" in bad.stderr
    assert "workers: must be at least 1, got 0" in bad.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_cli("-c", str(tmp_path / "absent.yaml"), "--check")
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("luafcgid 2.")
