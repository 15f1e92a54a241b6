"""The receiver (seed ``tcp_s1``): reads every client, feeds the request queue.

Owns: its copy of each client socket (closes it, never shuts it down unless
the client broke the protocol or vanished: ending a connection is the
sender's job, so an ERROR frame can still be written), the client names
(HELLO), relays, and the R part of every slot.

One epoll wait point.  Each readable socket gets one ``recv_into`` of up to
64 KiB into a shared buffer, split into as many frames as it holds.  The
frames of a whole batch of events are packed into as few queue messages as
fit: one ``mq_send`` per message, not per frame.  Each message goes as soon
as it is full, even in the middle of a wake-up (``send_full``: the workers
start on it while the rest is read), and the last one before the next wait.

Backpressure: messages that do not fit a full queue wait, in order, in a
bounded backlog (BACKLOG_LIMIT bytes) while the receiver watches the queue
for room, and what is read meanwhile fills the open message instead of being
sealed as each wake-up ends (fewer, fuller messages for workers that are
behind); past that limit it parks every connection that becomes readable
(interest set to nothing), so TCP pushes back on the clients instead of
memory growing.  (Parking at the first full queue made it flap: two
epoll_ctl calls per connection, more than its reads.)  Bytes read count
against the limit at once: once a wake-up has read that much, each further
connection it reports gets a SMALL_READ, not READ_SIZE -- one wake-up can
report a thousand readable connections, and 64 KiB from each would be
64 MiB (4 KiB: 4 MiB).
Items for the reply queue (WELCOME, ERROR, relays, closes) are flushed
before requests, so a client never gets an answer before its WELCOME.

A receiver that dies loses what it had read and not queued.  A connection
whose last read ended inside a frame has lost the start of that frame: a
successor would take the rest of it for a new frame (and might even find a
well-formed one in a payload).  So the receiver publishes at once when a
connection's reads stop inside a frame and when they are back at a frame
boundary (``SlotFlag.HALF_READ`` in the slot's R part), and a receiver that
takes over ends such a connection instead of reading it.  ("At once" is after
the read has been split: a receiver killed in between, a few microseconds per
read, leaves that one connection to be misread by its successor; the bytes
misread are that client's own, so no other connection can be affected.)
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections import deque
from functools import partial

import msgspec

from .. import ipcnames
from ..config import GatewayConfig
from ..errors import WouldBlock
from ..fdpass import Op
from ..frame import (PROTOCOL_VERSION, BatchPacker, Close, Deliver, Error, ErrorCode, Hello,
                     LENGTH, MAX_NAME, CHUNK_OVERHEAD, CallMe, Chunk, Push, Relay, Reply, Welcome, client_decoder,
                     encode_wire, Call, Send, array_header)
from ..queues import Queue
from ..table import COUNTERS, Role, SlotFlag
from .base import GatewayChild, child_main
from ..table import Part
from .loop import ERR, READ, WRITE, Timer

log = logging.getLogger("duprep")

READ_SIZE = 65536
SMALL_READ = 4096     # per connection and wake-up once a wake-up has read BACKLOG_LIMIT bytes
HEAD = struct.Struct(">IH")    # a frame's length prefix and the first two bytes of its body
# The first two body bytes of the only shapes forwarded undecoded: REQUEST as a fixarray of exactly 5
# (tag 2), SEND of exactly 4 (tag 3).  Any other header (extra elements, array16) is decoded here and
# re-encoded: a worker decodes straight into Request, whose later fields extra elements would fill.
REQUEST_HEAD, SEND_HEAD = 0x9502, 0x9403
HEAD_PAD = bytes(HEAD.size - LENGTH.size)    # what the read buffer holds beyond the bytes read
BACKLOG_LIMIT = 1 << 20  # bytes of queue messages held while the queues are full
C_FRAMES, C_BYTES, C_QMSGS, C_REQUESTS, C_PROTO, C_HS_TIMEOUT, C_PAUSES, C_RELAYS, C_HALF = range(9)


class Conn:
    """The receiver's state for one connection."""

    __slots__ = ("sid", "gen", "sock", "fd", "pending", "name", "name_size", "ready", "announced", "timer",
                 "frames", "bytes", "last_in", "parked", "part", "half")

    def __init__(self, sid: int, gen: int, sock: socket.socket) -> None:
        self.sid, self.gen, self.sock, self.fd = sid, gen, sock, sock.fileno()
        self.pending = bytearray()      # the start of an incomplete frame
        self.name = ""
        self.name_size = 0              # bytes of its UTF-8: what it takes in each Chunk
        self.ready = False              # HELLO accepted
        self.announced = False          # READY published: its WELCOME is on the reply queue
        self.timer: Timer | None = None
        self.frames = self.bytes = 0
        self.last_in = 0.0
        self.parked = False
        self.half = False               # the bytes read so far end inside a frame (its start is in pending)
        self.part: Part = None  # type: ignore[assignment]   # set right after construction


