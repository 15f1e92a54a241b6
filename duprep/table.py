"""The connection table: the seed's ``s_linkinfo`` in shared memory.

One ``multiprocessing.shared_memory`` segment per instance, created and
unlinked by the acceptor, read by everyone (``duprep status``, workers)::

    offset 0            HEADER (256 bytes)      written by the acceptor
    256                 SLOT[0] .. SLOT[n-1]    256 bytes each
    256 + 256*n         PROC[0] .. PROC[m-1]    128 bytes each
    ... + 128*m         HAND[3] .. HAND[m-1]    16 + msgsize bytes each, rounded up to 64

A slot is split into three parts, each with exactly one writer and its own
seqlock, because multi-field records written by one process tear when read
by another (pitfalls.md measured 26k torn reads in 1.7M without a protocol)::

    SLOT  +0   A part (acceptor)  seq gen state port connected_at addr
          +72  R part (receiver)  seq gen flags - last_in frames_in bytes_in name
          +176 S part (sender)    seq gen flags - last_out frames_out bytes_out dropped queued

A part's ``gen`` says which incarnation of the slot its counters belong to;
a reader ignores R and S parts whose gen differs from the A part's.  The
acceptor bumps the generation every time it hands a slot to a new
connection, so ``(sid, generation)`` names one connection for ever.

PROC rows: 0 acceptor, 1 receiver, 2 sender, 3.. business workers.  A worker
claims a row by taking an open file description record lock (``F_OFD_SETLK``,
lock.py) on byte ``ROW_LOCK_BASE + row`` of the instance lock file; the
kernel drops the lock when the worker closes it or dies, so a row is free
exactly when nobody holds its lock.  Each worker row has a HAND
region: a copy of the request-queue message the worker is working on, so
that whoever takes the row after the worker died can answer what it held
(``recovery.py``).

Seqlock: the writer makes ``seq`` odd, writes, makes it even; a reader retries
while ``seq`` is odd or changed under it.  All integers little-endian.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass
import _posixshmem
import mmap
import sys
from multiprocessing import shared_memory
from typing import Any, Final, Iterator, NoReturn
assert sys.byteorder == "little"      # the layout is little-endian; ProcRow.publish_counter stores natively

from . import ipcnames
from .errors import ConfigError, ProtocolError

__all__ = [
    "MAGIC", "LAYOUT_VERSION", "Table", "SlotState", "Role", "COUNTERS",
    "SlotInfo", "ProcInfo", "HEADER_SIZE", "SLOT_SIZE", "PROC_SIZE", "InHand", "FIRST_WORKER_ROW", "NCOUNTERS",
]

MAGIC: Final = b"DUPREP\x00\x01"
# The version of this table's layout *and* of the queue items (frame.py): every process that attaches
# reads it first, so a worker of another version refuses to serve an instance it would misread.
# 2: a Chunk's frames are an array of frame bodies, not the prefixed frames (2026-11).
# 3: HAND regions after the process rows; 11 counters per row (worker "lost", sender "half_written",
# receiver "half_read"); the S part's flags; the R flag HALF_READ (2026-11).
# 4: the header's heartbeat and hang_timeout, read by workers and their supervisors (2026-11).
LAYOUT_VERSION: Final = 4
ROW_LOCK_BASE: Final = 4096
READ_PATIENCE: Final = 2.0       # seconds a reader waits for a record's writer to finish

HEADER_FORMAT: Final = "<8sIIQIIIIIIIIdII48sQQdd"
HEADER_FIELDS: Final = (
    "magic", "layout", "state", "epoch", "nslots", "nprocs", "slot_size", "proc_size",
    "port", "msgsize", "depth", "max_frame", "started", "acceptor_pid", "max_per_ip",
    "host", "accepted", "refused", "heartbeat", "hang_timeout",
)
HEADER_SIZE: Final = 256
A_FORMAT: Final = "<IIIId48s"        # seq gen state port connected_at addr
R_FORMAT: Final = "<IIIIdQQ64s"      # seq gen flags pad last_in frames_in bytes_in name
S_FORMAT: Final = "<IIIIdQQQQ"       # seq gen flags pad last_out frames_out bytes_out dropped queued
SLOT_SIZE: Final = 256
NCOUNTERS: Final = 11
PROC_FORMAT: Final = f"<IIIIIIdd{NCOUNTERS}Q"    # seq pid role state index pad started heartbeat counters
PROC_SIZE: Final = 128
HAND_FORMAT: Final = "<IIQ"           # length (0: nothing in hand), answered, base; then the message
FIRST_WORKER_ROW: Final = 3

_HEADER = struct.Struct(HEADER_FORMAT)
_A = struct.Struct(A_FORMAT)
_R = struct.Struct(R_FORMAT)
_S = struct.Struct(S_FORMAT)
_PROC = struct.Struct(PROC_FORMAT)
_U32 = struct.Struct("<I")
_COUNTERS_OFFSET: Final = struct.calcsize(PROC_FORMAT[:PROC_FORMAT.index("dd") + 2])   # 40: after heartbeat
_HEARTBEAT_OFFSET: Final = _COUNTERS_OFFSET - 8                                           # 32
_HAND = struct.Struct(HAND_FORMAT)
A_OFFSET: Final = 0
R_OFFSET: Final = 72
S_OFFSET: Final = 176
NAME_CACHE: Final = 4096       # names whose slot a Table remembers (find_name)
_NAME_OFFSET: Final = R_OFFSET + struct.calcsize(R_FORMAT[:-3])     # of the R part's name, within a slot
assert _HEADER.size <= HEADER_SIZE and _A.size <= R_OFFSET - A_OFFSET
assert _R.size <= S_OFFSET - R_OFFSET and S_OFFSET + _S.size <= SLOT_SIZE and _PROC.size <= PROC_SIZE


def _fmt_codes() -> list[str]:
    codes, num = [], ""
    for ch in HEADER_FORMAT[1:]:
        if ch.isdigit():
            num += ch
        else:
            codes.append(num + ch)
            num = ""
    return codes


def _prefix(i: int) -> str:
    return "<" + "".join(_fmt_codes()[:i])


_HEADER_OFFSETS: Final = {name: struct.calcsize(_prefix(i)) for i, name in enumerate(HEADER_FIELDS)}
_HEADER_FIELD: Final = {name: struct.Struct("<" + code) for name, code in zip(HEADER_FIELDS, _fmt_codes())}


class SlotState:
    """Values of the A part's ``state``."""
    FREE = 0      # never used or released by every holder
    OPEN = 1      # accepted; socket handed to receiver and sender
    CLOSING = 2   # shut down; waiting for receiver and sender to let go
    names: Final = {0: "free", 1: "open", 2: "closing"}


