"""Opening the link to the gateway: direct, or the seed's dual links by callback.

Both dialers work inside the daemon's :class:`EventLoop` without blocking
it and end in exactly one call:
``on_done(rsock, wsock)`` with connected non-blocking sockets that the
caller now owns -- the same socket twice for a direct link -- or
``on_fail(reason)`` after closing everything they opened.

* :class:`DirectDial` -- one TCP connection, as :class:`duprep.Client` has.
* :class:`CallbackDial` -- ``--links callback``: connect L0, listen on two
  ephemeral ports, announce them with a CALLME frame, and accept the
  gateway's two connections back: L1 (we write requests) and L2 (we read
  replies).  An incoming connection is taken only from the address L0 is
  connected to and only if its first 16 bytes are the nonce sent on L0;
  anything else is closed and the listener keeps waiting, until the
  deadline.  L0 is closed once both links stand (or when the gateway
  closes it); an ERROR frame on L0 is the gateway's refusal.

Name resolution (:class:`Resolve`): a numeric address at once; a name with
``getaddrinfo`` in a short-lived thread that reports back through a
socketpair, so a slow DNS server delays only this dial, never the loop
that serves the local processes.
"""

from __future__ import annotations

import errno
import functools
import logging
import secrets
import socket
import threading
from typing import Any, Callable, Protocol

import msgspec

from ..frame import PROTOCOL_VERSION, Error, ErrorCode, encode_wire, server_decoder
from ..gateway.callback import NONCE_SIZE, CallMe
from ..gateway.loop import ERR, READ, WRITE, EventLoop, Timer
from ..wire import FrameReader

__all__ = ["Dial", "DirectDial", "CallbackDial", "Resolve", "OnDone", "OnFail"]

log = logging.getLogger("duprep")

OnDone = Callable[[socket.socket, socket.socket], None]
OnFail = Callable[[str], None]


class Dial(Protocol):
    def start(self) -> None: ...
    def cancel(self) -> None: ...


AddrInfo = tuple[Any, ...]       # one getaddrinfo() entry: family, type, proto, canonname, sockaddr


class Resolve:
    """``getaddrinfo(host, port)`` without blocking the loop; ends in one call of ``on_done(info)``
    or ``on_fail(reason)``, unless cancelled."""

    def __init__(self, loop: EventLoop, host: str, port: int, *, on_done: Callable[[AddrInfo], None],
                 on_fail: OnFail) -> None:
        self.loop, self.host, self.port = loop, host, port
        self.on_done, self.on_fail = on_done, on_fail
        self.rsock: socket.socket | None = None
        self.result: AddrInfo | str = ""

    def start(self) -> None:
        try:             # a numeric address needs no lookup: no thread
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass
        else:
            self.on_done(info[0])
            return
        self.rsock, wsock = socket.socketpair()
        self.rsock.setblocking(False)
        self.loop.register(self.rsock.fileno(), READ, self._on_result)
        threading.Thread(target=self._lookup, args=(wsock,), name="duprep-resolve", daemon=True).start()

    def _lookup(self, wsock: socket.socket) -> None:
        """In the thread: look up, then wake the loop.  The thread owns ``wsock`` (closing it from the
        loop while this thread may still write to it could hit a reused descriptor number)."""
        try:
            self.result = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        except OSError as e:
            self.result = f"cannot resolve {self.host!r}: {e.strerror or e}"
        try:
            wsock.send(b"\0")
        except OSError:
            pass         # cancelled: nobody listens any more
        finally:
            wsock.close()

    def _on_result(self, _ev: int) -> None:
        self.cancel()
        if isinstance(self.result, str):
            self.on_fail(self.result)
        else:
            self.on_done(self.result)

    def cancel(self) -> None:
        if self.rsock is not None:
            self.loop.close_later(self.rsock)
            self.rsock = None


def _connect(info: AddrInfo) -> socket.socket:
    """A non-blocking socket with connect() started; raises OSError."""
    family, type_, proto, _, addr = info
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    err = sock.connect_ex(addr)
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, errno.errorcode.get(err, str(err)))
    return sock


def _connect_error(sock: socket.socket, ev: int) -> str:
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        return errno.errorcode.get(err, str(err))
    if ev & ERR and not ev & WRITE:
        return "connection failed"
    return ""


