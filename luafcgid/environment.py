"""The environment scripts see: clear_env and env, like php-fpm's.

A daemon's environment holds what its service manager and its operator put there: cloud
credentials, database passwords, HOME=/root. With clear_env (the default) the serving
processes' environment is emptied and holds only `env`, so os.getenv, C modules' getenv()
and the programs scripts run (os.execute, io.popen) see nothing else. The process has one
environment, shared by its threads (setenv() beside a getenv() on another thread is not
safe), so this happens once, before any thread starts, and changing it needs a restart.

The daemon reads what it needs of its own environment from inherited(): systemd's
variables, which never reach scripts, and LUA_PATH / LUA_CPATH (searchpath.py).
"""

import os

# The service manager's word to the daemon alone: a script that had NOTIFY_SOCKET could
# tell systemd the daemon is ready or stopping.
DAEMON_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

_inherited = None   # the environment the daemon started with, once confine() ran


def inherited():
    """The environment the daemon was started with, whatever scripts see of it."""
    return os.environ if _inherited is None else _inherited


def confine(config):
    """Leave in the process environment only what scripts may see (see the module's doc).
    Call before any thread starts."""
    global _inherited
    _inherited = dict(os.environ)
    seen = {} if config.clear_env else dict(_inherited)
    for name in DAEMON_ONLY:
        seen.pop(name, None)
    for name, value in config.env.items():
        if value.startswith("$"):
            value = _inherited.get(value[1:])
        if value is None:
            seen.pop(name, None)
        else:
            seen[name] = value
    os.environ.clear()   # unsetenv() each: the C environment too
    os.environ.update(seen)
