"""Client <-> gateway TCP framing: a 4-byte big-endian length, then the body.

:class:`FrameReader` turns a byte stream into frame bodies, many per
``recv()``; it copies only the bytes of an incomplete trailing frame.
"""

from __future__ import annotations

from typing import Final

from .errors import ProtocolError
from .frame import LENGTH

__all__ = ["FrameReader", "FrameTooLarge"]

_SIZE: Final = LENGTH.size


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