class SlotFlag:
    """Bits of the R part's ``flags``."""
    READY = 1       # HELLO accepted, WELCOME queued
    HALF_READ = 2   # the bytes read so far end inside a frame: its start is in the receiver's memory


class SendFlag:
    """Bits of the S part's ``flags``."""
    HALF_WRITTEN = 1   # the stream ends inside a frame: it can take no other frame (sender.py)


class GatewayState:
    """Values of the header's ``state``."""
    BOOTING = 0
    READY = 1
    STOPPING = 2
    names: Final = {0: "booting", 1: "ready", 2: "stopping"}


class Role:
    """Values of a PROC row's ``role``."""
    NONE = 0
    ACCEPTOR = 1
    RECEIVER = 2
    SENDER = 3
    WORKER = 4
    names: Final = {0: "none", 1: "acceptor", 2: "receiver", 3: "sender", 4: "worker"}


# What each role's NCOUNTERS counters mean (unused ones are zero).
COUNTERS: Final[dict[int, tuple[str, ...]]] = {
    Role.ACCEPTOR: ("accepted", "refused_full", "refused_per_ip", "released", "restarts", "lost_in_workers",
                    "hung"),
    Role.RECEIVER: ("frames_in", "bytes_in", "queue_messages", "requests", "protocol_errors",
                    "handshake_timeouts", "backpressure_pauses", "relays", "half_read"),
    Role.SENDER: ("frames_out", "bytes_out", "queue_messages", "dropped_stale",
                  "slow_disconnects", "write_errors", "closes", "half_written", "relays_dropped"),
    Role.WORKER: ("requests", "replies", "handler_errors", "queue_messages", "held", "lost", "bad_frames"),
}


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """A consistent snapshot of one open connection (what ``status`` shows)."""
    sid: int
    generation: int
    state: str
    addr: str
    port: int
    connected_at: float
    name: str
    ready: bool
    last_in: float
    frames_in: int
    bytes_in: int
    last_out: float
    frames_out: int
    bytes_out: int
    dropped: int
    queued: int


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """A snapshot of one process row."""
    row: int
    pid: int
    role: str
    state: int
    index: int
    started: float
    heartbeat: float
    counters: dict[str, int]


