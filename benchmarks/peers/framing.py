"""duprep's client wire framing, re-implemented for the non-duprep Python peers.

What: split a byte stream into decoded frames and encode WELCOME, REPLY and
ERROR frames (4-byte big-endian length, then a msgpack array whose first
element is the tag).  Why here and not ``duprep.frame``: the peers must keep
working while the gateway package is being rewritten, and a competitor that
imports the thing it is compared with is not independent.  The format is the
one in duprep/frame.py; loadgen.c checks every answer against it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

import msgspec

from benchmarks.apps import BenchRequest, HasData

__all__ = ["FrameError", "MAX_FRAME", "split_frames", "welcome", "reply", "error", "hello_name",
           "answer_request", "TAG_HELLO", "TAG_REQUEST", "TAG_REPLY"]

TAG_HELLO: Final = 1
TAG_REQUEST: Final = 2
TAG_WELCOME: Final = 16
TAG_REPLY: Final = 17
TAG_ERROR: Final = 20
APP_ERROR: Final = 11      # duprep's ErrorCode.APP_ERROR
MAX_FRAME: Final = 1 << 20
_LENGTH = struct.Struct(">I")
_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()

Handler = Callable[[HasData], "bytes | None"]


class FrameError(Exception):
    """The peer sent something that is not a valid frame: close the connection."""


def split_frames(buf: bytearray) -> list[list[Any]]:
    """Decode every complete frame at the start of ``buf`` and remove its bytes."""
    frames: list[list[Any]] = []
    off, end = 0, len(buf)
    while end - off >= 4:
        (n,) = _LENGTH.unpack_from(buf, off)
        if n > MAX_FRAME:
            raise FrameError(f"frame of {n} bytes")
        if end - off - 4 < n:
            break
        try:
            frame = _decoder.decode(memoryview(buf)[off + 4:off + 4 + n])
        except (ValueError, RecursionError) as exc:
            raise FrameError(str(exc)) from None
        if not isinstance(frame, list) or not frame or not isinstance(frame[0], int):
            raise FrameError("frame is not a tagged array")
        frames.append(frame)
        off += 4 + n
    if off:
        del buf[:off]
    return frames


def _encode(obj: tuple[Any, ...]) -> bytes:
    out = bytearray(4)
    _encoder.encode_into(obj, out, 4)
    _LENGTH.pack_into(out, 0, len(out) - 4)
    return bytes(out)


def hello_name(frame: list[Any]) -> str:
    """Validate a HELLO frame and return the client name."""
    if frame[0] != TAG_HELLO or len(frame) not in (2, 3) or frame[1] != 1:
        raise FrameError("expected HELLO version 1")
    name = frame[2] if len(frame) == 3 else ""
    if not isinstance(name, str) or len(name.encode()) > 64:
        raise FrameError("bad HELLO name")
    return name


def welcome(sid: int, generation: int, name: str) -> bytes:
    return _encode((TAG_WELCOME, 1, sid, generation, name, MAX_FRAME))


def reply(msgid: int, cpid: int, data: bytes) -> bytes:
    return _encode((TAG_REPLY, msgid, cpid, data))


def error(msgid: int, cpid: int, code: int, message: str) -> bytes:
    return _encode((TAG_ERROR, msgid, cpid, code, message))


def request_fields(frame: list[Any]) -> tuple[int, int, bytes]:
    """Validate a REQUEST frame; return (msgid, cpid, data)."""
    if frame[0] != TAG_REQUEST or len(frame) != 5:
        raise FrameError("expected REQUEST")
    _, msgid, cpid, _timeout, data = frame
    if not (isinstance(msgid, int) and isinstance(cpid, int) and isinstance(data, bytes)):
        raise FrameError("bad REQUEST fields")
    return msgid, cpid, data


def answer_request(handler: Handler, frame: list[Any]) -> bytes:
    """Run ``handler`` on a REQUEST frame and return the encoded REPLY or ERROR."""
    msgid, cpid, data = request_fields(frame)
    try:
        out = handler(BenchRequest(data))
    except Exception as exc:  # the business error goes back to the client, as in duprep
        return error(msgid, cpid, APP_ERROR, f"{type(exc).__name__}: {exc}")
    return reply(msgid, cpid, out or b"")
