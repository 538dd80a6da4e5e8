"""Who may connect: allowed_clients for a TCP listener (php-fpm's listen.allowed_clients).

Any host that can connect to luafcgid runs any script it names, and its REMOTE_ADDR is
whatever it says; so a TCP listener other than loopback serves only allowed_clients, or
every host when that is `any` on purpose, and never starts without one of the two. The
check happens at accept: a Unix socket's acceptor has no policy and pays nothing for it.
"""

import ipaddress
import logging
import socket
import threading
import time

log = logging.getLogger("luafcgid")

REFUSAL_LOG_INTERVAL = 60.0   # seconds between log lines about one refused address
_REMEMBERED = 4096            # addresses remembered (admitted; refused and logged), at most


class ClientsError(Exception):
    pass


def peer_address(text):
    """The ip_address of `text` (an IPv4-mapped IPv6 address as its IPv4 one; an IPv6
    scope dropped), or None when it is not an address."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def is_loopback(host):
    """Whether `host` (an address, or a name: every address it resolves to) is loopback.
    The empty host means every interface."""
    address = peer_address(host) if host else None
    if address is not None:
        return address.is_loopback
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(peer_address(info[4][0]).is_loopback for info in infos)


def exposure(host, allowed_clients):
    """The problem with listening on TCP `host` with `allowed_clients`, or None."""
    if allowed_clients is not None or is_loopback(host):
        return None
    return (f"listen: {host or 'every interface'} is not loopback, and allowed_clients is "
            f"not set: any host that can reach it could run any script. Set allowed_clients "
            f"to the web servers' addresses, or to any on purpose")


class AllowedClients:
    """A policy: admit(address) says whether the peer at `address` (as accept() returns
    it) may be served, and logs a refused one at most once a minute per address."""

    def __init__(self, networks, clock=time.monotonic):
        self._networks = tuple(ipaddress.ip_network(network) for network in networks)
        # hosts admitted before: a call costs 0.7 µs for them, 16 µs to decide (ipaddress)
        self._admitted = set()
        self._clock = clock
        self._logged = {}   # refused host -> when its refusal was last logged
        self._lock = threading.Lock()

    def __call__(self, address):
        host = address[0]
        if host in self._admitted:
            return True
        address = peer_address(host)
        if address is not None and any(address in network for network in self._networks):
            if len(self._admitted) >= _REMEMBERED:
                self._admitted.clear()
            self._admitted.add(host)
            return True
        self._refused(host)
        return False

    def _refused(self, host):
        now = self._clock()
        with self._lock:
            last = self._logged.get(host)
            if last is not None and now - last < REFUSAL_LOG_INTERVAL:
                return
            if len(self._logged) >= _REMEMBERED:
                self._logged = {h: t for h, t in self._logged.items()
                                if now - t < REFUSAL_LOG_INTERVAL}
            self._logged[host] = now
        log.warning("%s: not in allowed_clients; connection closed (logged once a minute "
                    "per address)", host)


def admission(allowed_clients, sock):
    """The acceptor's policy for listening socket `sock`: None to serve every peer (a Unix
    socket, a loopback one without allowed_clients, or allowed_clients: any), else an
    AllowedClients. ClientsError when a TCP socket on another address has neither."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or allowed_clients == "any":
        return None
    if allowed_clients is None:
        problem = exposure(sock.getsockname()[0], None)
        if problem is not None:
            raise ClientsError(problem)
        return None
    return AllowedClients(allowed_clients)