class Segment(shared_memory.SharedMemory):
    """``SharedMemory`` that never involves the resource tracker.

    On Python < 3.13 every process that creates *or merely attaches* a
    segment registers it with a resource-tracker process of its own, which
    unlinks the segment when that process exits (CPython gh-82300) and costs
    one extra process per duprep process.  duprep creates and unlinks its
    segments explicitly, so it opts out: ``track=False`` on 3.13+, the same
    steps without the registration before.
    """

    def __init__(self, name: str, create: bool = False, size: int = 0) -> None:
        if sys.version_info >= (3, 13):
            super().__init__(name, create, size, track=False)  # type: ignore[call-arg]
            return
        self._name = "/" + name
        self._flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self._mode = 0o600
        self._fd = _posixshmem.shm_open(self._name, self._flags, mode=self._mode)
        try:
            if create:
                os.ftruncate(self._fd, size)
            self._size = os.fstat(self._fd).st_size
            self._mmap = mmap.mmap(self._fd, self._size)
        except BaseException:
            os.close(self._fd)
            if create:
                _posixshmem.shm_unlink(self._name)
            raise
        self._buf = memoryview(self._mmap)

    def unlink(self) -> None:
        _posixshmem.shm_unlink(self._name)


def _cut_short(name: str, why: str) -> ProtocolError:
    return ProtocolError(f"shared memory {name} is not a whole duprep table ({why}): a gateway killed while "
                         "creating it leaves such a segment; the next start or 'duprep cleanup' removes it")


def _attach(name: str, *, create: bool, size: int = 0) -> shared_memory.SharedMemory:
    return Segment(name, create=create, size=size)


class Part:
    """A seqlock-protected record at a fixed offset with exactly one writer."""

    __slots__ = ("buf", "off", "fmt")

    def __init__(self, buf: memoryview, off: int, fmt: struct.Struct) -> None:
        self.buf, self.off, self.fmt = buf, off, fmt

    def write(self, *values: Any) -> None:
        buf, off = self.buf, self.off
        even = _U32.unpack_from(buf, off)[0] & ~1
        odd = (even + 1) & 0xFFFFFFFF
        _U32.pack_into(buf, off, odd)
        self.fmt.pack_into(buf, off, odd, *values)
        _U32.pack_into(buf, off, (even + 2) & 0xFFFFFFFF)

    def read(self) -> tuple[Any, ...]:
        buf, off, fmt = self.buf, self.off, self.fmt
        for _ in range(100):                     # the usual case: no writer, or one done within a spin
            s1 = _U32.unpack_from(buf, off)[0]
            if not s1 & 1:
                values = fmt.unpack_from(buf, off)
                if _U32.unpack_from(buf, off)[0] == s1:
                    return values[1:]
        # The writer is mid-write and may have lost its CPU (2 cores, many processes):
        # give it the CPU and look again, for up to READ_PATIENCE seconds.
        deadline = time.monotonic() + READ_PATIENCE
        while time.monotonic() < deadline:
            os.sched_yield()
            s1 = _U32.unpack_from(buf, off)[0]
            if not s1 & 1:
                values = fmt.unpack_from(buf, off)
                if _U32.unpack_from(buf, off)[0] == s1:
                    return values[1:]
        raise ProtocolError(f"table record stayed locked for {READ_PATIENCE} s: its writer died mid-write")

    def read_own(self) -> tuple[Any, ...]:
        """The record as it is, for the process that took over as its only writer.

        Why: a writer killed inside a write leaves ``seq`` odd until the next
        write, and the only process that will ever write the record again is
        the one reading it now (its predecessor is dead), so waiting would
        never end.  The values may be half updated; the next write is whole.
        """
        return self.fmt.unpack_from(self.buf, self.off)[1:]


