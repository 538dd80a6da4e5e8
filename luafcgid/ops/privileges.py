"""Dropping root: after the socket is bound and the logs and the pidfile are open, run as
`user` (and `group`), before any thread starts (setuid() applies to the calling thread's
credentials; Python makes it process-wide, and no worker exists yet to miss it)."""

import grp
import logging
import os
import pwd
import sysconfig

from ..states import vm
from . import logs

log = logging.getLogger("luafcgid")


class PrivilegeError(Exception):
    pass


def target(config):
    """(name, uid, gid) of config.user and config.group, or None without user; a
    PrivilegeError says why they cannot be had (also before anything starts: preflight)."""
    if not config.user:
        if config.group:
            raise PrivilegeError("group: set user too (group only applies with user)")
        return None
    try:
        entry = pwd.getpwnam(config.user)
    except KeyError:
        raise PrivilegeError(f"user: no such user {config.user!r}") from None
    gid = entry.pw_gid
    if config.group:
        try:
            gid = grp.getgrnam(config.group).gr_gid
        except KeyError:
            raise PrivilegeError(f"group: no such group {config.group!r}") from None
    if os.geteuid() != 0 and (os.geteuid(), os.getegid()) != (entry.pw_uid, gid):
        raise PrivilegeError(f"user: only root can switch to {entry.pw_name!r} "
                             f"(running as uid {os.geteuid()})")
    return entry.pw_name, entry.pw_uid, gid


def _become(found, lua):
    name, uid, gid = found
    # Modules imported later would be read as the new user, who may not be allowed to
    # (e.g. a Python installed under /root): load the Lua VM and sysconfig's data (the
    # Lua search paths read it) while still root.
    vm.load(lua)
    sysconfig.get_config_vars()
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)


def hand_pool_logs(config):
    """As root: hand each pool's access log and slowlog to the user its processes run as,
    so that they can reopen them (SIGUSR1)."""
    if os.geteuid() != 0:
        return
    for pool in config.pools.values():
        found = target(pool)
        if found is not None:
            for path in logs.pool_files(pool):
                os.chown(path, found[1], found[2])


def apart(config):
    """Whether the pools of `config` run as different users."""
    return len({target(pool) for pool in config.pools.values()}) > 1


def drop(config):
    """Become the user every pool runs as, handing it the log files and the pidfile first
    so that SIGUSR1 can reopen the logs. Root-owned directories stay root's: a pidfile or
    socket file in one cannot be removed at exit, which is logged now rather than
    discovered then. When the pools run as different users the supervisor stays root (as
    php-fpm's master does) and each pool's processes become its user (become())."""
    if os.geteuid() != 0:
        return
    if apart(config):
        log.info("the pools run as different users: the supervisor stays root, each pool's "
                 "processes run as its user")
        return
    found = target(next(iter(config.pools.values())))
    if found is None:
        return
    name, uid, gid = found
    for path in logs.files(config) + ([config.pidfile] if config.pidfile else []):
        os.chown(path, uid, gid)
    _become(found, config.lua)
    removable = [config.pidfile] + [pool.listen for pool in config.pools.values()
                                    if pool.unix_socket]
    for path in filter(None, removable):
        directory = os.path.dirname(path)
        if not os.access(directory, os.W_OK | os.X_OK):
            log.warning("%s is not writable by %s: %s will be left behind at exit",
                        directory, name, path)
    log.info("running as %s (uid %d, gid %d)", name, uid, gid)


def become(pool):
    """In a serving process the supervisor just forked, still root (the pools run as
    different users): become pool `pool`'s user, before any thread starts."""
    found = target(pool)
    if found is None or os.geteuid() != 0:
        return
    _become(found, pool.lua)
