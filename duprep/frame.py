"""Every message duprep puts on the wire or on a queue, as msgspec Structs.

Two families, kept apart because they change for different reasons:

* **Wire frames** travel on the client's TCP connection.  Each is a msgpack
  array whose first element is an integer tag, behind a 4-byte big-endian
  length prefix (docs/protocol.md is the normative text; tests check that
  the tags below match it).
* **Bus items** travel on the instance's two POSIX queues.  A queue message
  is a msgpack array of items (a *batch*): the receiver packs every request
  that is already waiting into one message, and the sender takes replies for
  many connections from one.  A reply item carries the finished wire frame,
  so the sender copies bytes and never re-encodes.

Together they are the seed's ``msg_buf`` (mtype, cpid, sid, msgid, mdata),
plus the generation that makes a reused ``sid`` harmless.
"""

from __future__ import annotations

import struct
from typing import Annotated, Final, NamedTuple, Union

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "PROTOCOL_VERSION",
    "LENGTH",
    "ErrorCode",
    "Hello", "Call", "Send", "Relay", "CallMe", "NONCE_SIZE",
    "Welcome", "Reply", "Defer", "Push", "Error",
    "ClientFrame", "ServerFrame",
    "Origin", "NOWHERE", "Request", "Chunk", "Deliver", "Close",
    "encode_wire", "prefix", "PREFIXES", "client_decoder", "server_decoder",
    "BatchPacker", "bound", "decode_requests", "decode_chunks", "BadFrame", "array_header", "decode_replies",
    "CHUNK_OVERHEAD", "DELIVER_OVERHEAD",
]

PROTOCOL_VERSION: Final = 1
LENGTH: Final = struct.Struct(">I")  # the wire frame's length prefix
MAX_NAME: Final = 64                 # a client name: at most 64 characters and 64 bytes of UTF-8

U64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
Name = Annotated[str, Meta(max_length=MAX_NAME)]


class ErrorCode:
    """Codes of the ERROR frame (docs/protocol.md, "Errors")."""

    BAD_FRAME = 1           # not a valid frame: the connection is closed
    FRAME_TOO_LARGE = 2     # length prefix above max_frame: closed
    BAD_HELLO = 3           # first frame not HELLO, or HELLO twice: closed
    BAD_VERSION = 4         # protocol version not supported: closed
    NAME_TAKEN = 5          # another live connection has this name: closed
    SERVER_FULL = 6         # --max-clients reached: closed
    TOO_MANY_FROM_IP = 7    # --max-per-ip reached: closed
    UNKNOWN_TARGET = 8      # RELAY/push target not connected (connection stays)
    HANDSHAKE_TIMEOUT = 9   # no HELLO within the handshake deadline: closed
    SHUTTING_DOWN = 10      # gateway is stopping: closed
    APP_ERROR = 11          # the business handler raised (connection stays)
    SLOW_CONSUMER = 12      # client did not read its replies in time: closed
    WORKER_LOST = 13        # the worker handling the REQUEST died before answering (connection stays)

    names: Final = {
        1: "BAD_FRAME", 2: "FRAME_TOO_LARGE", 3: "BAD_HELLO", 4: "BAD_VERSION",
        5: "NAME_TAKEN", 6: "SERVER_FULL", 7: "TOO_MANY_FROM_IP",
        8: "UNKNOWN_TARGET", 9: "HANDSHAKE_TIMEOUT", 10: "SHUTTING_DOWN",
        11: "APP_ERROR", 12: "SLOW_CONSUMER", 13: "WORKER_LOST",
    }


# --- wire: client -> gateway --------------------------------------------------

class Hello(Struct, tag=1, array_like=True, frozen=True, gc=False):
    """First frame of every connection.  ``name`` "" means anonymous."""
    version: U32
    name: Name = ""


class Call(Struct, tag=2, array_like=True, frozen=True, gc=False):
    """REQUEST: expects exactly one REPLY, DEFER or ERROR with this msgid."""
    msgid: U64
    cpid: U64
    timeout_ms: U32
    data: bytes


class Send(Struct, tag=3, array_like=True, frozen=True, gc=False):
    """SEND: one-way message to the business workers; nothing comes back."""
    msgid: U64
    cpid: U64
    data: bytes


class Relay(Struct, tag=4, array_like=True, frozen=True, gc=False):
    """RELAY: deliver ``data`` to the client named ``target`` as a PUSH.

    Answered by an empty REPLY (accepted) or ERROR UNKNOWN_TARGET.
    """
    msgid: U64
    cpid: U64
    target: Name
    data: bytes


