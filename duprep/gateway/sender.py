"""The sender (seed ``tcp_s2``): takes replies off the reply queue, writes clients.

Owns: its copy of each client socket and the only right to write to it and
to end it (``shutdown(SHUT_RDWR)``, which reaches every holder), and the S
part of every slot.

Delivery is by ``(sid, generation)``: an item whose generation is not the one
of the socket the sender holds for that sid belongs to a connection that is
gone; it is dropped and counted, so a reply can never reach a client that
reused the slot.  The acceptor hands a new socket to the sender before the
receiver, so an item for a generation newer than any known can only mean the
hand-over is still in the control socket: the sender reads it and looks again.

Writes: every item of a batch is appended to its connection's buffer; before
sleeping, each touched connection gets one ``send`` of everything it has.
Only a connection whose kernel buffer is full is watched for EPOLLOUT.  A
connection that lets more than ``max_outbuf`` bytes pile up, or blocks our
writes for ``write_timeout`` seconds, is ended and counted (slow_disconnects;
its unwritten frames count as dropped); no one else waits for it.

Relayed PUSHes (``Deliver.relay``) are the one output another client
controls: one client relaying faster than its target reads would get the
target cut off as a slow consumer.  So a relayed PUSH that would take a
connection's unwritten bytes above half of ``max_outbuf`` is dropped and counted
(relays_dropped, and the connection's dropped frames); the target keeps its
connection and its own answers.  (The RELAY's acknowledgement says
"queued", never "delivered".)

A sender that dies loses what it had not written.  Worse, a connection it
left in the middle of a frame cannot take another frame: the client would
read the rest of the next one as the end of the cut one.  So a partial
write is published at once (``SendFlag.HALF_WRITTEN`` in the slot's S part)
and the sender that takes over ends such a connection instead of writing
to it (counted as ``half_written``); the client sees the connection end,
as for a slow consumer.
"""

from __future__ import annotations

import logging
import socket
import time

from .. import ipcnames
from ..config import GatewayConfig
from ..errors import ProtocolError, WouldBlock
from .. import fdpass
from ..fdpass import Op
from ..frame import Deliver, Error, ErrorCode, decode_replies, encode_wire
from ..queues import Queue
from ..table import COUNTERS, Role, SendFlag
from .base import GatewayChild, child_main
from ..table import Part
from .loop import ERR, READ, WRITE, Timer

log = logging.getLogger("duprep")

C_FRAMES, C_BYTES, C_QMSGS, C_STALE, C_SLOW, C_WERR, C_CLOSES, C_HALF, C_RELAY_DROPS = range(9)
MAX_MESSAGES_PER_WAKE = 256
DRAIN_CHECK = 0.05


class Conn:
    """The sender's state for one connection."""

    __slots__ = ("sid", "gen", "sock", "fd", "out", "out_bytes", "out_frames", "frames", "bytes",
                 "dropped", "last_out", "watching", "closing", "stall", "part", "half")

    def __init__(self, sid: int, gen: int, sock: socket.socket) -> None:
        self.sid, self.gen, self.sock, self.fd = sid, gen, sock, sock.fileno()
        self.out: list[bytes | memoryview] = []
        self.out_bytes = 0
        self.out_frames = 0
        self.frames = self.bytes = self.dropped = 0
        self.last_out = 0.0
        self.watching = False
        self.closing = False
        self.stall: Timer | None = None
        self.half = False               # the stream ends inside a frame (out holds the rest of it)
        self.part: Part = None  # type: ignore[assignment]   # set right after construction


