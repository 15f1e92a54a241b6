"""The gateway side of ``--links callback`` (the acceptor runs it).

The seed's dual-link handshake, made safe.  A client daemon started with
``--links callback`` opens an initial connection L0 to the gateway's port
and sends one CALLME frame instead of HELLO: the two ports it listens on
and a random nonce.  The gateway connects back

* L1 to ``up_port``   -- the daemon writes requests, the receiver reads them
  (the seed's ``s_c1`` / ``tcp_s1``);
* L2 to ``down_port`` -- the sender writes replies, the daemon reads them
  (the seed's ``s_c2`` / ``tcp_s2``);

writes the nonce as the first bytes on each, and closes L0.  From then on
the pair is one connection: HELLO arrives on L1, WELCOME and everything
else leaves on L2, one slot, one ``(sid, generation)``, one row in
``duprep status``.

Safety rules this module enforces (the seed had none: its server would
connect to whatever the shared memory said):

1. The gateway connects back only to the address L0 came from -- the
   caller passes the L0 *socket*, never an address, so there is no way to
   aim it elsewhere.
2. Only to the two ports announced, which must be distinct, in
   ``1024..65535`` and different from L0's own source port.
3. Within a deadline; a connect that does not complete in time fails the
   whole callback and closes everything it opened.
4. The nonce proves to the daemon that the incoming connections are the
   gateway's answer to *its* L0 and not someone else's connection to an
   open port.

The acceptor, started with ``--links callback``, peeks at the first frame of
every new connection; on CALLME it runs a :class:`CallbackDialer` in its
loop, hands L1 to the receiver and L2 to the sender under one
``(sid, generation)``, and counts the client once (``--max-clients``,
``--max-per-ip``).  Without the option the receiver answers CALLME with
ERROR BAD_HELLO.
"""

from __future__ import annotations

import errno
import functools
import socket
from typing import Callable

from ..errors import DuprepError
from ..frame import NONCE_SIZE, CallMe
from .loop import ERR, WRITE, EventLoop, Timer

__all__ = ["CallMe", "NONCE_SIZE", "CallbackRefused", "check_call", "CallbackDialer", "connect_back"]

class CallbackRefused(DuprepError):
    """The announced ports are not acceptable, or connecting back failed."""


def check_call(l0: socket.socket, call: CallMe) -> tuple[str, int]:
    """Validate ``call`` against the L0 socket; return the peer address to call back.

    Raises CallbackRefused for equal ports, L0's own port, or a non-IP peer.
    """
    if l0.family not in (socket.AF_INET, socket.AF_INET6):
        raise CallbackRefused("callback links need a TCP/IP connection")
    peer = l0.getpeername()
    host, l0_port = peer[0], peer[1]
    if call.up_port == call.down_port:
        raise CallbackRefused("up_port and down_port must differ")
    if l0_port in (call.up_port, call.down_port):
        raise CallbackRefused("a callback port equals L0's source port")
    return host, l0_port


class CallbackDialer:
    """Connect back to a client daemon from an :class:`EventLoop`, with a deadline.

    ``on_done(l1, l2)`` gets two connected non-blocking sockets (the caller
    owns them); ``on_fail(reason)`` is called instead if anything goes wrong,
    after every socket this dialer opened is closed.  L0 is left to the
    caller.

    **Resource handling**: the dialer owns its two sockets until it calls
    ``on_done``; :meth:`cancel` closes them.
    """

    def __init__(self, loop: EventLoop, l0: socket.socket, call: CallMe, *, timeout: float,
                 on_done: Callable[[socket.socket, socket.socket], None],
                 on_fail: Callable[[str], None]) -> None:
        self.loop = loop
        self.call = call
        self.host, _ = check_call(l0, call)
        self.family = l0.family
        self.timeout = timeout
        self.on_done = on_done
        self.on_fail = on_fail
        self.socks: dict[str, socket.socket] = {}
        self.pending: dict[str, bytes] = {}      # nonce bytes still to write, per link
        self.timer: Timer | None = None
        self.finished = False

    def start(self) -> None:
        self.timer = self.loop.call_later(self.timeout, lambda: self._fail(
            f"connecting back to {self.host} did not complete within {self.timeout:g} s"))
        for link, port in (("l1", self.call.up_port), ("l2", self.call.down_port)):
            try:
                sock = socket.socket(self.family, socket.SOCK_STREAM)
            except OSError as e:       # EMFILE: this client is refused, the others are not affected
                self._fail(f"cannot open a socket to connect back: {e}")
                return
            sock.setblocking(False)
            self.socks[link] = sock
            self.pending[link] = self.call.nonce
            err = sock.connect_ex((self.host, port))
            if err not in (0, errno.EINPROGRESS):
                self._fail(f"connect back to {self.host}:{port}: {errno.errorcode.get(err, err)}")
                return
            self.loop.register(sock.fileno(), WRITE, functools.partial(self._on_writable, link))

    def _on_writable(self, link: str, ev: int) -> None:
        sock = self.socks[link]
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err or (ev & ERR and not ev & WRITE):
            self._fail(f"connect back to {self.host} ({link}): {errno.errorcode.get(err, err)}")
            return
        try:
            n = sock.send(self.pending[link])
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(f"connect back to {self.host} ({link}): {e}")
            return
        self.pending[link] = self.pending[link][n:]
        if self.pending[link]:
            return
        self.loop.unregister(sock.fileno())
        del self.pending[link]
        if not self.pending:
            self.finished = True
            if self.timer is not None:
                self.timer.cancel()
            l1, l2 = self.socks["l1"], self.socks["l2"]
            self.socks = {}
            self.on_done(l1, l2)

    def _fail(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.cancel()
        self.on_fail(reason)

    def cancel(self) -> None:
        """Close whatever this dialer opened (no callback)."""
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        for sock in self.socks.values():
            self.loop.close_later(sock)
        self.socks = {}


def connect_back(l0: socket.socket, call: CallMe, *, timeout: float) -> tuple[socket.socket, socket.socket]:
    """Blocking form of :class:`CallbackDialer` (tests, tools): ``(l1, l2)`` or CallbackRefused."""
    loop = EventLoop()
    result: list[object] = []

    def done(l1: socket.socket, l2: socket.socket) -> None:
        result.append((l1, l2))
        loop.stop()

    def fail(reason: str) -> None:
        result.append(reason)
        loop.stop()

    try:
        CallbackDialer(loop, l0, call, timeout=timeout, on_done=done, on_fail=fail).start()
        loop.running = True
        while not result:
            loop.run_once()
    finally:
        loop.close()
    outcome = result[0]
    if isinstance(outcome, str):
        raise CallbackRefused(outcome)
    return outcome  # type: ignore[return-value]

