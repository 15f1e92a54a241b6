"""The client daemon's one connection to the gateway: dial, handshake, frames, reconnect.

States: ``connecting`` (a dialer is working) -> ``handshake`` (HELLO sent,
waiting for WELCOME) -> ``up`` -> ``down`` (waiting out the backoff) ->
``connecting`` ... and ``stopped`` for good.  The seed's ``tcp_c`` exited
when the server went away and every ``c_process`` hung; here a lost link is
reported at once (``on_down``, which fails the requests waiting on it) and
dialled again after ``min_backoff * 2**attempts`` seconds, capped at
``max_backoff``, with "equal jitter" (half fixed, half random) so that many
client hosts do not reconnect in lock-step after a gateway restart.

Owns the link socket(s) -- one for a direct link, two (L1 write, L2 read)
for callback links -- and closes them through ``EventLoop.close_later``
(unregister first, close after the batch).  Outgoing frames collect in
``out`` while the loop handles a batch and leave in one ``send`` before it
sleeps (:meth:`Link.flush`); only when the kernel buffer is full is the
socket watched for EPOLLOUT.

Dead peers that never answer (a cable pulled, a host gone) are found by
TCP keepalive (``wire.keepalive``): 10 s idle, then 3 probes 5 s apart.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections import deque
from typing import Callable

import msgspec

from ..frame import PROTOCOL_VERSION, Error, ErrorCode, Hello, Welcome, encode_wire, server_decoder
from ..gateway.loop import ERR, READ, WRITE, EventLoop, Timer
from ..wire import FrameReader, FrameTooLarge, keepalive
from .config import DaemonConfig
from .dial import CallbackDial, Dial, DirectDial

__all__ = ["Link", "backoff_delay"]

log = logging.getLogger("duprep")

READ_SIZE = 65536          # larger reads are slower in CPython (pitfalls.md)


def backoff_delay(attempts: int, lo: float, hi: float, rng: random.Random) -> float:
    """Seconds before reconnect attempt ``attempts`` (0-based): equal jitter on a doubling base."""
    base = min(hi, lo * float(2 ** min(attempts, 30)))
    return base / 2 + rng.uniform(0, base / 2)


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive(sock)


class Link:
    """The shared link.  Callbacks run from the daemon's loop:

    * ``on_up(welcome)`` -- the handshake finished; requests may flow.
    * ``on_frame(frame)`` -- a REPLY, DEFERRED, ERROR (msgid != 0) or PUSH.
    * ``on_down(reason)`` -- an established link was lost.
    """

    def __init__(self, cfg: DaemonConfig, loop: EventLoop, *, on_up: Callable[[Welcome], None],
                 on_frame: Callable[[object], None], on_down: Callable[[str], None],
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.loop = loop
        self.on_up, self.on_frame, self.on_down = on_up, on_frame, on_down
        self.rng = rng or random.Random()
        self.state = "down"
        self.rsock: socket.socket | None = None
        self.wsock: socket.socket | None = None
        self.dial: Dial | None = None
        self.timer: Timer | None = None
        self.reader = FrameReader(1 << 24)
        self.decoder = server_decoder()
        self.rbuf = bytearray(READ_SIZE)
        self.rview = memoryview(self.rbuf)
        self.out: list[bytes | bytearray | memoryview] = []
        self.out_bytes = 0
        # SENDs not completely written yet, as (end offset in the stream, endpoint, local msgid): a SEND
        # has no answer to fail it, so the ones the link drops are reported from here (take_unsent()).
        self.sends: deque[tuple[int, int, int]] = deque()
        self.queued = self.written = 0    # stream offsets since the link came up
        self.unsent: list[tuple[int, int]] = []
        self.writing = False
        self.welcome: Welcome | None = None
        self.attempts = 0             # failed attempts since the link was last up
        self.connects = 0             # handshakes completed
        self.losses = 0               # established links lost
        self.last_error = ""
        self.next_attempt = 0.0       # monotonic time of the next dial while down
        self.up_since = 0.0           # time.time() of the last WELCOME
        self.frames_in = self.frames_out = 0

    # --- dialing -----------------------------------------------------------------

    def start(self) -> None:
        """Dial now."""
        if self.state in ("down",):
            self._dial()

    def _dial(self) -> None:
        self.timer = None
        self.state = "connecting"
        cfg = self.cfg
        if cfg.links == "callback":
            self.dial = CallbackDial(self.loop, cfg.server_host, cfg.server_port, timeout=cfg.connect_timeout,
                                     bind_host=cfg.callback_host, on_done=self._dialed, on_fail=self._failed)
        else:
            self.dial = DirectDial(self.loop, cfg.server_host, cfg.server_port, timeout=cfg.connect_timeout,
                                   on_done=self._dialed, on_fail=self._failed)
        self.dial.start()

    def _dialed(self, rsock: socket.socket, wsock: socket.socket) -> None:
        self.dial = None
        self.rsock, self.wsock = rsock, wsock
        try:
            _tune(rsock)
            if wsock is not rsock:
                _tune(wsock)
        except OSError as e:
            self.fail(f"socket options: {e}")
            return
        self.state = "handshake"
        self.reader = FrameReader(1 << 24)
        self.loop.register(rsock.fileno(), READ, self._on_rsock)
        if wsock is not rsock:
            self.loop.register(wsock.fileno(), READ, self._on_wsock)
        self.timer = self.loop.call_later(self.cfg.handshake_timeout, lambda: self.fail(
            f"no WELCOME from {self.cfg.server} within {self.cfg.handshake_timeout:g} s"))
        self.send(encode_wire(Hello(PROTOCOL_VERSION, self.cfg.name)))
        self.flush()

    def _failed(self, reason: str) -> None:
        self.dial = None
        self.fail(reason)

    # --- reading -------------------------------------------------------------------

    def _on_rsock(self, ev: int) -> None:
        if ev & WRITE and self.wsock is self.rsock:
            self.flush()
        if ev & (READ | ERR) and self.rsock is not None:
            self._read()

    def _on_wsock(self, ev: int) -> None:
        """Callback mode, L1: writable, or readable -- which can only mean EOF or an error."""
        if ev & WRITE:
            self.flush()
        if ev & (READ | ERR) and self.wsock is not None:
            try:
                data = self.wsock.recv(256)
            except BlockingIOError:
                return
            except OSError as e:
                self.fail(f"L1 to {self.cfg.server} failed: {e}")
                return
            self.fail(f"gateway closed L1 ({self.cfg.server})" if not data else "unexpected bytes on L1")

    def _read(self) -> None:
        assert self.rsock is not None
        try:
            n = self.rsock.recv_into(self.rbuf, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self.fail(f"connection to {self.cfg.server} failed: {e.strerror or e}")
            return
        if n == 0:
            self.fail(f"gateway {self.cfg.server} closed the connection")
            return
        try:
            bodies = self.reader.feed(self.rview[:n])
            frames = [self.decoder.decode(b) for b in bodies]
        except (FrameTooLarge, msgspec.DecodeError, ValueError, RecursionError) as e:
            self.fail(f"bad frame from the gateway: {e}")
            return
        for frame in frames:
            if self.rsock is None:          # a frame ended the link
                return
            self.frames_in += 1
            self._handle(frame)

    def _handle(self, frame: object) -> None:
        if type(frame) is Error and frame.msgid == 0:
            name = ErrorCode.names.get(frame.code, str(frame.code))
            verb = "refused the connection" if self.state == "handshake" else "ended the connection"
            self.fail(f"gateway {self.cfg.server} {verb}: {name}: {frame.message}")
            return
        if self.state == "handshake":
            if type(frame) is not Welcome:
                self.fail(f"expected WELCOME, got {type(frame).__name__}")
                return
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.welcome = frame
            self.state = "up"
            self.attempts = 0
            self.connects += 1
            self.up_since = time.time()
            self.last_error = ""
            log.info("link up: %s as sid %d gen %d%s", self.cfg.server, frame.sid, frame.generation,
                     f" named {frame.name!r}" if frame.name else "")
            self.on_up(frame)
            return
        if type(frame) is Welcome:
            self.fail("WELCOME received twice")
            return
        self.on_frame(frame)

    # --- writing ---------------------------------------------------------------------

    def send(self, data: bytes | bytearray, *, send_of: tuple[int, int] | None = None) -> None:
        """Queue one encoded wire frame; it leaves at the next :meth:`flush`.

        ``send_of`` (endpoint, local msgid) marks a SEND, reported by
        :meth:`take_unsent` if the link goes down before it is written.
        """
        self.out.append(data)
        self.out_bytes += len(data)
        self.queued += len(data)
        self.frames_out += 1
        if send_of is not None:
            self.sends.append((self.queued, *send_of))

    def take_unsent(self) -> list[tuple[int, int]]:
        """(endpoint, local msgid) of every SEND the last link dropped before writing it whole."""
        unsent, self.unsent = self.unsent, []
        return unsent

    def flush(self) -> None:
        """Write what is queued, without blocking; watch for EPOLLOUT if the kernel is full."""
        sock = self.wsock
        if not self.out or sock is None or self.state not in ("handshake", "up"):
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.fail(f"writing to {self.cfg.server} failed: {e.strerror or e}")
            return
        self.written += n
        sends = self.sends
        while sends and sends[0][0] <= self.written:
            sends.popleft()
        if n == len(data):
            self.out.clear()
            self.out_bytes = 0
            if self.writing:
                self.writing = False
                self.loop.modify(sock.fileno(), READ)
            return
        rest = memoryview(data)[n:]
        self.out = [rest]
        self.out_bytes = len(rest)
        if not self.writing:
            self.writing = True
            self.loop.modify(sock.fileno(), READ | WRITE)

    # --- ending ------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """The attempt or the link failed: close, report, and dial again after a backoff."""
        if self.state == "stopped":
            return
        was_up = self.state == "up"
        self._close()
        self.last_error = reason
        self.state = "down"
        if was_up:
            self.losses += 1
            log.warning("link lost: %s", reason)
            self.on_down(reason)
        delay = backoff_delay(self.attempts, self.cfg.min_backoff, self.cfg.max_backoff, self.rng)
        self.attempts += 1
        if not was_up:
            log.info("%s; next attempt in %.2f s", reason, delay)
        self.next_attempt = self.loop.clock() + delay
        self.timer = self.loop.call_later(delay, self._dial)

    def stop(self) -> None:
        """Close for good (daemon exit)."""
        was_up = self.state == "up"
        self._close()
        self.state = "stopped"
        if was_up:
            self.on_down("the client daemon is stopping")

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.dial is not None:
            self.dial.cancel()
            self.dial = None
        for sock in {id(s): s for s in (self.rsock, self.wsock) if s is not None}.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.loop.close_later(sock)
        self.rsock = self.wsock = None
        self.out.clear()
        self.out_bytes = 0
        self.unsent += [(ep, msgid) for _, ep, msgid in self.sends]
        self.sends.clear()
        self.queued = self.written = 0
        self.writing = False
        self.welcome = None

    @property
    def up(self) -> bool:
        return self.state == "up"

    def describe_down(self) -> str:
        """Why requests cannot go out now, for the error local callers see."""
        if self.state == "stopped":
            return "the client daemon is stopping"
        what = {"connecting": "connecting", "handshake": "handshaking"}.get(self.state, "")
        if what:
            return (f"the link to gateway {self.cfg.server} is down (now {what}; last error: "
                    f"{self.last_error or 'none'})")
        left = max(0.0, self.next_attempt - self.loop.clock())
        return (f"the link to gateway {self.cfg.server} is down ({self.last_error or 'not connected yet'}); "
                f"the client daemon reconnects by itself, next attempt in {left:.1f} s")