class Sender(GatewayChild):
    ROW = 2
    ROLE = Role.SENDER

    def __init__(self, cfg: GatewayConfig, ctl: socket.socket) -> None:
        super().__init__(cfg, ctl)
        self.replies = Queue(ipcnames.reply_queue(cfg.instance))
        self.requests = Queue(ipcnames.request_queue(cfg.instance))  # for its depth while draining
        self.conns: dict[int, Conn] = {}
        self.dirty: dict[int, Conn] = {}         # connections with new output this batch
        self.to_close: list[tuple[int, int]] = []  # Op.CLOSE records; flush() acts on them once HANDED
        self.relay_room = cfg.max_outbuf // 2    # unwritten bytes above which relayed PUSHes are dropped
        self.draining = False
        self.stopped = False
        self.drain_deadline = 0.0
        self.now = time.time()

    def setup(self) -> None:
        """The reply queue is read only once the acceptor has handed over every open connection
        (Op.HANDED): a restarted sender that read it earlier would drop the answers, Closes and
        WELCOMEs queued while it was down as meant for unknown connections.  Op.CLOSE names a
        connection the receiver let go of whose Close item may have been lost (with a dead sender
        or receiver)."""

    def on_record(self, rec: fdpass.Record) -> None:
        # (May run inside on_replies, through lookup(): CLOSE only takes note; flush() acts on it.)
        if rec.op == Op.CLOSE:
            self.to_close.append((rec.sid, rec.generation))
        elif rec.op == Op.HANDED:
            if not self.loop.registered(self.replies.fileno()):
                self.loop.register(self.replies.fileno(), READ, self.on_replies)
        else:
            super().on_record(rec)

    def close_now(self) -> None:
        """End the connections the acceptor says the receiver let go of, after what is queued for them."""
        self.on_replies(0)                # what waits in the reply queue first, so the Close comes after it
        for sid, gen in self.to_close:
            conn = self.conns.get(sid)
            if conn is not None and conn.gen == gen:
                conn.closing = True
                self.dirty[sid] = conn
        self.to_close = []

    def add(self, sid: int, gen: int, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        old = self.conns.get(sid)
        if old is not None:
            log.warning("slot %d handed over again (gen %d -> %d)", sid, old.gen, gen)
            self.end(old)
        conn = Conn(sid, gen, sock)
        conn.part = self.table.s_part(sid)
        self.conns[sid] = conn
        sgen, flags, _, last_out, frames, nbytes, dropped, _ = conn.part.read_own()   # we are its writer now
        if sgen == gen:       # a sender before us (which died) wrote to this connection: go on counting
            conn.last_out, conn.frames, conn.bytes, conn.dropped = last_out, frames, nbytes, dropped
            if flags & SendFlag.HALF_WRITTEN:
                self.c[C_HALF] += 1
                log.warning("sid %d gen %d: the previous sender died in the middle of a frame; "
                            "ending the connection", sid, gen)
                self.end(conn)
                return
        self.publish(conn)

    # --- reply queue ----------------------------------------------------------------

    def on_replies(self, _ev: int) -> None:
        get = self.replies.get_nowait
        for _ in range(MAX_MESSAGES_PER_WAKE):
            try:
                message = get()
            except WouldBlock:
                break
            self.c[C_QMSGS] += 1
            self.touch()
            try:
                items = decode_replies(message)
            except (ValueError, ProtocolError) as e:
                log.error("dropped an undecodable reply-queue message of %d bytes: %s", len(message), e)
                continue
            conns, dirty = self.conns, self.dirty
            for item in items:
                conn = conns.get(item.sid)
                if conn is None or conn.gen != item.generation:
                    conn = self.lookup(item.sid, item.generation)
                if type(item) is Deliver:
                    if conn is None:
                        self.c[C_STALE] += item.frames
                        continue
                    if item.relay and conn.out_bytes + len(item.frame) > self.relay_room:
                        self.c[C_RELAY_DROPS] += item.frames
                        conn.dropped += item.frames
                        self.touch(conn)
                        continue
                    conn.out.append(item.frame)
                    conn.out_bytes += len(item.frame)
                    conn.out_frames += item.frames
                    dirty[conn.sid] = conn
                elif conn is not None:       # Close
                    conn.closing = True
                    dirty[conn.sid] = conn

    def lookup(self, sid: int, gen: int) -> Conn | None:
        conn = self.conns.get(sid)
        if conn is not None and conn.gen == gen:
            return conn
        if conn is None or gen > conn.gen:
            self.control.poll()              # the hand-over may still be in the control socket
            conn = self.conns.get(sid)
            if conn is not None and conn.gen == gen:
                return conn
        return None

    # --- writing ------------------------------------------------------------------------

    def flush(self) -> None:
        self.now = time.time()
        if self.to_close and self.loop.registered(self.replies.fileno()):
            self.close_now()
        if self.dirty:
            dirty, self.dirty = self.dirty, {}
            for conn in dirty.values():
                if self.conns.get(conn.sid) is conn:
                    self.write(conn)

    def write(self, conn: Conn) -> None:
        out = conn.out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            try:
                n = conn.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.c[C_WERR] += 1
                self.end(conn)
                return
            c = self.c
            if n:
                conn.last_out = self.now
                conn.bytes += n
                c[C_BYTES] += n
            if n == len(data):
                conn.out = []
                k = conn.out_frames
                conn.frames += k
                c[C_FRAMES] += k
                conn.out_frames = conn.out_bytes = 0
                if not (conn.watching or conn.stall or conn.closing):    # the common case, kept short
                    self.dirty_conns.add(conn)
                    if self.stats_timer is None:
                        self.touch()
                    return
            else:
                self.write_later(conn, memoryview(data)[n:], progress=n > 0)
                return
        if conn.half:                  # back at a frame boundary: say so before anything else can fail
            conn.half = False
            self.publish(conn)
        if conn.watching:
            conn.watching = False
            self.loop.unregister(conn.fd)
        if conn.stall is not None:
            conn.stall.cancel()
            conn.stall = None
        if conn.closing:
            self.end(conn)
        else:
            self.touch(conn)

    def write_later(self, conn: Conn, rest: memoryview, *, progress: bool) -> None:
        """The kernel took only part: keep the rest, watch for room, end the connection if it never reads."""
        conn.out = [rest]
        conn.out_bytes = len(rest)
        if progress and not conn.half:    # now the stream ends inside a frame: tell a successor at once
            conn.half = True
            self.publish(conn)
        if conn.out_bytes > self.cfg.max_outbuf:
            self.slow(conn, f"{conn.out_bytes} reply bytes not read")
            return
        if progress or conn.stall is None:
            if conn.stall is not None:
                conn.stall.cancel()
            conn.stall = self.loop.call_later(self.cfg.write_timeout, lambda: self.on_stall(conn))
        if not conn.watching:
            conn.watching = True
            self.loop.register(conn.fd, WRITE, lambda ev: self.on_writable(conn, ev))
        self.touch(conn)

    def on_writable(self, conn: Conn, ev: int) -> None:
        if ev & ERR and not ev & WRITE:
            self.c[C_WERR] += 1
            self.end(conn)
            return
        self.write(conn)

    def on_stall(self, conn: Conn) -> None:
        conn.stall = None
        if self.conns.get(conn.sid) is conn and conn.out:
            self.slow(conn, f"no progress writing for {self.cfg.write_timeout:g} s")

    def slow(self, conn: Conn, why: str) -> None:
        self.c[C_SLOW] += 1
        log.warning("sid %d gen %d: slow consumer, disconnecting: %s", conn.sid, conn.gen, why)
        # No ERROR frame: the kernel buffer is full and may end in the middle of a
        # frame, so the client sees the connection end (docs/protocol.md).
        self.end(conn)

    def end(self, conn: Conn) -> None:
        """Shut the connection down for every holder and let go of it."""
        if self.conns.get(conn.sid) is not conn:
            return
        del self.conns[conn.sid]
        self.dirty.pop(conn.sid, None)
        if conn.stall is not None:
            conn.stall.cancel()
        conn.dropped += conn.out_frames
        conn.out = []
        self.c[C_CLOSES] += 1
        self.touch()
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.watching = False
        self.loop.close_later(conn.sock)
        self.publish(conn)
        self.control.send(Op.RELEASED, conn.sid, conn.gen)

    def publish(self, conn: Conn) -> None:
        conn.part.write(conn.gen, SendFlag.HALF_WRITTEN if conn.half else 0, 0, conn.last_out, conn.frames,
                        conn.bytes, conn.dropped, conn.out_bytes)

    # --- graceful stop ----------------------------------------------------------------

    def stop(self) -> None:
        """Deliver what is still coming for the clients, then end them all.

        Quiescent means: every request the receiver queued has been handled
        by a worker, the reply queue is empty and every buffer is written.
        Checked on a short deadline while draining only (the receiver has
        stopped by now, so this is bounded by drain_timeout).
        """
        self.draining = True
        self.drain_deadline = time.monotonic() + self.cfg.drain_timeout
        log.info("draining replies for %d connections (at most %g s)", len(self.conns), self.cfg.drain_timeout)
        self.check_drain()

    def quiescent(self) -> bool:
        if self.replies.depth_now() or self.requests.depth_now():
            return False
        if any(conn.out for conn in self.conns.values()):
            return False
        queued = handled = 0
        for proc in self.table.procs():
            if proc.role == "receiver":
                queued = proc.counters["requests"]
            elif proc.state and proc.role == "acceptor":   # WORKER_LOST answers it has still to send
                return False
            elif proc.role == "worker":
                if proc.state:                # replies held by a worker that found the queue full
                    return False
                handled += proc.counters["requests"]
        return handled >= queued

    def check_drain(self) -> None:
        if not self.stopped:
            done = self.quiescent()
            if not done and time.monotonic() < self.drain_deadline:
                self.loop.call_later(DRAIN_CHECK, self.check_drain)
                return
            if not done:
                log.warning("drain timeout: ending %d connections with replies outstanding", len(self.conns))
            bye = encode_wire(Error(0, 0, ErrorCode.SHUTTING_DOWN, "the gateway is stopping"))
            for conn in list(self.conns.values()):
                if not conn.out:            # only between frames: say why before the end
                    try:
                        conn.sock.send(bye)
                    except OSError:
                        pass
                self.end(conn)
            self.row.beat()
            self.control.send(Op.STOPPED)
            self.stopped = True
        if self.control.outbox and time.monotonic() < self.drain_deadline + 5:
            self.loop.call_later(DRAIN_CHECK, self.check_drain)   # let the last records go out
            return
        self.loop.stop()


assert COUNTERS[Role.SENDER][C_STALE] == "dropped_stale" and COUNTERS[Role.SENDER][C_HALF] == "half_written"
assert COUNTERS[Role.SENDER][C_RELAY_DROPS] == "relays_dropped"


def main(argv: list[str] | None = None) -> None:
    child_main("sender", Sender, argv)


if __name__ == "__main__":
    main()
