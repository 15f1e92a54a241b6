"""``duprep client-status``: the daemon's state, asked for over a status socket.

The daemon listens on the abstract AF_UNIX address ``@duprep-ch.<i>.ctl``
(nothing on disk to clean up).  A client connects, the daemon writes one
JSON document and closes: no request syntax, nothing to parse on the
daemon's side.  Only processes of the daemon's own user (or root) are
answered (``SO_PEERCRED``), the same people who can open its queues.

Owns the listening socket and the accepted ones, all inside the daemon's
loop; writes never block it (a slow reader is watched for EPOLLOUT and
dropped after ``SEND_TIMEOUT``).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any, Callable

from .. import ipcnames
from ..errors import BrokenResourceError, ConfigError, Timeout
from ..gateway.loop import READ, WRITE, EventLoop, Timer

__all__ = ["StatusServer", "fetch", "render"]

SEND_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")


class _Outgoing:
    """A status document on its way to one reader."""

    __slots__ = ("conn", "data", "deadline", "timer")

    def __init__(self, conn: socket.socket, data: bytes, deadline: float) -> None:
        self.conn = conn
        self.data = memoryview(data)
        self.deadline = deadline
        self.timer: Timer | None = None     # set while waiting for EPOLLOUT


class StatusServer:
    """The daemon's status socket; ``snapshot()`` builds the document."""

    def __init__(self, instance: str, loop: EventLoop, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.address = ipcnames.clienthost_control(instance)
        self.loop = loop
        self.snapshot = snapshot
        self.sock: socket.socket | None = None

    def open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.address)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot bind the status socket @{self.address[1:]}: {e.strerror}") from None
        sock.setblocking(False)
        self.sock = sock
        self.loop.register(sock.fileno(), READ, self._on_accept)

    def _on_accept(self, _ev: int) -> None:
        assert self.sock is not None
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            uid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
            if uid not in (0, os.getuid()):
                conn.close()
                continue
            conn.setblocking(False)
            self._write(_Outgoing(conn, json.dumps(self.snapshot()).encode(), self.loop.clock() + SEND_TIMEOUT))

    def _write(self, out: "_Outgoing") -> None:
        try:
            n = out.conn.send(out.data)
        except BlockingIOError:
            n = 0
        except OSError:
            n = len(out.data)          # the reader went away: nothing more to do
        out.data = out.data[n:]
        if not out.data:
            self._done(out)
        elif out.timer is None:
            out.timer = self.loop.call_at(out.deadline, lambda: self._done(out))
            self.loop.register(out.conn.fileno(), WRITE, lambda _ev: self._write(out))

    def _done(self, out: "_Outgoing") -> None:
        if out.timer is not None:
            out.timer.cancel()
        self.loop.close_later(out.conn)     # unregisters it if it was watched

    def close(self) -> None:
        if self.sock is not None:
            self.loop.close_later(self.sock)
            self.sock = None


def fetch(instance: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """The running daemon's status document; raises BrokenResourceError if none runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(ipcnames.clienthost_control(instance))
        except (ConnectionRefusedError, FileNotFoundError):
            raise BrokenResourceError(f"no client daemon is running for instance {instance!r}") from None
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise Timeout(f"the client daemon of {instance!r} did not answer within {timeout:g} s") from None
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    if not chunks:
        raise BrokenResourceError(f"the client daemon of {instance!r} closed the status socket without answering")
    return json.loads(b"".join(chunks))  # type: ignore[no-any-return]


def render(snap: dict[str, Any]) -> str:
    """Text form: the daemon, its link, its counters, then one line per endpoint."""
    link = snap["link"]
    now = time.time()
    up = f"up {now - link['up_since']:.1f}s as sid {link['sid']} gen {link['generation']}" \
        if link["state"] == "up" else f"{link['state']} ({link['last_error'] or '-'})"
    out = [f"client daemon {snap['instance']} (pid {snap['pid']}): gateway {snap['server']} "
           f"[{snap['links']}] {up}, name {snap['name'] or '-'}, "
           f"{link['connects']} connects, {link['losses']} losses"]
    q = snap["uplink"]
    out.append(f"uplink {q['name']}: {q['messages']}/{q['capacity']} x {q['message_size']} B; "
               f"reply queues {snap['reply_depth']} x {snap['reply_size']} B; "
               f"{snap['in_flight']} request(s) in flight, {snap['overdue']} overdue")
    out.append("counters: " + ", ".join(f"{k}={v}" for k, v in snap["counters"].items()))
    out.append(f"{'PID':>8} {'EP':>5} {'QUEUE':<40}{'INFL':>6}{'DEFER':>6}{'QMSG':>6}{'PEND':>6}"
               f"{'REQ':>8}{'MSGS':>8}{'DROP':>6}")
    for p in snap["processes"]:
        for e in p["endpoints"]:
            out.append(f"{p['pid']:>8} {e['ep']:>5} {e['queue'][-39:]:<40}{e['in_flight']:>6}{e['deferred']:>6}"
                       f"{e['queue_messages']:>6}{e['pending']:>6}{e['requests']:>8}{e['replies']:>8}"
                       f"{e['dropped']:>6}")
        for name in p["leftovers"]:
            out.append(f"{p['pid']:>8} {'-':>5} {name[-39:]:<40}  (left by an earlier run)")
    if not snap["processes"]:
        out.append("  (no local processes attached)")
    return "\n".join(out)