NONCE_SIZE: Final = 16
Port = Annotated[int, Meta(ge=1024, le=65535)]


class CallMe(Struct, tag=5, array_like=True, frozen=True, gc=False):
    """CALLME: instead of HELLO, on a gateway run with ``--links callback``.

    "Connect back to the address this connection comes from, on these two
    ports, and start each link with this nonce" (the seed's L0/L1/L2).  L1
    (``up_port``) then carries client -> gateway, starting with HELLO; L2
    (``down_port``) carries gateway -> client.
    """
    version: U32
    up_port: Port
    down_port: Port
    nonce: Annotated[bytes, Meta(min_length=NONCE_SIZE, max_length=NONCE_SIZE)]


# --- wire: gateway -> client --------------------------------------------------

class Welcome(Struct, tag=16, array_like=True, frozen=True, gc=False):
    """Answer to HELLO: the connection's identity and the frame size limit."""
    version: U32
    sid: U32
    generation: U32
    name: str
    max_frame: U32


class Reply(Struct, tag=17, array_like=True, frozen=True, gc=False):
    """The answer to the REQUEST (or RELAY) with this msgid."""
    msgid: U64
    cpid: U64
    data: bytes


class Defer(Struct, tag=18, array_like=True, frozen=True, gc=False):
    """DEFERRED: the worker will answer this msgid later with a REPLY."""
    msgid: U64
    cpid: U64


class Push(Struct, tag=19, array_like=True, frozen=True, gc=False):
    """Unsolicited message: from a worker (source "") or relayed by a client."""
    cpid: U64
    source: str
    data: bytes


class Error(Struct, tag=20, array_like=True, frozen=True, gc=False):
    """A refusal; msgid 0 when it concerns the whole connection."""
    msgid: U64
    cpid: U64
    code: U32
    message: str


ClientFrame = Union[Hello, Call, Send, Relay, CallMe]
ServerFrame = Union[Welcome, Reply, Defer, Push, Error]

_encode = msgspec.msgpack.Encoder().encode
_pack_length = LENGTH.pack
#: The length prefixes of bodies under 2 KiB, made once: a lookup is 35 ns less than a pack per frame.
PREFIXES: Final = [_pack_length(n) for n in range(2048)]


def prefix(n: int) -> bytes:
    """The length prefix of an ``n``-byte frame body."""
    return PREFIXES[n] if n < len(PREFIXES) else _pack_length(n)


def encode_wire(frame: Struct) -> bytes:
    """Encode one wire frame with its 4-byte length prefix.

    (Encoding, then joining the 4-byte prefix, measured faster than encode_into
    a buffer with room for the prefix: 128 ns against 199 ns for a small REPLY.)
    """
    body = _encode(frame)
    return prefix(len(body)) + body


def client_decoder() -> "msgspec.msgpack.Decoder[ClientFrame]":
    """A decoder for frame bodies a client sends (used by the receiver)."""
    return msgspec.msgpack.Decoder(ClientFrame)


def server_decoder() -> "msgspec.msgpack.Decoder[ServerFrame]":
    """A decoder for frame bodies the gateway sends (used by clients)."""
    return msgspec.msgpack.Decoder(ServerFrame)


# --- bus: queue items -----------------------------------------------------------

class Origin(Struct, array_like=True, frozen=True, gc=False):
    """Where a Request comes from: its connection and when its frame was read.

    ``(sid, generation)`` names the connection; the pair is what makes a late
    answer harmless after the slot has been reused.  One Origin is shared by
    every request of one read (a Chunk): a worker sets one field per request,
    not four.
    """
    sid: int = 0
    generation: int = 0
    client: str = ""        # the client's HELLO name; "" for an anonymous one
    received: float = 0.0   # time.time() of the read that brought the frame


NOWHERE: Final = Origin()


class Request(Struct, tag=2, array_like=True, gc=False):
    """One client message for a business worker (the seed's msg_buf on qid3).

    ``sid``, ``generation``, ``client`` and ``deadline`` are read from its
    ``origin``.  A Request is a plain Struct: keep it,
    ``msgspec.msgpack.encode`` it, and answer it later from any process with
    ``duprep.bus.Replier.reply``.

    The first four fields are a REQUEST frame's, in its order, so a worker
    decodes a client's frames straight into Requests (one msgspec call per
    Chunk); the worker sets ``origin``.  Only plain values belong in it (it is
    not tracked by the cycle collector).
    """
    msgid: U64
    cpid: U64
    timeout_ms: U32         # what the client asked for; 0: no deadline
    data: bytes
    origin: Origin = NOWHERE
    oneway: bool = False    # SEND: no reply expected

    @property
    def sid(self) -> int:
        return self.origin.sid

    @property
    def generation(self) -> int:
        return self.origin.generation

    @property
    def client(self) -> str:
        return self.origin.client

    @property
    def deadline(self) -> float:
        """time.time() after which the client gave up; 0.0: none."""
        t = self.timeout_ms
        return self.origin.received + t / 1000 if t else 0.0