class Table:
    """A view of an instance's connection table.

    Create it with :meth:`create` (acceptor only) or :meth:`attach`.
    Writers use the ``*_part`` helpers for the parts they own; readers use
    :meth:`slots`, :meth:`procs` and :meth:`header`.
    """

    def __init__(self, shm: shared_memory.SharedMemory, *, owner: bool) -> None:
        self._shm = shm
        assert shm.buf is not None
        self.buf: memoryview = shm.buf
        self.owner = owner
        if len(self.buf) < HEADER_SIZE:
            self._refuse(f"{len(self.buf)} bytes, shorter than a table's header")
        h = self.header()
        if h["magic"] != MAGIC or h["layout"] != LAYOUT_VERSION:
            self.close()
            raise ProtocolError(
                f"shared memory {shm.name} is not a duprep table of layout {LAYOUT_VERSION} "
                f"(magic {h['magic']!r}, layout {h['layout']}): a gateway and its workers must run the "
                f"same duprep version (after upgrading duprep, restart the gateway)")
        self.nslots: int = h["nslots"]
        self.nprocs: int = h["nprocs"]
        self.epoch: int = h["epoch"]
        self.msgsize: int = h["msgsize"]
        self._procs_off = HEADER_SIZE + SLOT_SIZE * self.nslots
        self._hands_off = self._procs_off + PROC_SIZE * self.nprocs
        self._hand_size = hand_size(self.msgsize)
        self._names: dict[bytes, int] = {}     # find_name: the slot each name was found in last
        size = self._hands_off + self._hand_size * max(0, self.nprocs - FIRST_WORKER_ROW)
        if len(self.buf) < size:
            self._refuse(f"{len(self.buf)} bytes, shorter than the {size} its header describes")

    def _refuse(self, why: str) -> NoReturn:
        name = self._shm.name
        self.close()
        raise _cut_short(name, why)

    # --- life cycle -------------------------------------------------------

    @classmethod
    def create(cls, name: str, *, nslots: int, nprocs: int, epoch: int, **fields: Any) -> "Table":
        """Create the segment (acceptor only) and write the header."""
        if nslots < 1 or nprocs < 4:
            raise ConfigError("a table needs at least one slot and four process rows")
        size = HEADER_SIZE + SLOT_SIZE * nslots + PROC_SIZE * nprocs + \
            hand_size(fields.get("msgsize", 0)) * (nprocs - FIRST_WORKER_ROW)
        shm = _attach(name, create=True, size=size)
        values: dict[str, Any] = dict.fromkeys(HEADER_FIELDS, 0)
        values.update(magic=MAGIC, layout=LAYOUT_VERSION, epoch=epoch, nslots=nslots, nprocs=nprocs,
                      slot_size=SLOT_SIZE, proc_size=PROC_SIZE, started=time.time(), host=b"")
        values.update(fields)
        if isinstance(values["host"], str):
            values["host"] = values["host"].encode()
        assert shm.buf is not None
        _HEADER.pack_into(shm.buf, 0, *(values[f] for f in HEADER_FIELDS))
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> "Table":
        """Attach to an existing table; raises FileNotFoundError if there is none, ProtocolError if
        the segment is not a whole table of this layout."""
        try:
            shm = _attach(name, create=False)
        except ValueError as e:          # an empty segment: mmap refuses it
            raise _cut_short(name, str(e)) from None
        return cls(shm, owner=False)

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Remove the segment ``name`` without attaching (one that is not a whole table); False if none."""
        try:
            os.unlink(os.path.join(ipcnames.SHM_DIR, name))
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        """Detach (does not unlink)."""
        self.buf = None  # type: ignore[assignment]
        try:
            self._shm.close()
        except BufferError:  # a memoryview is still alive somewhere; the mapping dies with us
            pass

    def unlink(self) -> None:
        """Remove the segment's name (acceptor only, at shutdown)."""
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass

    # --- header -----------------------------------------------------------

    def header(self) -> dict[str, Any]:
        h = dict(zip(HEADER_FIELDS, _HEADER.unpack_from(self.buf, 0)))
        h["host"] = h["host"].rstrip(b"\0").decode()
        return h

    def get(self, field: str) -> Any:
        return _HEADER_FIELD[field].unpack_from(self.buf, _HEADER_OFFSETS[field])[0]

    def set(self, field: str, value: Any) -> None:
        """Write one header field (acceptor only; single aligned values)."""
        _HEADER_FIELD[field].pack_into(self.buf, _HEADER_OFFSETS[field], value)

    # --- slot parts ---------------------------------------------------------

    def a_part(self, sid: int) -> Part:
        return Part(self.buf, HEADER_SIZE + SLOT_SIZE * sid + A_OFFSET, _A)

    def r_part(self, sid: int) -> Part:
        return Part(self.buf, HEADER_SIZE + SLOT_SIZE * sid + R_OFFSET, _R)

    def s_part(self, sid: int) -> Part:
        return Part(self.buf, HEADER_SIZE + SLOT_SIZE * sid + S_OFFSET, _S)

    def slot(self, sid: int) -> SlotInfo | None:
        """A snapshot of slot ``sid``, or None if it is free."""
        gen, state, port, connected_at, addr = self.a_part(sid).read()
        if state == SlotState.FREE:
            return None
        rgen, flags, _, last_in, frames_in, bytes_in, name = self.r_part(sid).read()
        if rgen != gen:
            flags, last_in, frames_in, bytes_in, name = 0, 0.0, 0, 0, b""
        sgen, _, _, last_out, frames_out, bytes_out, dropped, queued = self.s_part(sid).read()
        if sgen != gen:
            last_out, frames_out, bytes_out, dropped, queued = 0.0, 0, 0, 0, 0
        return SlotInfo(
            sid=sid, generation=gen, state=SlotState.names.get(state, str(state)),
            addr=addr.rstrip(b"\0").decode(), port=port, connected_at=connected_at,
            name=name.rstrip(b"\0").decode(errors="replace"), ready=bool(flags & SlotFlag.READY),
            last_in=last_in, frames_in=frames_in, bytes_in=bytes_in, last_out=last_out,
            frames_out=frames_out, bytes_out=bytes_out, dropped=dropped, queued=queued)

    def slots(self) -> Iterator[SlotInfo]:
        """Snapshots of every non-free slot, in sid order."""
        for sid in range(self.nslots):
            info = self.slot(sid)
            if info is not None:
                yield info

    def generation(self, sid: int) -> int:
        """The slot's current generation (0 if never used)."""
        return int(self.a_part(sid).read()[0])

    def find_name(self, name: str) -> tuple[int, int] | None:
        """(sid, generation) of the open, ready connection called ``name`` (None for "": anonymous).

        The slot this table found for ``name`` last time is looked at first (two record reads):
        pushes go to the same clients again and again.  Otherwise one ``bytes.find`` pass over a
        copy of the slots finds the candidates (a name field holding ``name``), and only those are
        read properly (seqlock): 0.5 ms with 4096 slots, where reading every slot took 3 ms.
        """
        raw = name.encode()
        if not raw:
            return None
        sid = self._names.get(raw)
        if sid is not None:
            found = self._named(sid, raw)
            if found is not None:
                return found
            del self._names[raw]
        slots = bytes(self.buf[HEADER_SIZE:HEADER_SIZE + SLOT_SIZE * self.nslots])
        pos = slots.find(raw)
        while pos >= 0:
            sid, within = divmod(pos, SLOT_SIZE)
            if within != _NAME_OFFSET:            # the bytes sit elsewhere (inside a longer name, ...)
                pos = slots.find(raw, pos + 1)
                continue
            found = self._named(sid, raw)
            if found is not None:
                if len(self._names) >= NAME_CACHE:
                    self._names.clear()
                self._names[raw] = sid
                return found
            pos = slots.find(raw, (sid + 1) * SLOT_SIZE)
        return None

    def _named(self, sid: int, raw: bytes) -> tuple[int, int] | None:
        """(sid, generation) if slot ``sid`` is open, ready and called ``raw``."""
        gen, state, *_ = self.a_part(sid).read()
        if state == SlotState.OPEN:
            rgen, flags, _, _, _, _, rname = self.r_part(sid).read()
            if rgen == gen and flags & SlotFlag.READY and rname.rstrip(b"\0") == raw:
                return sid, gen
        return None

    # --- process rows ---------------------------------------------------------

    def proc_part(self, row: int) -> Part:
        if not 0 <= row < self.nprocs:
            raise IndexError(row)
        return Part(self.buf, self._procs_off + PROC_SIZE * row, _PROC)

    def procs(self) -> Iterator[ProcInfo]:
        """Snapshots of every row that has ever been used."""
        for row in range(self.nprocs):
            part = self.proc_part(row)
            try:
                values = part.read()
            except ProtocolError:        # its writer died mid-write and nobody took the row over yet
                values = part.read_own()
            pid, role, state, index, _, started, heartbeat, *counters = values
            if pid == 0 and role == Role.NONE:
                continue
            names = COUNTERS.get(role, ())
            yield ProcInfo(row=row, pid=pid, role=Role.names.get(role, str(role)), state=state,
                           index=index, started=started, heartbeat=heartbeat,
                           counters={n: counters[i] for i, n in enumerate(names)})

    def in_hand(self, row: int) -> "InHand":
        """Worker row ``row``'s HAND region."""
        if not FIRST_WORKER_ROW <= row < self.nprocs:
            raise IndexError(row)
        return InHand(self.buf, self._hands_off + self._hand_size * (row - FIRST_WORKER_ROW), self.msgsize)


