"""The shipped service files: systemd units, the FreeBSD rc.d script, the nginx site, and the
generated man page, each checked by the tool that reads it."""

import os
import shutil
import subprocess
import sys


from conftest import ROOT, free_port, nginx_binary, nginx_main_conf, skip_unless
from luafcgid.reference import man_page


def test_the_committed_man_page_is_the_generated_one():
    with open(os.path.join(ROOT, "man", "man5", "luafcgid.yaml.5"), encoding="utf-8") as stream:
        assert stream.read() == man_page(), \
            "regenerate: python -m luafcgid settings --format man > man/man5/luafcgid.yaml.5"


def test_the_cli_prints_the_man_page():
    out = subprocess.run([sys.executable, "-m", "luafcgid", "settings", "--format", "man"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out == man_page()


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    skip_unless(analyze is not None,
                "systemd-analyze is not installed (.ci/packages-ops.txt: systemd)")
    # apart from the binary's path, which only exists once luafcgid is installed
    for name in ("luafcgid.service", "luafcgid.socket"):
        with open(os.path.join(ROOT, "systemd", name)) as stream:
            unit = stream.read().replace("/usr/local/bin/luafcgid", shutil.which("true"))
        (tmp_path / name).write_text(unit)
    result = subprocess.run([analyze, "verify", str(tmp_path / "luafcgid.service"),
                             str(tmp_path / "luafcgid.socket")], capture_output=True, text=True,
                            env={**os.environ, "MANPATH": os.path.join(ROOT, "man")})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_service_speaks_the_notify_protocol():
    with open(os.path.join(ROOT, "systemd", "luafcgid.service")) as stream:
        unit = stream.read()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "RuntimeDirectory=luafcgid",
                 "User=luafcgid", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "ReadWritePaths=/var/log/luafcgid",
                 "WatchdogSec=", "Restart=always"):
        assert line in unit


def test_rc_script_is_valid_sh():
    script = os.path.join(ROOT, "rc.d", "luafcgid")
    subprocess.run(["sh", "-n", script], check=True)   # Debian's sh is dash, a strict POSIX sh
    with open(script) as stream:
        text = stream.read()
    for needle in ('rcvar="luafcgid_enable"', 'load_rc_config "$name"', "pidfile=",
                   'command_args="--daemon', 'required_files="${luafcgid_config}"',
                   'sig_reload="HUP"', "extra_commands=\"reload"):
        assert needle in text


def site_conf(tmp_path, servers=None):
    """The shipped upstream and site, as nginx's http context includes them, with their
    paths and listen port moved into `tmp_path`; `servers` replaces the upstream's server
    line."""
    site = ""
    for name in ("luafcgid-upstream.conf", "luafcgid-site.conf"):
        with open(os.path.join(ROOT, "nginx", name)) as stream:
            site += stream.read()
    port = free_port()
    site = (site.replace("listen 80;", f"listen 127.0.0.1:{port};")
            .replace("listen [::]:80;", "")
            .replace("root /srv/www;", f"root {tmp_path / 'www'};"))
    if servers is not None:
        site = site.replace("server unix:/run/luafcgid/luafcgid.sock;",
                            "".join(f"server {s};\n    " for s in servers))
    else:
        site = site.replace("/run/luafcgid/luafcgid.sock", str(tmp_path / "luafcgid.sock"))
    return site, port


def nginx_conf(tmp_path, site):
    """A main nginx.conf with temp paths that includes `site` (and the lead's location
    snippet nginx/luafcgid.conf, when it exists)."""
    d = tmp_path / "nginx"
    d.mkdir(exist_ok=True)
    (d / "site.conf").write_text(site)
    # the shipped files include fastcgi_params relative to nginx's configuration directory
    shutil.copy("/etc/nginx/fastcgi_params", d)
    snippet = os.path.join(ROOT, "nginx", "luafcgid.conf")
    extra = (f"server {{ listen 127.0.0.1:{free_port()}; root {tmp_path / 'www'}; "
             f"include {snippet}; }}")
    conf = d / "nginx.conf"
    conf.write_text(nginx_main_conf(d, f"    include {d}/site.conf;\n    {extra}"))
    return str(conf), str(d)


def test_nginx_accepts_the_shipped_site(tmp_path):
    site, _ = site_conf(tmp_path)
    conf, prefix = nginx_conf(tmp_path, site)
    result = subprocess.run([nginx_binary(), "-t", "-c", conf, "-p", prefix],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    with open(os.path.join(ROOT, "nginx", "luafcgid-upstream.conf")) as stream:
        assert "keepalive " in stream.read()
    for name in ("luafcgid-site.conf", "luafcgid.conf"):
        with open(os.path.join(ROOT, "nginx", name)) as stream:
            text = stream.read()
        assert "fastcgi_pass luafcgid;" in text and "fastcgi_keep_conn on;" in text


def test_pip_install_installs_every_package_and_lua_file(tmp_path):
    """The quick start's `pip install .`: every package of the checkout and every Lua file
    is installed, and the installed daemon starts its command line (a hand-written package
    list once missed luafcgid.shared, and the installed luafcgid failed at its first
    import)."""
    # from a copy of the tracked files, as a fresh clone has them: pip builds in the tree,
    # and a build/ left in the checkout would hand it the files a clone lacks
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split("\0")
    for path in filter(None, tracked):
        (clone / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, path), clone / path)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(clone)], check=True, capture_output=True, cwd=tmp_path)
    source = os.path.join(ROOT, "luafcgid")
    wanted = {os.path.relpath(os.path.join(directory, name), source)
              for directory, _, names in os.walk(source) for name in names
              if name == "__init__.py" or name.endswith(".lua")}
    installed = {os.path.relpath(os.path.join(directory, name), target / "luafcgid")
                 for directory, _, names in os.walk(target / "luafcgid") for name in names}
    assert wanted - installed == set()
    # run from the installed copy only: not from the checkout
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-m", "luafcgid", "--check", "-s",
                          f"listen={tmp_path / 'luafcgid.sock'}", "-s", "logfile=null", "-R"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert ": OK" in out.stdout
