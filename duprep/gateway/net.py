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


MAX_KEEPALIVE: Final = 32767     # the kernel's largest TCP_KEEPIDLE


def tune_client(sock: socket.socket, *, sndbuf: int, keepalive: float = 0.0, write_timeout: float = 0.0) -> None:
    """Options for an accepted client socket, set once by the acceptor for every holder.

    ``keepalive`` (seconds, at most MAX_KEEPALIVE; 0: the kernel's settings): after that long without
    a byte from the peer TCP probes it, a probe every sixth of it; and TCP_USER_TIMEOUT is twice the
    larger of ``keepalive`` and ``write_timeout``.  So a client host that vanished without closing
    (power cut, cable) is given up after about that long, whether the connection was idle (the probes)
    or had answers in flight (which the kernel would otherwise retransmit for a quarter of an hour).
    TCP_USER_TIMEOUT also ends a connection whose probes go unanswered, and one whose receive window
    stays closed (tcp(7), Linux): so it is never shorter than the probing (one lost probe must not end
    a live connection) nor than ``write_timeout`` (a slow reader is the sender's to cut, counted and
    logged, not the kernel's).
    """
    sock.setblocking(False)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            idle = max(1, round(keepalive))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(idle / 6)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
            limit = 2 * max(idle, min(write_timeout, MAX_KEEPALIVE))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(limit * 1000))