def hand_size(msgsize: int) -> int:
    """Bytes of one HAND region: its head and one queue message, rounded up to a cache line."""
    return (_HAND.size + msgsize + 63) // 64 * 64


class InHand:
    """A worker row's copy of the request-queue message the worker is working on.

    Why: a worker that dies takes the requests it took with it, and only
    it knew which they were.  With this copy, whoever takes the row next
    (the acceptor when it reaps the worker, or the next worker to claim the
    row) can answer them with ERROR WORKER_LOST instead of letting their
    clients wait for a timeout.

    One writer (the row's owner) and readers only once the owner is dead
    (they hold the row's lock), so no seqlock: the owner stores the length
    last when it takes a message, and 0 when every answer to it is on the
    reply queue.  ``answered`` counts the message's requests, in order,
    whose answers were already on the reply queue when the owner last
    pushed answers but still held some of the message.  ``base`` is the
    row's ``requests`` counter before the message while it is in hand, and
    after it once it is done, so that a successor can set that counter
    right whatever the owner had published when it died.
    """

    __slots__ = ("buf", "off", "capacity", "active")

    def __init__(self, buf: memoryview, off: int, capacity: int) -> None:
        self.buf, self.off, self.capacity = buf, off, capacity
        self.active = _HAND.unpack_from(buf, off)[0] != 0

    def hold(self, message: bytes, base: int) -> None:
        """Record ``message`` (just taken off the request queue) as in hand, none of it answered;
        ``base``: the owner's ``requests`` counter before it."""
        n = len(message)
        if n > self.capacity:
            raise ProtocolError(f"a request-queue message of {n} bytes exceeds the table's msgsize {self.capacity}")
        buf, off = self.buf, self.off
        _HAND.pack_into(buf, off, 0, 0, base)
        start = off + _HAND.size
        buf[start:start + n] = message
        _U32.pack_into(buf, off, n)
        self.active = True

    def answered(self, k: int) -> None:
        """The first ``k`` requests of the message in hand have their answers on the reply queue."""
        _U32.pack_into(self.buf, self.off + 4, k)

    def clear(self, done: int) -> None:
        """Every request of the message in hand is answered; ``done``: the ``requests`` counter now."""
        if self.active:
            _HAND.pack_into(self.buf, self.off, 0, 0, done)
            self.active = False

    def done(self) -> int:
        """The ``requests`` counter the owner had reached with its last message done (0: none yet)."""
        n, _, base = _HAND.unpack_from(self.buf, self.off)
        return 0 if n else int(base)

    def read(self) -> tuple[bytes, int, int] | None:
        """``(message, answered, base)`` of what a dead owner held, or None if it held nothing."""
        n, k, base = _HAND.unpack_from(self.buf, self.off)
        if n == 0:
            return None
        if n > self.capacity:
            raise ProtocolError(f"HAND region at offset {self.off} says {n} bytes, more than msgsize {self.capacity}")
        start = self.off + _HAND.size
        return bytes(self.buf[start:start + n]), k, base


