"""Client <-> gateway TCP framing: a 4-byte big-endian length, then the body.

:class:`FrameReader` turns a byte stream into frame bodies, many per
``recv()``; it copies only the bytes of an incomplete trailing frame.
:func:`keepalive` is how both client sides (``duprep.Client`` and the client
daemon's links) notice a gateway that is gone without a word.
"""

from __future__ import annotations

import socket
from typing import Final

from .errors import ProtocolError
from .frame import LENGTH

__all__ = ["FrameReader", "FrameTooLarge", "keepalive", "KEEPALIVE"]

_SIZE: Final = LENGTH.size
KEEPALIVE: Final = (10, 5, 3)     # TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT


def keepalive(sock: socket.socket) -> None:
    """TCP keepalive on a connection to a gateway: 10 s idle, then 3 probes 5 s apart.

    A client may wait for pushes with nothing to send, and the protocol has
    no ping: without keepalive a gateway host that vanished, or a network
    path that was cut, leaves such a client waiting for ever.  With it the
    connection is reported broken about 25 s after the gateway last answered.
    """
    idle, intvl, cnt = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)


class FrameTooLarge(ProtocolError):
    """A length prefix announced more than the connection's max_frame."""


class FrameReader:
    """Incremental splitter of length-prefixed frames.

    ``feed(data)`` returns the complete bodies found so far.  Bodies may be
    views into ``data``: decode them before ``data``'s buffer is reused.
    """

    __slots__ = ("max_frame", "_pending")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._pending = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._pending)

    def feed(self, data: bytes | bytearray | memoryview) -> list[memoryview]:
        if self._pending:
            self._pending += data
            buf = memoryview(bytes(self._pending))
            self._pending.clear()
        else:
            buf = memoryview(data)
        out = []
        off, n, limit = 0, len(buf), self.max_frame
        while n - off >= _SIZE:
            size = LENGTH.unpack_from(buf, off)[0]
            if size > limit:
                raise FrameTooLarge(f"frame of {size} bytes exceeds max_frame {limit}")
            end = off + _SIZE + size
            if end > n:
                break
            out.append(buf[off + _SIZE:end])
            off = end
        if off < n:
            self._pending += buf[off:]
        return out
