"""Opening the listening socket: a Unix socket path or host:port."""

import errno
import grp
import os
import pwd
import socket
import stat


class ListenError(Exception):
    pass


def parse_tcp(address):
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def _remove_stale(path):
    """Remove a socket file left by a daemon that died, but refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"listen: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ListenError(f"listen: another process is already serving on {path}")
    finally:
        probe.close()


def _backlog(config):
    return socket.SOMAXCONN if config.backlog < 0 else config.backlog


def bind_unix(config):
    path = config.listen
    try:
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Created with the final mode at once (no window in which others may connect).
        old_umask = os.umask(0o777 & ~config.listen_mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, config.listen_mode)
        if config.listen_owner or config.listen_group:
            uid = pwd.getpwnam(config.listen_owner).pw_uid if config.listen_owner else -1
            gid = grp.getgrnam(config.listen_group).gr_gid if config.listen_group else -1
            os.chown(path, uid, gid)
        sock.listen(_backlog(config))
    except KeyError as exc:
        raise ListenError(f"listen_owner/listen_group: no such user or group {exc}") from None
    except OSError as exc:
        raise ListenError(f"listen: cannot listen on {path}: {exc.strerror}") from None
    return sock


def bind_tcp(config):
    host, port = parse_tcp(config.listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, socktype, proto, _, address = infos[0]
        sock = socket.socket(family, socktype, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_backlog(config))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        raise ListenError(f"listen: cannot listen on {config.listen}: {reason}") from None
    return sock


class Listener:
    """The listening socket, and whether luafcgid owns its file.

    luafcgid owns a socket it bound: it removes the file at stop. It does not own one that
    systemd passed (systemd keeps it across restarts), nor, in a supervisor's serving
    process, the supervisor's (the supervisor removes it)."""

    def __init__(self, sock, path=None, owned=True, description=None):
        self.sock = sock
        self.path = path              # the Unix socket's file, if any
        self.owned = owned
        self.description = description or path or "%s:%s" % sock.getsockname()[:2]

    @classmethod
    def bind(cls, config):
        """Bind `listen` as the config says; ListenError says why not."""
        if config.unix_socket:
            return cls(bind_unix(config), config.listen, description=config.listen)
        return cls(bind_tcp(config), description=config.listen)

    @classmethod
    def passed(cls, sock):
        """A socket systemd passed (socket activation)."""
        return cls(sock, owned=False, description="the socket systemd passed")

    def shared(self):
        """This socket as a serving process of a supervisor sees it: not its to remove."""
        return Listener(self.sock, self.path, owned=False, description=self.description)

    def close(self):
        """Close the socket, and remove its file if it is ours."""
        self.sock.close()
        if self.owned and self.path:
            try:
                os.unlink(self.path)
            except OSError:   # gone already, or its directory is not ours after dropping root
                pass
