"""Messages between local processes and the client daemon, on POSIX queues.

The seed's client host had two System V queues: ``qid1`` carried every
request of every ``c_process`` to ``tcp_c``, stamped with the sender's pid
(``cpid``) and a message number (``msgid``); ``qid2`` carried the replies and
each process picked its own with ``msgrcv(mtype = cpid)``.  POSIX queues
cannot select by type, so duprep keeps the shared uplink (qid1) and gives
every local endpoint its own small reply queue (qid2 split by cpid)::

    local process --Attach/Call/Send/Relay/Detach--> /duprep-ch.<i>.up   (one queue, all processes)
    local process <--Attached/Reply/Defer/Error/Push/Broken-- /duprep-ch.<i>.p<pid>.<start>.<n>

An uplink queue message is one msgpack array whose first element is the
tag.  A reply-queue message starts with one more byte, so that reply
queues can be tiny (the kernel charges every queue ``depth * (size + 96)``
bytes of one per-user budget) and still carry any reply::

    0x00 WHOLE  the rest is one complete message
    0x01 MORE   the rest is a piece; more pieces follow
    0x02 LAST   the rest is the last piece: join and decode

Only the daemon writes a reply queue and only its owner's reader thread
reads it, both in order, so pieces never interleave.  (The uplink has many
writers; its messages are never split.)

Down the reply queue the daemon reuses the gateway's own REPLY, DEFERRED,
ERROR and PUSH structs (:mod:`duprep.frame`, tags 16-20) with the msgid
mapped back to the local one, so a local client decodes exactly what a
direct client would; only the local bookkeeping messages are new.

Identity: an endpoint is ``(pid, start, n)``; ``start`` is field 22 of
``/proc/PID/stat`` (clock ticks after boot), so a recycled pid can never be
mistaken for a dead process.  The daemon validates it on Attach and hands
back a daemon-wide endpoint id ``ep`` that every later uplink message names.
"""

from __future__ import annotations

from typing import Any, Final, Union

import msgspec
from msgspec import Struct

from ..frame import U32, U64, Defer, Error, Name, Push, Reply

__all__ = [
    "LOCAL_VERSION", "LINK_LOST",
    "Attach", "Detach", "LCall", "LSend", "LRelay", "UpMessage",
    "Attached", "Refused", "Broken", "DownMessage",
    "encode", "up_decoder", "down_decoder", "split_down", "Reassembler",
]

LOCAL_VERSION: Final = 1
# ``Message.code`` of a late or deferred answer that will never come because
# the link to the gateway was lost.  Outside the gateway's ErrorCode range.
LINK_LOST: Final = 1000


# --- uplink: local process -> client daemon ------------------------------------------

class Attach(Struct, tag=1, array_like=True, frozen=True):
    """Register endpoint ``(pid, start, n)``; its reply queue must already exist.

    The daemon derives the queue name itself (never trusts a name sent to
    it), checks pid and start time against /proc and watches the process.
    """
    version: U32
    pid: U64
    start: U64
    n: U32
    pushes: bool = False   # also take pushes addressed to nobody in particular


class Detach(Struct, tag=2, array_like=True, frozen=True):
    """The endpoint is closing: forget it (its owner unlinks the queue)."""
    ep: U64
    pid: U64


class LCall(Struct, tag=3, array_like=True, frozen=True):
    """REQUEST from a local process; ``msgid`` is the process's own number."""
    ep: U64
    pid: U64
    msgid: U64
    timeout_ms: U32
    data: bytes


class LSend(Struct, tag=4, array_like=True, frozen=True):
    """One-way SEND from a local process."""
    ep: U64
    pid: U64
    msgid: U64
    data: bytes


class LRelay(Struct, tag=5, array_like=True, frozen=True):
    """RELAY from a local process to another gateway client."""
    ep: U64
    pid: U64
    msgid: U64
    target: Name
    data: bytes


UpMessage = Union[Attach, Detach, LCall, LSend, LRelay]


# --- downlink: client daemon -> one endpoint -------------------------------------------

class Attached(Struct, tag=32, array_like=True, frozen=True):
    """Answer to Attach: the endpoint id and the state of the shared link."""
    ep: U64
    daemon_pid: U64
    name: str            # the daemon's client name at the gateway
    max_frame: U32       # largest request body the link accepts (0: not known yet)
    link_up: bool
    sid: U32 = 0
    generation: U32 = 0


class Refused(Struct, tag=33, array_like=True, frozen=True):
    """Attach refused (bad version, pid/start time do not match, ...)."""
    message: str


class Broken(Struct, tag=34, array_like=True, frozen=True):
    """These requests failed without an answer: the link is down or the daemon stops."""
    reason: str
    msgids: list[U64]


DownMessage = Union[Attached, Refused, Broken, Reply, Defer, Push, Error]

_encoder = msgspec.msgpack.Encoder()


def encode(message: Struct) -> bytes:
    """One queue message (no length prefix: a POSIX message has its own length)."""
    return _encoder.encode(message)


def up_decoder() -> "msgspec.msgpack.Decoder[Any]":
    """Decoder for uplink messages (used by the daemon)."""
    return msgspec.msgpack.Decoder(UpMessage)


def down_decoder() -> "msgspec.msgpack.Decoder[Any]":
    """Decoder for reply-queue messages (used by :class:`duprep.local.Client`)."""
    return msgspec.msgpack.Decoder(DownMessage)


# --- reply-queue pieces -------------------------------------------------------------------

WHOLE: Final = 0
MORE: Final = 1
LAST: Final = 2
_WHOLE, _MORE, _LAST = bytes((WHOLE,)), bytes((MORE,)), bytes((LAST,))


def split_down(data: bytes, msgsize: int) -> list[bytes]:
    """``data`` as reply-queue messages of at most ``msgsize`` bytes each."""
    if len(data) < msgsize:
        return [_WHOLE + data]
    step = msgsize - 1
    parts = [_MORE + data[i:i + step] for i in range(0, len(data), step)]
    parts[-1] = _LAST + parts[-1][1:]
    return parts


class Reassembler:
    """Joins reply-queue pieces; ``feed()`` returns a complete message or None."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[memoryview] = []

    def feed(self, message: bytes) -> bytes | memoryview | None:
        kind, body = message[0], memoryview(message)[1:]
        if kind == WHOLE:
            self._parts.clear()          # a piece without its LAST cannot happen; never glue it on
            return body
        self._parts.append(body)
        if kind != LAST:
            return None
        data = b"".join(self._parts)
        self._parts.clear()
        return data
