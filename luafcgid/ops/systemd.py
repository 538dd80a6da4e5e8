"""Talking to systemd through its documented environment protocol, with no library:
sd_notify(3) (a datagram to $NOTIFY_SOCKET) and sd_listen_fds(3) ($LISTEN_FDS, $LISTEN_PID).
Outside systemd the variables are unset and every function here does nothing. They are
read from the environment the daemon started with: scripts never see them
(environment.py)."""

import os
import socket
import time

from ..environment import inherited

LISTEN_FDS_START = 3   # SD_LISTEN_FDS_START: passed sockets start at fd 3


def notify(*fields):
    """Send "NAME=value" fields to the service manager; False when there is none (or it
    cannot be reached, which must never stop the daemon)."""
    address = inherited().get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):   # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True


def reloading():
    """RELOADING=1 with the CLOCK_MONOTONIC time, as Type=notify-reload expects it."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def _watchdog_interval():
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when not asked."""
    usec = inherited().get("WATCHDOG_USEC")
    pid = inherited().get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 1) / 2e6
    except ValueError:
        return None


class Watchdog:
    """WATCHDOG=1 pings (with a fresh STATUS= line) for a main loop that waits at most
    timeout() between calls to tick(). Does nothing when WatchdogSec= is not set."""

    def __init__(self):
        self.interval = _watchdog_interval()
        self._next = time.monotonic()

    def timeout(self, longest):
        if self.interval is None:
            return longest
        return max(0.0, min(longest, self._next - time.monotonic()))

    def tick(self, status, healthy=True):
        """Ping when due; an unhealthy daemon stays silent so that systemd restarts it."""
        if self.interval is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval
        if healthy:
            notify("WATCHDOG=1", f"STATUS={status()}")


def listen_socket():
    """The listening socket systemd passed (socket activation), or None.

    Only sockets meant for this process count (LISTEN_PID); the variables are removed so
    that nothing this process starts mistakes them for its own. luafcgid serves one socket:
    the first one passed."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != str(os.getpid()) or not count or not count.isdigit() or int(count) < 1:
        return None
    sock = socket.socket(fileno=LISTEN_FDS_START)
    sock.set_inheritable(False)
    for fd in range(LISTEN_FDS_START + 1, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
    return sock
