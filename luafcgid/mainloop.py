"""The main loop, in the main thread, of both roles: a server (serving itself, or one of a
supervisor's processes) and the supervisor.

It takes the signals (see signals.py; cli.run installs their handlers): SIGTERM and SIGINT
end it, SIGUSR1 reopens the logs, SIGHUP reloads. Where the process is the service's main
one it speaks systemd's notify protocol and pings its watchdog. Every second without a
signal it calls the role's tick().

A role provides: start(), summary() (one line for STATUS=), healthy(), tick() (False ends
the loop), reopen() (after the logs were reopened), reload() and stop().
"""

import logging
import os

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
    try:
        while True:
            signum = signals.wait(timeout=watchdog.timeout(TICK) if service else TICK)
            if service:
                watchdog.tick(role.summary, healthy=role.healthy())
            if signum in signals.STOP:
                break
            if signum is None:
                logs.retry()
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
