"""Detaching from the terminal (--daemon) and the pidfile."""

import atexit
import os


def detach():
    """The classic double fork: the daemon is no session leader, so it can never acquire a
    controlling terminal; its standard streams go to /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def write_pidfile(path):
    """Write our pid atomically (write, then rename) and remove the file at exit."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as stream:
        stream.write(f"{os.getpid()}\n")
    os.replace(temporary, path)
    pid = os.getpid()

    def remove():
        if os.getpid() == pid:
            try:
                os.unlink(path)
            except OSError:   # gone already, or its directory is not ours after dropping root
                pass
    atexit.register(remove)
