"""One end of an acceptor <-> child control channel, inside an event loop.

Records are small, but a burst of accepts (or of releases) can fill the
SEQPACKET socket's buffer (about 280 records by default).  A record that
would block is kept in an outbox, in order, and the socket is watched for
EPOLLOUT until the outbox is empty: a hand-over or a release is never lost,
and the loop never blocks on its peer.  A descriptor the kernel refuses
because too many are in flight (``fdpass.InFlightLimit``: an unprivileged
user, a child slow to take them) waits in the outbox too, retried every
RETRY seconds: the socket stays writable meanwhile, so EPOLLOUT would spin.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import Callable

from .. import fdpass
from ..errors import BrokenResourceError, DuprepError, WouldBlock
from .loop import READ, WRITE, EventLoop, Timer

__all__ = ["Control"]

log = logging.getLogger("duprep")
BUFFER = 1 << 20      # bytes of socket buffer asked for each direction
RETRY = 0.05          # seconds between tries while descriptors in flight are at the limit


class Control:
    """Reads records into ``on_record``; sends records, queueing what would block.

    ``on_closed`` runs once when the peer has gone.  Descriptors queued with
    a CONN record must stay open until sent (the acceptor keeps its copy).
    """

    def __init__(self, sock: socket.socket, loop: EventLoop, on_record: Callable[[fdpass.Record], None],
                 on_closed: Callable[[], None], on_drained: Callable[[], None] = lambda: None) -> None:
        self.sock = sock
        self.loop = loop
        self.on_record = on_record
        self.on_closed = on_closed
        self.on_drained = on_drained       # the outbox has just become empty
        self.outbox: deque[tuple[int, int, int, int | None]] = deque()
        self.closed = False
        self.retry: Timer | None = None     # armed while the head of the outbox hit InFlightLimit
        self.warned = False
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
            except OSError:
                pass
        self.fd = sock.fileno()
        loop.register(self.fd, READ, self._on_event)

    def send(self, op: int, sid: int = 0, gen: int = 0, fd: int | None = None) -> None:
        if self.closed:
            return
        if not self.outbox:
            try:
                fdpass.send(self.sock, op, sid, gen, fd)
                return
            except WouldBlock as e:
                self._blocked(e)
            except BrokenResourceError:
                self._close()
                return
        self.outbox.append((op, sid, gen, fd))

    def _blocked(self, e: WouldBlock) -> None:
        """The head of the outbox cannot go yet: wait for room, or for the peer to take descriptors."""
        if isinstance(e, fdpass.InFlightLimit):
            if not self.warned:
                self.warned = True
                log.warning("hand-overs wait: %s; raise LimitNOFILE= (or run with CAP_SYS_RESOURCE)", e)
            self.loop.modify(self.fd, READ)
            if self.retry is None:
                self.retry = self.loop.call_later(RETRY, self._retry)
        else:
            self.loop.modify(self.fd, READ | WRITE)

    def _retry(self) -> None:
        self.retry = None
        self._flush()

    def poll(self) -> None:
        """Read every record that is already there (also used to catch up out of turn)."""
        while not self.closed:
            try:
                rec = fdpass.recv(self.sock)
            except WouldBlock:
                return
            except BrokenResourceError:
                self._close()
                return
            except DuprepError as e:     # a bad record: its descriptors are closed; go on
                log.error("bad control record: %s", e)
                continue
            self.on_record(rec)

    def _on_event(self, events: int) -> None:
        if events & WRITE:
            self._flush()
        if events & ~WRITE:
            self.poll()

    def _flush(self) -> None:
        while self.outbox and not self.closed:
            op, sid, gen, fd = self.outbox[0]
            try:
                fdpass.send(self.sock, op, sid, gen, fd)
            except WouldBlock as e:
                self._blocked(e)
                return
            except BrokenResourceError:
                self._close()
                return
            self.outbox.popleft()
        if not self.closed:
            self.loop.modify(self.fd, READ)
            self.on_drained()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outbox.clear()
            if self.retry is not None:
                self.retry.cancel()
                self.retry = None
            self.loop.close_later(self.sock)
            self.on_closed()