class Receiver(GatewayChild):
    ROW = 1
    ROLE = Role.RECEIVER

    def __init__(self, cfg: GatewayConfig, ctl: socket.socket) -> None:
        super().__init__(cfg, ctl)
        self.requests = Queue(ipcnames.request_queue(cfg.instance))
        self.replies = Queue(ipcnames.reply_queue(cfg.instance))
        self.max_frame = self.table.get("max_frame")
        # frame-body bytes one Chunk can carry: the batch header, the Chunk, its frames array header
        self.chunk_room = self.requests.msgsize - 3 - CHUNK_OVERHEAD - 3
        # split() starts a new Chunk for a frame that does not fit the open one: it must fit an empty one
        assert self.max_frame + 4 <= self.chunk_room - MAX_NAME, (self.max_frame, self.chunk_room)
        self.conns: dict[int, Conn] = {}          # by sid
        self.names: dict[str, Conn] = {}
        self.decoder = client_decoder()
        self.rbuf = bytearray(READ_SIZE + len(HEAD_PAD))
        self.rview = memoryview(self.rbuf)
        self.req_out = BatchPacker(self.requests.msgsize)
        self.rep_out = BatchPacker(self.replies.msgsize)
        # Queue messages that did not fit yet, in order; reading pauses above BACKLOG_LIMIT bytes
        # (not at the first full queue: that made the receiver flap, two epoll_ctl per connection).
        self.backlog: deque[tuple[Queue, bytes, int]] = deque()   # (queue, message, requests in it)
        self.backlog_bytes = 0
        self.waiting_on = -1      # the queue descriptor watched for room, -1 if none
        self.full = False         # the head of the backlog was refused; wait for on_room
        self.paused = False
        self.parked: list[Conn] = []
        self.stopping = False
        self.stopped = False
        self.now = 0.0            # time.time() of this wake-up's first read; 0: not read yet
        self.unflushed = 0        # bytes read since the last flush: counted against BACKLOG_LIMIT at once
        # HELLOs accepted whose WELCOME is not on the reply queue yet.  Their slots say READY only
        # once it is: a successor that finds READY takes the WELCOME for sent, and a client whose
        # WELCOME died in our backlog would wait for it for ever; without READY it gets a handshake
        # timeout (an ERROR), or BAD_HELLO for its next frame, and reconnects.
        self.welcomed: list[Conn] = []

    def add(self, sid: int, gen: int, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        old = self.conns.get(sid)
        if old is not None:      # cannot happen unless the acceptor lost track; keep the table right
            log.warning("slot %d handed over again (gen %d -> %d)", sid, old.gen, gen)
            self.release(old, notify=True)
        conn = Conn(sid, gen, sock)
        conn.part = self.table.r_part(sid)
        self.conns[sid] = conn
        rgen, flags, _, last_in, frames, nbytes, name = conn.part.read_own()   # we are its writer now
        if rgen == gen and flags & SlotFlag.HALF_READ:
            # The receiver before us died holding the start of a frame: the stream cannot be resynchronised.
            log.warning("sid %d gen %d: the previous receiver died in the middle of a frame; ending the "
                        "connection", sid, gen)
            self.c[C_HALF] += 1
            self.touch()
            conn.last_in, conn.frames, conn.bytes = last_in, frames, nbytes
            self.end(conn)
            return
        if rgen == gen and flags & SlotFlag.READY:
            # A receiver before us (which crashed) already took this client's HELLO.
            conn.ready = conn.announced = True
            raw = name.rstrip(b"\0")
            conn.name, conn.name_size = raw.decode(), len(raw)
            conn.last_in, conn.frames, conn.bytes = last_in, frames, nbytes
            if conn.name:
                self.names[conn.name] = conn
            log.info("took over sid %d gen %d (%s)", sid, gen, conn.name or "-")
        else:
            conn.part.write(gen, 0, 0, 0.0, 0, 0, b"")
            conn.timer = self.loop.call_later(self.cfg.handshake_timeout,
                                              lambda: self.on_handshake_timeout(conn))
        if self.paused:
            conn.parked = True
            self.parked.append(conn)
            self.loop.register(conn.fd, 0, partial(self.on_readable, conn))
        else:
            self.loop.register(conn.fd, READ, partial(self.on_readable, conn))   # (no Python frame of its own)

    # --- reading ------------------------------------------------------------------

    def on_readable(self, conn: Conn, ev: int) -> None:
        if self.paused and not ev & ERR:
            if not conn.parked:
                conn.parked = True
                self.parked.append(conn)
                self.loop.modify(conn.fd, 0)
            return
        # Past the limit, each connection reported still gets a small read: memory stays bounded and
        # nobody is skipped (epoll reports ready sockets in the same order each time: skipping the rest
        # of a wake-up starved the connections at its end).
        size = READ_SIZE if self.unflushed + self.backlog_bytes <= BACKLOG_LIMIT else SMALL_READ
        try:
            n = conn.sock.recv_into(self.rbuf, size)
        except BlockingIOError:
            return
        except OSError:
            self.end(conn)
            return
        if n == 0:
            self.end(conn)
            return
        conn.bytes += n
        self.c[C_BYTES] += n
        self.unflushed += n
        now = self.now
        if not now:                  # one clock read per wake-up, the base of request deadlines
            now = self.now = time.time()
        conn.last_in = now
        self.dirty_conns.add(conn)   # touch(conn), inlined: this runs once per read
        if self.stats_timer is None:
            self.touch()
        if conn.pending:
            conn.pending += self.rview[:n]
            n = len(conn.pending)
            conn.pending += HEAD_PAD
            buf = memoryview(bytes(conn.pending))
            conn.pending.clear()
        else:
            buf = self.rview
        self.split(conn, buf, n)

    def split(self, conn: Conn, buf: memoryview, n: int) -> None:
        """Find the frames in ``buf[:n]``: REQUEST/SEND go on as Chunks, undecoded; the rest is handled here.

        Only the length prefix and the first two bytes of a REQUEST or SEND
        body are looked at (REQUEST_HEAD or SEND_HEAD);
        whatever else a client sends is decoded and validated here.  ``buf``
        has two readable bytes past ``n``, so one unpack reads a frame's head
        even at the end (those bytes count only in a complete frame of 2+
        bytes).  The loop runs once per frame read: its first test takes a
        complete REQUEST/SEND of a greeted client that fits the open Chunk,
        everything else is sorted out below it.
        """
        off = first = others = 0     # first: where the frames collected in bodies begin
        limit = self.max_frame
        room = self.chunk_room - conn.name_size
        stop = room if room < n else n    # a frame ending past this is incomplete or starts a new Chunk
        # what a forwarded frame's head is; -1 until the client's HELLO is accepted
        req, snd = (REQUEST_HEAD, SEND_HEAD) if conn.ready else (-1, -1)
        bodies: list[bytes | memoryview] = [b""]   # [0]: the array header, set by enqueue()
        add = bodies.append
        head = HEAD.unpack_from
        last = n - 4
        while off <= last:
            size, h = head(buf, off)
            start = off + 4
            end = start + size
            # (a body of 0 or 1 bytes never shows a REQUEST/SEND head: the bytes after it are the next
            # prefix's first, 0 below 16 MiB, or the buffer's zero padding; after a garbage prefix the
            # connection ends with an ERROR either way, from here or from a worker)
            if (h == req or h == snd) and end <= stop and size <= limit:
                add(buf[start:end])
                off = end
                continue
            if end > n or size > limit:          # (one test for two rare cases)
                if size <= limit:
                    break                        # the frame's end is still to come
                self.forward(conn, bodies)
                self.fail(conn, ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds max_frame {limit}")
                return
            if h == req or h == snd:             # the open Chunk is full: another one (never empty:
                self.forward(conn, bodies)           # a max_frame frame fits one alone, see __init__)
                bodies = [b""]
                add = bodies.append
                first = off
                stop = first + room if first + room < n else n
                continue
            self.forward(conn, bodies)
            bodies = [b""]
            add = bodies.append
            first = off = end
            others += 1
            if not self.other(conn, buf[start:end]):
                return
            req, snd = (REQUEST_HEAD, SEND_HEAD) if conn.ready else (-1, -1)
            room = self.chunk_room - conn.name_size
            stop = first + room if first + room < n else n
        k = len(bodies) - 1
        if k:
            self.enqueue(conn, bodies)
        if off < n:
            conn.pending += buf[off:n]
            if not conn.half:        # tell a successor at once: it could not find the next frame
                conn.half = True
                self.publish(conn)
        elif conn.half:
            conn.half = False
            self.publish(conn)
        k += others
        conn.frames += k
        self.c[C_FRAMES] += k

    def other(self, conn: Conn, body: memoryview) -> bool:
        """Decode and act on a frame that is not a REQUEST/SEND; False if the connection was ended."""
        try:
            f = self.decoder.decode(body)
        except (msgspec.DecodeError, ValueError, RecursionError) as e:
            # msgspec raises UnicodeDecodeError (a ValueError) for bad UTF-8
            self.fail(conn, ErrorCode.BAD_FRAME, f"malformed frame: {e}")
            return False
        return self.handle(conn, f)

    def forward(self, conn: Conn, bodies: list[bytes | memoryview]) -> None:
        """Put the REQUEST/SEND bodies split() found so far (after the header slot) in a Chunk, and count them."""
        k = len(bodies) - 1
        if k:
            self.enqueue(conn, bodies)
            conn.frames += k
            self.c[C_FRAMES] += k

    def enqueue(self, conn: Conn, bodies: list[bytes | memoryview]) -> None:
        """Add one Chunk for ``conn``: the frame bodies after ``bodies[0]`` as a msgpack array, in a bin.

        Its requests are counted (``requests``) when its queue message is on the queue, not now: what
        dies in our backlog must not count, or the sender's drain would wait for answers that cannot come.
        """
        k = len(bodies) - 1
        bodies[0] = array_header(k)
        frames = b"".join(bodies)
        if self.req_out.add(Chunk(conn.sid, conn.gen, conn.name, conn.last_in, frames),
                            CHUNK_OVERHEAD + conn.name_size + len(frames), k):
            self.send_full()

    def handle(self, conn: Conn, frame: object) -> bool:
        """Act on one frame; False if the connection was ended."""
        kind = type(frame)
        if not conn.ready:
            if kind is Hello:
                return self.hello(conn, frame)  # type: ignore[arg-type]
            if kind is CallMe:
                self.fail(conn, ErrorCode.BAD_HELLO, "callback links are not enabled on this gateway "
                          "(duprep serve --links callback)" if self.cfg.links != "callback" else
                          "a CALLME must be the first frame, a fixarray of at most 60 bytes (protocol.md 1.5.1)")
                return False
            return self.not_ready(conn)
        if kind is Call or kind is Send:
            # A REQUEST/SEND in another shape than the fast path's (array16, extra elements): forward it
            # re-encoded, extra elements dropped.
            self.enqueue(conn, [b"", msgspec.msgpack.encode(frame)])   # (a frame split() counted)
        elif kind is Relay:
            self.relay(conn, frame)  # type: ignore[arg-type]
        else:
            self.fail(conn, ErrorCode.BAD_HELLO, f"{kind.__name__.upper()} is only valid as the first frame"
                      if kind is CallMe else "HELLO sent twice")
            return False
        return True

    def not_ready(self, conn: Conn) -> bool:
        self.fail(conn, ErrorCode.BAD_HELLO, "the first frame must be HELLO")
        return False

    def hello(self, conn: Conn, hello: Hello) -> bool:
        if hello.version != PROTOCOL_VERSION:
            self.fail(conn, ErrorCode.BAD_VERSION,
                      f"protocol version {hello.version} not supported; this gateway speaks {PROTOCOL_VERSION}")
            return False
        name = hello.name
        if name:
            if not name.isprintable() or len(name.encode()) > MAX_NAME or name.startswith("#"):
                self.fail(conn, ErrorCode.BAD_HELLO,
                          f"client name must be printable, at most {MAX_NAME} bytes of UTF-8, not start with '#'")
                return False
            if name in self.names:
                self.fail(conn, ErrorCode.NAME_TAKEN, f"a client named {name!r} is already connected")
                return False
            self.names[name] = conn
        conn.name = name
        conn.name_size = len(name.encode())
        conn.ready = True
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self.rep_out.add(Deliver(conn.sid, conn.gen, encode_wire(
            Welcome(PROTOCOL_VERSION, conn.sid, conn.gen, name, self.max_frame))))
        self.welcomed.append(conn)  # READY is published once the WELCOME is on the queue (flush)
        return True

    def relay(self, conn: Conn, frame: Relay) -> None:
        self.c[C_RELAYS] += 1
        target = self.names.get(frame.target)
        if target is None:
            self.rep_out.add(Deliver(conn.sid, conn.gen, encode_wire(Error(
                frame.msgid, frame.cpid, ErrorCode.UNKNOWN_TARGET, f"no client named {frame.target!r}"))))
            return
        source = conn.name or f"#{conn.sid}"       # anonymous senders are named by sid, never ""
        self.rep_out.add(Deliver(target.sid, target.gen, encode_wire(Push(0, source, frame.data)), relay=True))
        self.rep_out.add(Deliver(conn.sid, conn.gen, encode_wire(Reply(frame.msgid, frame.cpid, b""))))

    def on_handshake_timeout(self, conn: Conn) -> None:
        conn.timer = None
        if self.conns.get(conn.sid) is conn and not conn.ready:
            self.c[C_HS_TIMEOUT] += 1
            self.touch()
            self.fail(conn, ErrorCode.HANDSHAKE_TIMEOUT,
                      f"no HELLO within {self.cfg.handshake_timeout:g} s")

    # --- ending ---------------------------------------------------------------

    def fail(self, conn: Conn, code: int, message: str) -> None:
        """Protocol violation: tell the client why, then end the connection."""
        self.c[C_PROTO] += 1
        self.touch()
        log.info("sid %d gen %d (%s): %s: %s", conn.sid, conn.gen, conn.name or "-",
                 ErrorCode.names.get(code, code), message)
        self.rep_out.add(Deliver(conn.sid, conn.gen, encode_wire(Error(0, 0, code, message[:200]))))
        self.end(conn, reason=code)

    def end(self, conn: Conn, reason: int = 0) -> None:
        """Let go of the connection and ask the sender to close it after what is queued."""
        self.rep_out.add(Close(conn.sid, conn.gen, reason))
        self.release(conn, notify=True)

    def release(self, conn: Conn, *, notify: bool) -> None:
        if self.conns.get(conn.sid) is not conn:
            return
        del self.conns[conn.sid]
        if conn.name and self.names.get(conn.name) is conn:
            del self.names[conn.name]
        if conn.timer is not None:
            conn.timer.cancel()
        self.dirty_conns.discard(conn)
        # No longer READY: until the acceptor frees the slot, a push by name must find the client's
        # new connection (it may reconnect under the same name at once), not this one.
        conn.announced = False
        self.publish(conn)
        self.loop.close_later(conn.sock)
        if notify:
            self.control.send(Op.RELEASED, conn.sid, conn.gen)

    def publish(self, conn: Conn) -> None:
        flags = (SlotFlag.READY if conn.announced else 0) | (SlotFlag.HALF_READ if conn.half else 0)
        conn.part.write(conn.gen, flags, 0, conn.last_in, conn.frames, conn.bytes, conn.name.encode())

    # --- flushing and backpressure ------------------------------------------------

    def flush(self) -> None:
        """Before sleeping: send what this batch produced, keep what does not fit yet."""
        self.now = 0.0
        self.unflushed = 0
        # While the request queue refuses, the open message stays open and fills (send_full seals it when
        # full): workers that are behind get fewer, fuller messages; a stop seals it at once.
        self.to_backlog(self.req_out.take_counted() if not self.full or self.stopping else [])
        backlog = self.backlog
        if not self.full:                        # a full queue is retried once it says it has room
            self.put_backlog()
        if self.welcomed:
            self.announce()
        waiting = backlog[0][0].fileno() if backlog else -1
        if waiting != self.waiting_on:           # watch the queue whose room we need, and only that
            if self.waiting_on >= 0:
                self.loop.unregister(self.waiting_on)
            if waiting >= 0:
                self.loop.register(waiting, WRITE, self.on_room)
            self.waiting_on = waiting
        if self.backlog_bytes > BACKLOG_LIMIT and not self.paused:
            self.pause()
        elif self.paused and self.backlog_bytes <= BACKLOG_LIMIT // 2:
            self.resume()
        if self.stopping and not backlog:
            self.finish_stop()

    def send_full(self) -> None:
        """A request message is full in the middle of a wake-up: put it now, not when the wake-up ends.

        One wake-up can read a thousand connections, for milliseconds; the
        workers should not sit idle meanwhile, waiting for requests already
        read (measured: one CPU of two idle 5-7 % of the time at the target
        cell, with the receiver running alone on the other).  Everything
        ready goes, reply-queue items first as in flush(), so it is still one
        mq_send per full message.  A queue found full earlier in the wake-up
        is tried again (the workers may have made room since), at most once
        per full message.
        """
        self.to_backlog(self.req_out.take_full())
        # What this wake-up read is in the backlog now (counted in backlog_bytes) but for the open message.
        self.unflushed = 0
        self.full = False
        self.put_backlog()
        if self.welcomed:       # at once, not when the wake-up ends: a successor must not find a
            self.announce()     # welcomed client un-READY (it would refuse it as not handshaken)

    def to_backlog(self, requests: list[tuple[bytes, int]]) -> None:
        """Append every reply-queue item packed so far, then ``requests`` (request-queue messages), to the
        backlog: replies first, so a WELCOME goes before the requests that came behind its HELLO."""
        for q, messages in ((self.replies, self.rep_out.take_counted() if self.rep_out else []),
                            (self.requests, requests)):
            for message, n in messages:
                self.backlog.append((q, message, n))
                self.backlog_bytes += len(message)

    def announce(self) -> None:
        """Publish READY for the clients whose WELCOME is on the reply queue (none is left in the backlog)."""
        if not any(q is self.replies for q, _, _ in self.backlog):
            for conn in self.welcomed:
                if self.conns.get(conn.sid) is conn:
                    conn.announced = True
                    self.publish(conn)     # now push by name finds it (table.find_name)
            self.welcomed.clear()

    def put_backlog(self) -> None:
        """Put backlog messages, in order, until a queue is full (then ``full`` is set) or none is left."""
        backlog = self.backlog
        c = self.c
        requests_before = c[C_REQUESTS]
        while backlog:
            q, message, requests = backlog[0]
            try:
                q.put_nowait(message)
            except WouldBlock:
                self.full = True
                break
            backlog.popleft()
            self.backlog_bytes -= len(message)
            c[C_QMSGS] += 1
            c[C_REQUESTS] += requests
        if c[C_REQUESTS] != requests_before:
            # At once, not within STATS_INTERVAL: if we die now, a successor continues from the published
            # count, and a count behind the queue would let a later stop's drain end before the answers.
            self.row.publish_counter(C_REQUESTS)

    def on_room(self, _ev: int) -> None:
        self.full = False                        # flush() runs next, before the loop sleeps

    def pause(self) -> None:
        """Stop reading clients: their requests wait in TCP, not in our memory."""
        self.paused = True
        self.c[C_PAUSES] += 1
        self.touch()

    def resume(self) -> None:
        self.paused = False
        parked, self.parked = self.parked, []
        for conn in parked:
            conn.parked = False
            if self.conns.get(conn.sid) is conn and not self.stopping:
                self.loop.modify(conn.fd, READ)

    # --- graceful stop ------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading clients; exit once everything read is on the queues."""
        log.info("stopping: no more reads, flushing %d connections' requests", len(self.conns))
        self.stopping = True
        for conn in self.conns.values():
            if conn.timer is not None:
                conn.timer.cancel()
            if not conn.parked:
                self.loop.modify(conn.fd, 0)

    def finish_stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            for conn in list(self.conns.values()):
                self.publish(conn)
                self.loop.close_later(conn.sock)   # the sender ends the connections
            self.conns.clear()
            self.row.beat()
            self.control.send(Op.STOPPED)
        if not self.control.outbox:
            self.loop.stop()


assert COUNTERS[Role.RECEIVER][C_HALF] == "half_read"


def main(argv: list[str] | None = None) -> None:
    child_main("receiver", Receiver, argv)


if __name__ == "__main__":
    main()
