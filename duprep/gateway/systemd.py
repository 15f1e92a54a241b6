"""systemd integration, the shape of gunicorn's ``systemd.py``: socket activation and sd_notify."""

from __future__ import annotations

import os
import socket

from ..errors import ConfigError

__all__ = ["listen_fds", "listen_socket", "notify", "watchdog_interval"]

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


def listen_socket() -> socket.socket | None:
    """The listening TCP socket systemd passed (socket activation), None if it passed none.

    Raises ConfigError if what it passed is not one listening TCP socket: a wrong duprep.socket
    must stop the boot with a reason, not fail at the first accept.
    """
    n = listen_fds()
    if not n:
        return None
    if n != 1:
        raise ConfigError(f"systemd passed {n} sockets (LISTEN_FDS); a gateway listens on one: give its "
                          f".socket unit a single ListenStream=")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM or \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.close()
        raise ConfigError("the socket systemd passed is not a listening TCP socket: the gateway's .socket "
                          "unit needs ListenStream=[ADDRESS:]PORT")
    sock.setblocking(False)
    return sock


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


def watchdog_interval() -> float:
    """Seconds of systemd's WatchdogSec= for this process (WATCHDOG_USEC), 0 if none.

    Unsets both variables: they are for the main process only, not for its children.
    """
    usec = os.environ.pop("WATCHDOG_USEC", "")
    pid = os.environ.pop("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6