class ProcRow:
    """The calling process's own row: heartbeat and counters, one writer."""

    __slots__ = ("part", "pid", "role", "index", "started", "state", "counters")

    def __init__(self, table: Table, row: int, role: int, index: int = 0) -> None:
        self.part = table.proc_part(row)
        self.pid = os.getpid()
        self.role = role
        self.index = index
        self.started = time.time()
        self.state = 0
        self.counters = [0] * NCOUNTERS
        self.beat()

    def beat(self) -> None:
        """Publish heartbeat (monotonic clock, system-wide on Linux) and counters."""
        self.part.write(self.pid, self.role, self.state, self.index, 0, self.started,
                        time.monotonic(), *self.counters)

    def publish_counter(self, i: int) -> None:
        """Publish counter ``i`` alone, now: one aligned 8-byte store, no seqlock (a reader sees the old
        or the new value).  For a count others must never see behind (the receiver's ``requests``:
        the sender's drain compares the workers' with it, and a successor continues from it).
        (Through a native 'Q' view, which stores the 8 bytes at once: ``struct.pack_into`` with an
        explicit byte order writes them one by one, and a reader saw 0 in between.)"""
        off = self.part.off + _COUNTERS_OFFSET + 8 * i
        view = self.part.buf[off:off + 8].cast("Q")
        view[0] = self.counters[i]
        view.release()

    def publish_heartbeat(self) -> None:
        """Publish the heartbeat alone, now: one native 8-byte store, no seqlock (as publish_counter).
        Safe from another thread of the row's process: a full write racing it stores its own time."""
        off = self.part.off + _HEARTBEAT_OFFSET
        view = self.part.buf[off:off + 8].cast("d")
        view[0] = time.monotonic()
        view.release()

    def clear(self) -> None:
        self.part.write(0, 0, 0, 0, 0, 0.0, 0.0, *([0] * NCOUNTERS))
