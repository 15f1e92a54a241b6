"""A blocking, thread-safe client for the gateway (what the seed's c_process did by hand).

One TCP connection; any number of threads may have requests in flight on it
at once.  A reader thread takes frames off the socket and hands each REPLY to
the thread waiting for its msgid, in whatever order they come.

The seed's "overtime" and its msgid check, without its loss: a request that
times out raises :class:`~duprep.errors.Timeout`; if its reply turns up later
it is not thrown away and not mistaken for the answer to a newer request --
:meth:`Client.receive` returns it with ``kind == "late"``.  Pushes, relayed
messages and the final answers of deferred requests come through
:meth:`Client.receive` too.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import select
import socket
import threading
import time
from typing import Literal

import msgspec

from .errors import (BrokenResourceError, ClosedResourceError, Deferred, ProtocolError, RefusedError,
                     RemoteError, Timeout, UnknownTarget)
from .inbox import DEFAULT_MAX_BYTES, Inbox
from .frame import (MAX_NAME, PROTOCOL_VERSION, Call, Defer, Error, ErrorCode, Hello, Push, Relay, Reply, Send,
                    Welcome, encode_wire, server_decoder)
from .wire import FrameReader, keepalive

__all__ = ["Client", "Message"]

MAX_TIMEOUT_MS = 2**32 - 1      # a REQUEST's timeout_ms is a U32: about 49.7 days


def timeout_ms(timeout: float | None) -> int:
    """A REQUEST's ``timeout_ms`` for a timeout in seconds: 0 for none, else 1 .. MAX_TIMEOUT_MS."""
    return min(MAX_TIMEOUT_MS, max(1, int(timeout * 1000))) if timeout else 0


def check_target(target: str) -> None:
    """Refuse a RELAY target the gateway would take as a protocol violation (and end the connection)."""
    if len(target) > MAX_NAME:
        raise ProtocolError(f"a relay target is a client name of at most {MAX_NAME} characters, "
                            f"not {len(target)}: nothing was sent")

Kind = Literal["push", "relay", "late", "deferred", "error"]


class Message(msgspec.Struct, frozen=True):
    """Something that arrived without a request waiting for it.

    ``kind``: "push" (from a business worker), "relay" (from another client,
    named in ``source``), "late" (the reply to a request that timed out),
    "deferred" (the final reply to a deferred request), "error" (an ERROR
    for a late or deferred request; ``data`` holds the message text).
    """
    kind: Kind
    msgid: int
    data: bytes
    source: str = ""
    cpid: int = 0
    code: int = 0


class _Waiter:
    __slots__ = ("event", "frame")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.frame: object = None


_CLOSED = object()
REMEMBER = 100_000      # late or deferred msgids a Client keeps track of


def _remember(ids: dict[int, None], msgid: int) -> None:
    ids[msgid] = None
    if len(ids) > REMEMBER:
        del ids[next(iter(ids))]


