"""Start-up plumbing shared by the Python peer servers.

What: the command line every peer server accepts, the fd-limit raise, the
listening socket and the one-line readiness announcement on stdout
(``{"port": N}``) the harness waits for.  Why: every peer must start, bind and
report the same way, so the harness treats them alike.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import sys
from collections.abc import Callable

from benchmarks.apps import HANDLERS, HasData

__all__ = ["peer_args", "raise_nofile", "listen", "announce", "handler_for"]


def peer_args(description: str, argv: list[str] | None = None, *, workers: bool = False) -> argparse.Namespace:
    """Parse the common peer options (and ``--workers``/``--rundir`` when asked)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--app", choices=sorted(HANDLERS), default="echo")
    if workers:
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--rundir", default=".", help="directory for IPC files (removed by the harness)")
    return p.parse_args(argv)


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def listen(host: str, port: int) -> socket.socket:
    """A blocking TCP listener with SO_REUSEADDR and a deep backlog."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(4096)
    return ls


def announce(port: int) -> None:
    """Tell the harness we accept connections (one JSON line on stdout)."""
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()


def handler_for(app: str) -> Callable[[HasData], bytes | None]:
    """The business function named ``app`` from benchmarks.apps."""
    return HANDLERS[app]