class DirectDial:
    """One TCP connection to ``host:port`` within ``timeout`` seconds."""

    def __init__(self, loop: EventLoop, host: str, port: int, *, timeout: float,
                 on_done: OnDone, on_fail: OnFail) -> None:
        self.loop, self.host, self.port, self.timeout = loop, host, port, timeout
        self.on_done, self.on_fail = on_done, on_fail
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        self.resolve: Resolve | None = None

    def start(self) -> None:
        self.timer = self.loop.call_later(self.timeout, lambda: self._fail(
            f"connecting to {self.host}:{self.port} timed out after {self.timeout:g} s"))
        self.resolve = Resolve(self.loop, self.host, self.port, on_done=self._on_resolved,
                               on_fail=lambda why: self._fail(f"cannot connect to {self.host}:{self.port}: {why}"))
        self.resolve.start()

    def _on_resolved(self, info: AddrInfo) -> None:
        self.resolve = None
        try:
            self.sock = _connect(info)
        except OSError as e:
            self._fail(f"cannot connect to {self.host}:{self.port}: {e.strerror or e}")
            return
        self.loop.register(self.sock.fileno(), WRITE, self._on_writable)

    def _on_writable(self, ev: int) -> None:
        assert self.sock is not None
        why = _connect_error(self.sock, ev)
        if why:
            self._fail(f"cannot connect to {self.host}:{self.port}: {why}")
            return
        sock, self.sock = self.sock, None
        self.loop.unregister(sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
        self.on_done(sock, sock)

    def _fail(self, reason: str) -> None:
        self.cancel()
        self.on_fail(reason)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.resolve is not None:
            self.resolve.cancel()
            self.resolve = None
        if self.sock is not None:
            self.loop.close_later(self.sock)
            self.sock = None


class _Incoming:
    """A connection accepted on a callback port whose nonce is still being read."""

    __slots__ = ("sock", "got")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got = b""


class CallbackDial:
    """The seed's L0 + L1/L2 handshake, daemon side (see duprep.gateway.callback)."""

    def __init__(self, loop: EventLoop, host: str, port: int, *, timeout: float, bind_host: str,
                 on_done: OnDone, on_fail: OnFail) -> None:
        self.loop, self.host, self.port, self.timeout = loop, host, port, timeout
        self.bind_host = bind_host
        self.on_done, self.on_fail = on_done, on_fail
        self.l0: socket.socket | None = None
        self.l0_dial: DirectDial | None = None
        self.l0_reader = FrameReader(65536)
        self.gateway_ip = ""
        self.nonce = secrets.token_bytes(NONCE_SIZE)
        self.listeners: dict[str, socket.socket] = {}     # "up" (L1), "down" (L2)
        self.incoming: list[tuple[str, _Incoming]] = []
        self.links: dict[str, socket.socket] = {}
        self.timer: Timer | None = None
        self.done = False

    def start(self) -> None:
        self.timer = self.loop.call_later(self.timeout, lambda: self._fail(
            f"callback links to {self.host}:{self.port} not established within {self.timeout:g} s"))
        self.l0_dial = DirectDial(self.loop, self.host, self.port, timeout=self.timeout,
                                  on_done=lambda sock, _: self._on_l0_connected(sock),
                                  on_fail=lambda why: self._fail(f"L0: {why}"))
        self.l0_dial.start()

    def _on_l0_connected(self, l0: socket.socket) -> None:
        self.l0_dial = None
        self.l0 = l0
        self.gateway_ip = self.l0.getpeername()[0]
        bind_ip = self.bind_host or self.l0.getsockname()[0]
        ports = {}
        try:
            for link in ("up", "down"):
                lsock = socket.socket(self.l0.family, socket.SOCK_STREAM)
                self.listeners[link] = lsock
                lsock.bind((bind_ip, 0))
                lsock.listen(4)
                lsock.setblocking(False)
                ports[link] = lsock.getsockname()[1]
                self.loop.register(lsock.fileno(), READ, functools.partial(self._on_listener, link))
            self.l0.send(encode_wire(CallMe(PROTOCOL_VERSION, ports["up"], ports["down"], self.nonce)))
        except OSError as e:
            self._fail(f"cannot set up callback links on {bind_ip}: {e.strerror or e}")
            return
        self.loop.register(self.l0.fileno(), READ, self._on_l0_readable)
        log.info("L0 to %s:%d: waiting for the gateway to call back on ports %d (up) and %d (down)",
                 self.host, self.port, ports["up"], ports["down"])

    def _on_l0_readable(self, _ev: int) -> None:
        """An ERROR on L0 is the gateway's refusal; EOF only means it is done with L0.

        The gateway may close L0 as soon as it has connected back -- before
        we have read the nonces -- so EOF is no failure: the deadline covers
        a gateway that closes L0 and never calls.
        """
        assert self.l0 is not None
        try:
            data = self.l0.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.loop.close_later(self.l0)
            self.l0 = None
            return
        try:
            decoder = server_decoder()
            for body in self.l0_reader.feed(data):
                frame = decoder.decode(body)
                if isinstance(frame, Error):
                    name = ErrorCode.names.get(frame.code, str(frame.code))
                    self._fail(f"gateway refused the callback: {name}: {frame.message} "
                               f"(is it running with --links callback?)")
                    return
        except (msgspec.DecodeError, ValueError) as e:
            self._fail(f"unexpected bytes on L0: {e}")

    def _on_listener(self, link: str, _ev: int = 0) -> None:
        lsock = self.listeners.get(link)
        if lsock is None:
            return
        try:
            sock, addr = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("callback accept on the %s port: %s", link, e)
            return
        if addr[0] != self.gateway_ip:
            log.warning("refused a callback connection from %s: only %s may call back", addr[0], self.gateway_ip)
            sock.close()
            return
        sock.setblocking(False)
        inc = _Incoming(sock)
        self.incoming.append((link, inc))
        self.loop.register(sock.fileno(), READ, lambda _ev: self._on_nonce(link, inc))

    def _on_nonce(self, link: str, inc: _Incoming) -> None:
        try:
            data = inc.sock.recv(NONCE_SIZE - len(inc.got))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        inc.got += data
        if data and len(inc.got) < NONCE_SIZE:
            return
        self.incoming.remove((link, inc))
        if inc.got != self.nonce or link in self.links:
            log.warning("refused a callback connection on the %s port: wrong nonce", link)
            self.loop.close_later(inc.sock)
            return
        self.loop.unregister(inc.sock.fileno())
        self.links[link] = inc.sock
        lsock = self.listeners.pop(link)
        self.loop.close_later(lsock)
        if len(self.links) == 2:
            self.done = True
            up, down = self.links.pop("up"), self.links.pop("down")
            self.cancel()
            self.on_done(down, up)

    def _fail(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        self.cancel()
        self.on_fail(reason)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.l0_dial is not None:
            self.l0_dial.cancel()
            self.l0_dial = None
        for sock in [self.l0, *self.listeners.values(), *(i.sock for _, i in self.incoming),
                     *self.links.values()]:
            if sock is not None:
                self.loop.close_later(sock)
        self.l0 = None
        self.listeners = {}
        self.incoming = []
        self.links = {}