class Client:
    """A connection to a duprep gateway.

    Args:
        host, port: the gateway's address.
        name: a name other clients can relay to and workers can push to
            (unique among connected clients; None: anonymous).
        timeout: default seconds for connect, handshake, ``request()``,
            ``relay()`` and ``send()`` (None: no deadline).
        max_inbox: bytes of pushes and relays held for ``receive()``; beyond
            it they are dropped and counted in ``pushes_dropped`` (answers to
            this client's own requests are always kept).

    The connection has TCP keepalive (``wire.keepalive``): a gateway that
    vanished without closing is reported as BrokenResourceError about 25 s
    after it last answered, also to a thread waiting in ``receive()``.

    Raises RefusedError if the gateway refuses (full, name taken, ...),
    OSError if it cannot be reached.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 2000, *, name: str | None = None,
                 timeout: float | None = 20.0, max_inbox: int = DEFAULT_MAX_BYTES) -> None:
        self.timeout = timeout
        self._cpid = os.getpid()
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiter] = {}
        # msgids whose answer may still come later; bounded, oldest forgotten first
        self._late: dict[int, None] = {}
        self._deferred: dict[int, None] = {}
        self._inbox = Inbox(max_inbox)
        self._broken: BaseException | None = None
        self._closed = False
        self._decoder = server_decoder()
        self._sock = socket.create_connection((host, port), timeout=timeout)
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(self._sock)
            self._sock.sendall(encode_wire(Hello(PROTOCOL_VERSION, name or "")))
            self._reader = FrameReader(1 << 24)
            welcome = self._read_one(timeout)
            if isinstance(welcome, Error):
                raise RefusedError(f"gateway refused the connection: {welcome.message}", code=welcome.code)
            if not isinstance(welcome, Welcome):
                raise ProtocolError(f"expected WELCOME, got {type(welcome).__name__}")
        except BaseException:
            self._sock.close()
            raise
        self.sid: int = welcome.sid
        self.generation: int = welcome.generation
        self.name: str = welcome.name
        self.max_frame: int = welcome.max_frame
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read_loop, name=f"duprep-client-{self.sid}", daemon=True)
        self._thread.start()

    # --- handshake ---------------------------------------------------------------

    def _read_one(self, timeout: float | None) -> object:
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: list[object] = []
        while not pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"no WELCOME within {timeout:g} s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                raise Timeout(f"no WELCOME within {timeout:g} s") from None
            if not data:
                raise BrokenResourceError("gateway closed the connection during the handshake")
            pending = [self._decoder.decode(b) for b in self._reader.feed(data)]
        first, rest = pending[0], pending[1:]
        for frame in rest:
            self._dispatch(frame)
        return first

    # --- public API ---------------------------------------------------------------

    def request(self, data: bytes, *, timeout: float | None = None) -> bytes:
        """Send ``data`` to a business worker and return its reply.

        ``timeout`` (default: the Client's) counts from the call, writing
        included.  Raises Timeout (the reply, if it comes, goes to
        ``receive()`` as "late"), Deferred (the worker will answer later,
        through ``receive()`` as "deferred"), RemoteError (the worker's
        handler failed), BrokenResourceError (connection lost).
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        msgid, waiter = self._register()
        self._write_for(msgid, Call(msgid, self._cpid, timeout_ms(timeout), data), timeout)
        return self._wait(msgid, waiter, timeout, deadline)

    def send(self, data: bytes, *, timeout: float | None = None) -> None:
        """One-way message to the business workers; nothing comes back.

        Returns once the frame is written; raises Timeout if the gateway did
        not take it within ``timeout`` seconds (default: the Client's).
        """
        timeout = self.timeout if timeout is None else timeout
        self._write(Send(next(self._ids), self._cpid, data), timeout)

    def relay(self, target: str, data: bytes, *, timeout: float | None = None) -> None:
        """Deliver ``data`` to the client named ``target`` through the gateway.

        Returns once the gateway has queued it for the target; raises
        UnknownTarget if no client of that name is connected.
        """
        check_target(target)
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        msgid, waiter = self._register()
        self._write_for(msgid, Relay(msgid, self._cpid, target, data), timeout)
        self._wait(msgid, waiter, timeout, deadline)

    @property
    def pushes_dropped(self) -> int:
        """Pushes and relays dropped because ``receive()`` fell ``max_inbox`` bytes behind."""
        return self._inbox.dropped

    def receive(self, *, timeout: float | None = None) -> Message:
        """The next push, relay, late or deferred reply; raises Timeout if none comes in time."""
        try:
            item = self._inbox.get(timeout)
        except queue.Empty:
            self._check()
            raise Timeout(f"nothing received within {timeout:g} s") from None
        if item is _CLOSED:
            self._inbox.put(_CLOSED)
            self._check()
            raise BrokenResourceError("connection closed")
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Close the connection; waiting requests raise ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError("this Client is closed")
        if self._broken is not None:
            raise self._broken_error()

    def _broken_error(self) -> BrokenResourceError:
        """Why the connection is gone: the gateway's own ERROR (RefusedError, with its code) if it sent one."""
        b = self._broken
        if isinstance(b, RefusedError):
            return RefusedError(str(b), code=b.code)
        return BrokenResourceError(f"connection lost: {b}")

    def _register(self) -> tuple[int, _Waiter]:
        self._check()
        waiter = _Waiter()
        with self._lock:
            msgid = next(self._ids)
            self._waiting[msgid] = waiter
        return msgid, waiter

    def _write_for(self, msgid: int, frame: msgspec.Struct, timeout: float | None) -> None:
        """:meth:`_write` the frame of a registered request; if it is not written, nobody waits for msgid."""
        try:
            self._write(frame, timeout)
        except BaseException:
            with self._lock:
                self._waiting.pop(msgid, None)
            raise

    def _write(self, frame: msgspec.Struct, timeout: float | None) -> None:
        """Write one frame within ``timeout`` seconds (None: however long it takes).

        One thread writes at a time.  A gateway that does not read fills the
        kernel's buffer; at the deadline a frame not yet begun raises Timeout
        and the connection stays usable, while a frame cut in the middle
        also ends the connection: the gateway could never find where the
        next frame starts.
        """
        self._check()
        data = encode_wire(frame)
        if len(data) - 4 > self.max_frame:
            raise ProtocolError(f"a frame of {len(data) - 4} bytes exceeds this gateway's max_frame "
                                f"{self.max_frame} (its queue message size limits it)")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._send_lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise Timeout(f"could not write within {timeout:g} s: the gateway is not taking what other "
                          "threads of this client send")
        try:
            sent = self._send(memoryview(data), deadline)
            if 0 < sent < len(data):       # (before another thread may write after the cut frame)
                self._cut(f"a frame was cut short: the gateway did not read it within {timeout:g} s")
        finally:
            self._send_lock.release()
        if sent < len(data):
            raise Timeout(f"could not write within {timeout:g} s: the gateway is not reading"
                          + ("; the connection is closed, as the frame was cut short" if sent else ""))

    def _send(self, view: memoryview, deadline: float | None) -> int:
        """Bytes of ``view`` written by ``deadline``: all of them, or fewer once it passed; never blocks
        past it.  An error or an exception (a signal handler's) in the middle of the frame ends the
        connection."""
        sent = 0
        try:
            while sent < len(view):
                try:
                    sent += self._sock.send(view[sent:], socket.MSG_DONTWAIT)
                    continue
                except BlockingIOError:
                    pass
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return sent
                fd = self._sock.fileno()
                if fd < 0:
                    raise ClosedResourceError("this Client was closed while writing")
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll(None if left is None else max(1, math.ceil(left * 1000)))
        except OSError as e:
            if 0 < sent < len(view):
                self._cut(f"connection lost in the middle of a frame: {e}")
            if self._closed:
                raise ClosedResourceError("this Client was closed while writing") from None
            raise BrokenResourceError(f"connection lost: {e}") from None
        except BaseException:
            if 0 < sent < len(view):
                self._cut("a frame was cut short by an exception in the writing thread")
            raise
        return sent

    def _cut(self, why: str) -> None:
        """End the connection: its byte stream no longer starts a frame where the gateway expects one."""
        if self._broken is None:
            self._broken = BrokenResourceError(why)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _wait(self, msgid: int, waiter: _Waiter, timeout: float | None, deadline: float | None) -> bytes:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not waiter.event.wait(left):
            with self._lock:
                if self._waiting.pop(msgid, None) is not None:
                    _remember(self._late, msgid)
                    raise Timeout(f"no reply to msgid {msgid} within {timeout:g} s", msgid=msgid)
            waiter.event.wait()   # the reader filled it in while we were timing out
        frame = waiter.frame
        if isinstance(frame, Reply):
            return frame.data
        if isinstance(frame, Defer):
            raise Deferred(f"msgid {msgid} deferred: the answer will come through receive()", msgid=msgid)
        if isinstance(frame, Error):
            text = f"{ErrorCode.names.get(frame.code, frame.code)}: {frame.message}"
            if frame.code == ErrorCode.UNKNOWN_TARGET:
                raise UnknownTarget(text, code=frame.code, msgid=msgid)
            raise RemoteError(text, code=frame.code, msgid=msgid)
        if self._closed:
            raise ClosedResourceError("this Client was closed while waiting")
        raise self._broken_error()

    def _read_loop(self) -> None:
        sock, reader, decode = self._sock, self._reader, self._decoder.decode
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    raise BrokenResourceError("gateway closed the connection")
                for body in reader.feed(data):
                    self._dispatch(decode(body))
        except BaseException as e:     # noqa: BLE001 - the reader thread must record every end
            if self._broken is None:   # an ERROR with msgid 0 before the EOF says why: keep it
                self._broken = e
        finally:
            with self._lock:
                waiting, self._waiting = self._waiting, {}
            for waiter in waiting.values():
                waiter.event.set()
            self._inbox.put(_CLOSED)

    def _dispatch(self, frame: object) -> None:
        kind = type(frame)
        if kind is Push:
            self._inbox.offer(Message("relay" if frame.source else "push", 0, frame.data,  # type: ignore[attr-defined]
                                      frame.source, frame.cpid))  # type: ignore[attr-defined]
            return
        msgid = getattr(frame, "msgid", 0)
        with self._lock:
            waiter = self._waiting.pop(msgid, None)
            if waiter is None:
                late = msgid in self._late
                deferred = msgid in self._deferred
                if kind is not Defer:
                    self._late.pop(msgid, None)
                    self._deferred.pop(msgid, None)
                elif late:
                    self._late.pop(msgid, None)
                    _remember(self._deferred, msgid)
            elif kind is Defer:
                _remember(self._deferred, msgid)
        if waiter is not None:
            waiter.frame = frame
            waiter.event.set()
            return
        if kind is Error and msgid == 0:
            self._broken = RefusedError(f"gateway ended the connection: {frame.message}",  # type: ignore[attr-defined]
                                        code=frame.code)  # type: ignore[attr-defined]
            return
        if kind is Defer:
            return                                         # a late DEFERRED: the final answer will follow
        tag: Kind = "deferred" if deferred else "late"
        if kind is Error:
            self._inbox.put(Message("error", msgid, frame.message.encode(), "", frame.cpid,  # type: ignore[attr-defined]
                                    frame.code))  # type: ignore[attr-defined]
        elif kind is Reply:
            self._inbox.put(Message(tag, msgid, frame.data, "", frame.cpid))  # type: ignore[attr-defined]
        elif not late and not deferred:
            pass
