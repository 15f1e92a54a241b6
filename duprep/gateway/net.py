"""Listening socket creation and the socket options duprep relies on (redis ``anet.c`` style)."""

from __future__ import annotations

import errno
import socket
from typing import Final

from ..errors import ConfigError

__all__ = ["listen", "tune_client", "ACCEPT_CAPACITY_ERRNOS"]

# accept() failures that mean "out of resources for now": back off, don't die (trio).
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def listen(host: str, port: int, *, backlog: int) -> socket.socket:
    """A non-blocking listener with SO_REUSEADDR (not the seed's SO_LINGER {1,0}, which RSTs)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve --host {host!r}: {e}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def tune_client(sock: socket.socket, *, sndbuf: int, keepalive: float = 0.0, user_timeout: float = 0.0) -> None:
    """Options for an accepted client socket, set once by the acceptor for every holder.

    ``keepalive``: seconds of silence before TCP probes a peer, then a probe every sixth of that, six
    of them: a client host that vanished without closing (power cut, cable) is found within about
    twice ``keepalive`` instead of the kernel's two hours.  ``user_timeout``: seconds data we sent may
    stay unacknowledged before the kernel gives the connection up (TCP_USER_TIMEOUT), instead of
    retransmitting for a quarter of an hour.  0 leaves the kernel's default.
    """
    sock.setblocking(False)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(keepalive)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(keepalive / 6)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
        if user_timeout:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(user_timeout * 1000)))
