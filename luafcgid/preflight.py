"""What starting a config would meet on this machine, checked before anything starts: by
--check, at start and at a reload, so that --check passes only what starts.

A checked config can still fail here: pages that would run as root, a user or group that
does not exist, a directory that is missing (luafcgid creates none: a typo in a path
should not make a directory, as root, anywhere), a TCP listener open to every host.
"""

import grp
import os
import pwd

from .listener import parse_tcp
from .ops import privileges
from .request.clients import ClientsError, admission, exposure


def _root(config, allow_root):
    if os.geteuid() != 0 or config.user or allow_root:
        return []
    return ["user: not set, and luafcgid was started as root: every page would run as root, "
            "able to read and change anything on this machine. Set user (e.g. luafcgid), or "
            "pass -R (--allow-to-run-as-root) to run pages as root on purpose"]


def _names(config):
    problems = []
    try:
        privileges.target(config)
    except privileges.PrivilegeError as exc:
        problems.append(str(exc))
    for name, lookup in (("listen_owner", pwd.getpwnam), ("listen_group", grp.getgrnam)):
        value = getattr(config, name)
        if value and config.unix_socket:
            try:
                lookup(value)
            except KeyError:
                problems.append(f"{name}: no such {'user' if name == 'listen_owner' else 'group'} "
                                f"{value!r}")
    return problems


def _directories(config, binds, daemon=False):
    """The directories `config` (a pool's) writes in; with `daemon`, the daemon-wide ones."""
    problems = []
    files = ([("logfile", config.logfile), ("pidfile", config.pidfile)] if daemon else
             [("access_log", config.access_log), ("slowlog", config.slowlog)])
    if binds and config.unix_socket and not daemon:
        files.insert(0, ("listen", config.listen))
    for name, path in files:
        if path and not os.path.isdir(os.path.dirname(path) or "."):
            problems.append(f"{name}: the directory {os.path.dirname(path)} does not exist "
                            f"(luafcgid creates none; create it, owned by the user luafcgid "
                            f"runs as)")
    for root in () if daemon else config.roots:
        if not os.path.isdir(root):
            problems.append(f"roots: no such directory: {root}")
    return problems


def _listener(config, passed, pools):
    if passed is not None and pools > 1:
        return ["the socket systemd passed serves one pool; with several, each pool binds "
                "its own listen (leave socket activation out)"]
    if passed is not None:
        try:
            admission(config.allowed_clients, passed)
        except ClientsError as exc:
            return [f"the socket systemd passed: {exc}"]
        return []
    if config.unix_socket:
        return []
    problem = exposure(parse_tcp(config.listen)[0], config.allowed_clients)
    return [problem] if problem else []


def problems(config, allow_root=False, passed=None):
    """Every problem starting `config` here would meet, one line each naming its setting
    (and its pool, when the file names pools).
    `allow_root`: -R was given; `passed`: the socket systemd passed, served instead of
    binding `listen`."""
    found = _directories(config, binds=False, daemon=True)
    for pool in config.pools.values():
        found += [pool.prefix + problem for problem in
                  _root(pool, allow_root) + _names(pool) + _directories(pool, passed is None)
                  + _listener(pool, passed, len(config.pools))]
    return found