class _OneWay(Struct, tag=3, array_like=True, gc=False):
    """A SEND frame as a worker decodes it; becomes a Request with ``oneway=True``."""
    msgid: U64
    cpid: U64
    data: bytes
    origin: Origin = NOWHERE


class Chunk(Struct, tag=2, array_like=True, gc=False):
    """What the receiver puts on the request queue: one connection's frames, as read.

    ``frames`` is a msgpack array of the bodies of complete REQUEST and SEND
    frames (length prefixes removed), as the client sent them, wrapped in a
    bin so that a malformed body cannot spill into another Chunk.  The
    receiver only finds their boundaries and checks their tag; a worker
    decodes each Chunk's frames straight into Requests with one msgspec call
    (in parallel across workers), and answers a malformed one with ERROR
    BAD_FRAME and a Close.  This keeps the single receiver process cheap: no
    decode and re-encode per frame.
    """
    sid: int
    generation: int
    client: str
    received: float         # time.time() of the read; REQUEST deadlines count from it
    frames: bytes


class Deliver(Struct, tag=1, array_like=True, gc=False):
    """Bytes for one connection: one or more complete, prefixed wire frames.

    ``relay``: a PUSH another client relayed.  The sender drops it (counted) rather than let it
    pile up for a target that does not keep up, so that a client relaying faster than its target
    reads cannot get the target cut off as a slow consumer.
    """
    sid: int
    generation: int
    frame: bytes
    frames: int = 1
    relay: bool = False


class Close(Struct, tag=2, array_like=True, gc=False):
    """End the connection after what was queued for it before this item."""
    sid: int
    generation: int
    reason: int = 0


_request_batch = msgspec.msgpack.Decoder(list[Chunk])
_frames_in = msgspec.msgpack.Decoder(list[Union[Request, _OneWay]])
_frame_in = msgspec.msgpack.Decoder(Union[Request, _OneWay])
_raw_list = msgspec.msgpack.Decoder(list[msgspec.Raw])
_ARRAY16 = struct.Struct(">BH")
_reply_batch = msgspec.msgpack.Decoder(list[Union[Deliver, Close]])


def decode_requests(message: bytes) -> list[Chunk]:
    """Decode one request-queue message, leaving each Chunk's frames undecoded."""
    return _request_batch.decode(message)


def array_header(n: int) -> bytes:
    """The msgpack header of an array of ``n`` (< 65536) elements."""
    return _FIXARRAY[n] if n < 16 else _ARRAY16.pack(0xDC, n)


_FIXARRAY: Final = [bytes([0x90 | i]) for i in range(16)]


class BadFrame(NamedTuple):
    """What decode_chunks gives for a Chunk with a malformed frame (a result, never raised)."""
    requests: list[Request]     # the good frames before the bad one, where they could be told apart
    reason: str
    dropped: int                # frames of the Chunk that are not in ``requests``


def decode_chunks(message: bytes) -> list[tuple[Chunk, list[Request] | BadFrame]]:
    """Decode one request-queue message into Requests, grouped by Chunk.

    One msgspec call per Chunk turns its frames into Requests.  If a frame
    is malformed, the Chunk's frames are split and decoded one by one, so
    the frames before the bad one still count if they can be told apart (a
    BadFrame in place of the list).  Raises msgspec.DecodeError if the
    message itself is not a batch of Chunks.
    """
    out: list[tuple[Chunk, list[Request] | BadFrame]] = []
    for chunk in _request_batch.decode(message):
        try:
            frames = _frames_in.decode(chunk.frames)
        except (msgspec.DecodeError, ValueError, RecursionError):
            out.append((chunk, _one_by_one(chunk)))
        else:
            out.append((chunk, _complete(chunk, frames)))
    return out


def _one_by_one(chunk: Chunk) -> BadFrame:
    try:
        bodies = _raw_list.decode(chunk.frames)
    except (msgspec.DecodeError, ValueError, RecursionError) as e:
        # The bad body broke the array itself (e.g. it is truncated): where it starts is unknown.
        return BadFrame([], f"malformed frame: {e}", _count(chunk.frames))
    good: list[Request | _OneWay] = []
    for i, body in enumerate(bodies):
        try:
            good.append(_frame_in.decode(body))
        except (msgspec.DecodeError, ValueError, RecursionError) as e:
            return BadFrame(_complete(chunk, good), f"malformed frame: {e}", len(bodies) - i)
    return BadFrame(_complete(chunk, good), "malformed frame: trailing bytes", 0)


