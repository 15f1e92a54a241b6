"""systemd integration, the shape of gunicorn's ``systemd.py``: socket activation and sd_notify."""

from __future__ import annotations

import os
import socket

__all__ = ["listen_fds", "notify"]

SD_LISTEN_FDS_START = 3


def listen_fds(unset_environment: bool = True) -> int:
    """Number of sockets systemd passed us (LISTEN_FDS for our pid), 0 if none."""
    fds = int(os.environ.get("LISTEN_FDS", 0) or 0)
    if fds and os.environ.get("LISTEN_PID") != str(os.getpid()):
        fds = 0
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    return fds


def notify(state: str) -> None:
    """Send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        pass
