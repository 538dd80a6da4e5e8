"""The main loop, in the main thread, of both roles: a server (serving itself, or one of a
supervisor's processes) and the supervisor.

It takes the signals (see signals.py; cli.run installs their handlers): SIGTERM and SIGINT
end it, SIGUSR1 reopens the logs, SIGHUP reloads. Where the process is the service's main
one it speaks systemd's notify protocol and pings its watchdog. Every second without a
signal it calls the role's tick(), and sooner when the role's watch() asks.

A role provides: start(), summary() (one line for STATUS=), healthy(), tick() (False ends
the loop), reopen() (after the logs were reopened), reload() and stop(); and may provide
watch(): (a file descriptor or None, seconds), the loop then calls tick() as soon as the
descriptor can be read or the seconds have passed.
"""

import logging
import os
import time

from .ops import logs, signals, systemd

log = logging.getLogger("luafcgid")

TICK = 1.0   # seconds between ticks


def run(role, service=True):
    """Run `role` until a stop signal (or its tick() says so), then stop it; returns what
    its stop() returned. `service`: this process is the one systemd (if any) started and
    watches."""
    role.start()
    watchdog = systemd.Watchdog() if service else None
    if service:
        systemd.notify("READY=1", f"STATUS={role.summary()}", f"MAINPID={os.getpid()}")
    watch = getattr(role, "watch", lambda: (None, TICK))
    retry_at = time.monotonic() + TICK
    try:
        while True:
            readable, timeout = watch()
            signum = signals.wait(watchdog.timeout(timeout) if service else timeout, readable)
            if service:
                watchdog.tick(role.summary, healthy=role.healthy())
            if signum in signals.STOP:
                break
            if signum is None:
                if time.monotonic() >= retry_at:
                    logs.retry()
                    retry_at = time.monotonic() + TICK
                if not role.tick():
                    break
            elif signum == signals.REOPEN:
                logs.reopen()
                role.reopen()
            else:
                log.info("SIGHUP: reloading the configuration")
                if service:
                    systemd.reloading()
                role.reload()
                if service:
                    systemd.notify("READY=1", f"STATUS={role.summary()}")
    finally:
        if service:
            systemd.notify("STOPPING=1")
        stopped = role.stop()
    return stopped