def _count(frames: bytes) -> int:
    """How many frames a Chunk's array header says it holds (1 if not even that is readable)."""
    if frames and 0x90 <= frames[0] <= 0x9F:
        return frames[0] & 0x0F
    if len(frames) >= 3 and frames[0] == 0xDC:
        return int(_ARRAY16.unpack_from(frames)[1])
    return 1


def _complete(chunk: Chunk, frames: list[Request | _OneWay]) -> list[Request]:
    """Give each of a Chunk's frames its Origin (in place: the list becomes Requests only)."""
    origin = Origin(chunk.sid, chunk.generation, chunk.client, chunk.received)
    # Set whatever the frame held: the receiver forwards only the exact 5-element REQUEST shape, and
    # this keeps a client from ever choosing its origin should another shape get through.  (A 7th
    # element could only make its own REQUEST one-way, which the client can do with a SEND.)
    sends = False
    for r in frames:
        r.origin = origin
        if type(r) is not Request:
            sends = True
    if sends:
        frames[:] = [r if type(r) is Request else Request(r.msgid, r.cpid, 0, r.data, origin, True)
                     for r in frames]
    return frames  # type: ignore[return-value]


def decode_replies(message: bytes) -> list[Deliver | Close]:
    """Decode one reply-queue message."""
    return _reply_batch.decode(message)


def bound(item: Struct) -> int:
    """An upper bound of ``item``'s encoded size, without encoding it."""
    if type(item) is Deliver:
        return DELIVER_OVERHEAD + len(item.frame)
    if type(item) is Chunk:
        return CHUNK_OVERHEAD + 4 * len(item.client) + len(item.frames)
    return 32


# Worst-case msgpack bytes of a bus item beside its variable fields: array
# header, tag, integers of up to 9 bytes, a float64, a bool, str/bin headers.
CHUNK_OVERHEAD: Final = 1 + 1 + 2 * 9 + 9 + 5 + 5
DELIVER_OVERHEAD: Final = 1 + 1 + 3 * 9 + 5 + 1


class BatchPacker:
    """Packs bus items into queue messages of at most ``limit`` bytes.

    Items are collected as objects and each queue message is encoded with a
    single msgspec call (one pass in C, not one encoder call per item); an
    upper bound of every item's size decides where a message ends, so a
    message never exceeds the limit.
    """

    __slots__ = ("limit", "_items", "_size", "_count", "_done", "_counts", "_encode")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: list[Struct] = []
        self._size = 3          # worst-case array header (array 16)
        self._count = 0
        self._done: list[bytes] = []
        self._counts: list[int] = []
        self._encode = msgspec.msgpack.Encoder().encode

    def add(self, item: Struct, size: int = -1, count: int = 0) -> bool:
        """Queue ``item``; ``size`` is its :func:`bound` if the caller knows it already; ``count``
        is added to its message's count (:meth:`take_counted`).

        True if ``item`` did not fit the open message: that one is now full, and ready to be sent
        (:meth:`take_full`) while the caller goes on adding.
        """
        if size < 0:
            size = bound(item)
        if size + 3 > self.limit:
            raise ValueError(f"bus item of up to {size} bytes exceeds the queue message size {self.limit}")
        full = self._size + size > self.limit or len(self._items) == 65535
        if full:
            self._seal()
        self._items.append(item)
        self._size += size
        self._count += count
        return full

    def _seal(self) -> None:
        if self._items:
            self._done.append(self._encode(self._items))
            self._counts.append(self._count)
            self._items = []
            self._size = 3
            self._count = 0

    def __bool__(self) -> bool:
        return bool(self._items) or bool(self._done)

    def take(self) -> list[bytes]:
        """All packed messages so far; the packer is empty afterwards."""
        self._seal()
        return self.take_full_messages()

    def take_full_messages(self) -> list[bytes]:
        """:meth:`take`, but only the messages that are full: the open one stays open."""
        done, self._done = self._done, []
        self._counts = []
        return done

    def take_full(self) -> list[tuple[bytes, int]]:
        """:meth:`take_counted`, but only the messages that are full: the open one stays open."""
        done = list(zip(self._done, self._counts))
        self._done, self._counts = [], []
        return done

    def take_counted(self) -> list[tuple[bytes, int]]:
        """:meth:`take`, each message with the sum of its items' counts."""
        self._seal()
        return self.take_full()
