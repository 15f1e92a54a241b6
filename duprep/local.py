"""A client for processes on a client host: the gateway link is the client daemon's.

``duprep.local.Client`` has the methods of :class:`duprep.Client` --
``request``, ``send``, ``relay``, ``receive``, ``close`` -- with the same
errors and the same late/deferred semantics, so a business program moves
between a direct connection and the host's shared one with one line::

    from duprep import Client                   # its own TCP connection
    from duprep.local import Client             # the client daemon's link
    c = Client(instance="default")              # instead of Client(host, port)

How it works (the seed's ``c_process``, without its pitfalls): the client
reads the daemon's info file, creates its own reply queue
``/duprep-ch.<i>.p<pid>.<start>.<n>`` (the seed's qid2 with mtype = cpid),
and attaches over the shared uplink queue (qid1).  A reader thread blocks in
poll(2) on the reply queue and on a pidfd of the daemon, and hands each
answer to the thread that asked, by msgid.  Nothing polls on a timer.

Differences from a direct client, all consequences of sharing a link:

* When the link is down (the gateway stopped, the network broke) requests
  fail at once with BrokenResourceError saying so; the daemon reconnects by
  itself and the *same* Client works again afterwards -- no restart.
* If the daemon itself exits, waiting requests fail with
  BrokenResourceError; the next call attaches again (to a restarted
  daemon) or raises BrokenResourceError if none runs.
* ``send()`` returns once the message is on the uplink queue; if the daemon
  cannot forward it (link down, or lost before it was written to the
  socket), ``receive()`` returns an "error" Message with
  ``code == LINK_LOST`` for its msgid.
* Pushes addressed to this process's pid (a worker's
  ``push(name, data, cpid=request.cpid)``) reach it; pushes and relays
  addressed to the host as a whole reach the clients made with
  ``pushes=True``.

Owns: its reply queue (created here; unlinked by :meth:`Client.close`, at
interpreter exit, or by the daemon when this process dies), a pidfd of the
daemon, a handle on the uplink queue, one reader thread, one socketpair.
A Client belongs to the process that made it: after ``fork()`` make a new
one in the child.
"""

from __future__ import annotations

import itertools
import os
import queue
import select
import socket
import threading
import time
import weakref
from typing import Any

import msgspec
import posix_ipc

from . import ipcnames, queues
from .client import Message, _remember, check_target, timeout_ms
from .inbox import DEFAULT_MAX_BYTES, Inbox
from .clienthost import procid
from .clienthost.instance import DaemonInfo, read_info
from .clienthost.protocol import (
    LINK_LOST,
    LOCAL_VERSION,
    Attach,
    Attached,
    Broken,
    Detach,
    LCall,
    LRelay,
    LSend,
    Reassembler,
    Refused,
    down_decoder,
    encode,
)
from .errors import (
    BrokenResourceError,
    ClosedResourceError,
    Deferred,
    LimitError,
    RemoteError,
    Timeout,
    UnknownTarget,
    WouldBlock,
)
from .frame import Defer, Error, ErrorCode, Push, Reply

__all__ = ["Client", "Message", "LINK_LOST"]

# Numbers the reply queues of this process.  Never reused while the process
# lives, so a name this process unlinks can only ever be its own (a second
# Client created meanwhile gets the next number, not the freed one).
_queue_numbers = itertools.count(1)


def _deadline(timeout: float | None) -> float | None:
    """The monotonic time ``timeout`` seconds from now; None for no deadline."""
    return None if timeout is None else time.monotonic() + timeout


def _unlink_own(name: str, owner: int) -> None:
    """Exit-time cleanup of a Client never closed; a forked child must not remove its parent's queue."""
    if os.getpid() == owner:
        queues.unlink(name)


class _Failed:
    """Stands in for an answer that will not come (link lost, daemon gone, closed)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Waiter:
    __slots__ = ("event", "frame", "session")

    def __init__(self, session: "_Session") -> None:
        self.event = threading.Event()
        self.frame: object = None
        self.session = session


class _Session:
    """One attachment to one daemon: its queues, its pidfd, its reader thread."""

    def __init__(self, info: DaemonInfo, pidfd: int, name: str, reply: queues.Queue) -> None:
        self.info = info
        self.pidfd = pidfd
        self.name = name
        self.reply = reply
        self.pieces = Reassembler()
        self.uplink: queues.Queue | None = None
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.attached = threading.Event()
        self.welcome: Attached | None = None
        self.refused = ""
        self.ep = 0
        self.broken: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.finalizer: Any = None
        self.ending = False                    # _end_session has begun: calls waiting for room give up
        self.waiting = 0                       # threads waiting in _put on the uplink and pidfd ...
        self.left = threading.Condition()      # ... which _end_session lets leave before closing them


_CLOSED = object()
DETACH_TIMEOUT = 1.0      # seconds close() waits for room on the uplink to say goodbye


class Client:
    """A local process's handle on the client daemon of ``instance``.

    Args:
        instance: the client daemon's instance name.
        timeout: default seconds for ``request()`` and ``relay()``, and for
            ``send()`` to find room on the uplink; None: no deadline (wait
            for ever; the request tells the worker "no deadline").
        pushes: also take pushes and relays addressed to the host as a
            whole (not to this pid).
        attach_timeout: seconds to wait for the daemon to accept us.
        max_inbox: bytes of pushes and relays held for ``receive()``, as
            for :class:`duprep.Client` (``pushes_dropped`` counts the rest).

    Raises BrokenResourceError if no client daemon runs for ``instance``,
    LimitError if the reply queue does not fit the kernel's limits,
    Timeout if the daemon does not answer the attach in time.
    """

    def __init__(self, instance: str = "default", *, timeout: float | None = 20.0, pushes: bool = False,
                 attach_timeout: float = 5.0, max_inbox: int = DEFAULT_MAX_BYTES) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None (no deadline), not {timeout!r}")
        self.instance = ipcnames.check_instance(instance)
        self.timeout = timeout
        self.pushes = pushes
        self.attach_timeout = attach_timeout
        self._pid = os.getpid()
        self._start = procid.start_time(self._pid)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()            # waiting / late / deferred
        self._attach_lock = threading.Lock()     # one (re)attach at a time
        self._waiting: dict[int, _Waiter] = {}
        # msgids whose answer may still come later; bounded as duprep.Client's, oldest forgotten first
        self._late: dict[int, None] = {}
        self._deferred: dict[int, None] = {}
        self._inbox = Inbox(max_inbox)
        self._closed = False
        self._decoder = down_decoder()
        self._session: _Session | None = None
        self._attaching: _Session | None = None   # a session being attached (close() wakes its wait)
        self._session = self._attach()

    # --- what the daemon told us --------------------------------------------------------

    @property
    def name(self) -> str:
        """The host's client name at the gateway (the daemon's ``--name``)."""
        return self._session.info.name if self._session else ""

    @property
    def max_frame(self) -> int:
        """Largest request body the link accepted when we attached (0: link was down)."""
        w = self._session.welcome if self._session else None
        return w.max_frame if w else 0

    @property
    def sid(self) -> int:
        """The link's sid when we attached (it changes when the daemon reconnects)."""
        w = self._session.welcome if self._session else None
        return w.sid if w else 0

    @property
    def generation(self) -> int:
        w = self._session.welcome if self._session else None
        return w.generation if w else 0

    # --- public API (the same as duprep.Client) ---------------------------------------------

    def request(self, data: bytes, *, timeout: float | None = None) -> bytes:
        """Send ``data`` to a business worker and return its reply.

        Raises Timeout (the reply, if it comes, goes to ``receive()`` as
        "late"), Deferred (the answer will come through ``receive()`` as
        "deferred"), RemoteError (the worker failed, or the frame is too
        large), BrokenResourceError (link down or lost, or the daemon
        exited), ClosedResourceError (closed).  ``timeout`` None: the
        Client's (which may itself be None: no deadline).
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = _deadline(timeout)
        s = self._ready()
        msgid, waiter = self._register(s)
        self._put(s, LCall(s.ep, self._pid, msgid, timeout_ms(timeout), data),
                  msgid, deadline)
        return self._wait(msgid, waiter, timeout, deadline)

    def send(self, data: bytes) -> None:
        """One-way message to the business workers; nothing comes back.

        Returns once it is on the uplink queue.  If the daemon cannot forward
        it, ``receive()`` returns an "error" Message (``code == LINK_LOST``).
        """
        s = self._ready()
        msgid = next(self._ids)
        self._put(s, LSend(s.ep, self._pid, msgid, data), 0, _deadline(self.timeout))

    def relay(self, target: str, data: bytes, *, timeout: float | None = None) -> None:
        """Deliver ``data`` to the gateway client named ``target``.

        Returns once the gateway has queued it; raises UnknownTarget if no
        client of that name is connected.
        """
        check_target(target)
        timeout = self.timeout if timeout is None else timeout
        deadline = _deadline(timeout)
        s = self._ready()
        msgid, waiter = self._register(s)
        self._put(s, LRelay(s.ep, self._pid, msgid, target, data), msgid, deadline)
        self._wait(msgid, waiter, timeout, deadline)

    @property
    def pushes_dropped(self) -> int:
        """Pushes and relays dropped because ``receive()`` fell ``max_inbox`` bytes behind."""
        return self._inbox.dropped

    def receive(self, *, timeout: float | None = None) -> Message:
        """The next push, relay, late or deferred reply; raises Timeout if none comes in time.

        What has arrived is handed out first, also after the daemon has
        exited (with the LINK_LOST errors for answers that cannot come any
        more); then BrokenResourceError is raised once, and the next call
        attaches again (or raises BrokenResourceError if no daemon runs).
        ClosedResourceError after :meth:`close`.
        """
        self._check_usable()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            s = self._session
            if s is None or s.broken is not None:
                # The daemon is gone: hand out what it sent before (the reader has put all of
                # it in the inbox once it ends), and only then attach again or say why not.
                if s is not None and s.thread is not None and s.thread is not threading.current_thread():
                    s.thread.join(timeout=5)
                try:
                    item = self._inbox.get(0)
                except queue.Empty:
                    self._ready()
                    continue
            else:
                try:
                    item = self._inbox.get(left)
                except queue.Empty:
                    raise Timeout(f"nothing received within {timeout:g} s") from None
            if item is _CLOSED:
                self._inbox.put(_CLOSED)
                raise ClosedResourceError("this Client is closed")
            if isinstance(item, _Session):           # that session's daemon went away
                if item is self._session:
                    raise BrokenResourceError(str(item.broken))
                continue                              # an older session: already reattached
            return item  # type: ignore[return-value]

    def close(self) -> None:
        """Detach and remove our reply queue; waiting requests raise ClosedResourceError.

        Also ends an attach another thread has under way (its call raises
        ClosedResourceError): once this returns, nothing of the Client is left.
        """
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        attaching = self._attaching
        if attaching is not None:
            attaching.attached.set()           # do not keep that thread waiting for the daemon
        with self._attach_lock:                # an attach under way has finished and seen _closed
            s, self._session = self._session, None
        if s is not None:
            self._end_session(s, detach=True)
        self._inbox.put(_CLOSED)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- attaching ----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedResourceError("this Client is closed")
        if os.getpid() != self._pid:
            raise ClosedResourceError(f"this Client belongs to process {self._pid}; make a new one after fork()")

    def _ready(self) -> _Session:
        """The current session, attaching again if the daemon went away."""
        self._check_usable()
        s = self._session
        if s is not None and s.broken is None:
            return s
        with self._attach_lock:
            self._check_usable()               # close() ran while we waited for the lock
            s = self._session
            if s is not None and s.broken is None:
                return s
            if s is not None:
                self._end_session(s, detach=False)
                self._session = None
            self._session = self._attach()
            return self._session

    def _attach(self) -> _Session:
        info = read_info(self.instance)
        if info.version != LOCAL_VERSION:
            raise BrokenResourceError(f"the client daemon speaks local protocol {info.version}, "
                                      f"this library {LOCAL_VERSION}")
        try:
            pidfd = procid.watch(info.pid, info.start)
        except procid.ProcessGone:
            raise BrokenResourceError(
                f"the client daemon of instance {self.instance!r} (pid {info.pid}) is not running; "
                f"start it with 'duprep client-daemon --instance {self.instance} --server HOST:PORT'") from None
        try:
            for _ in range(1000):
                n = next(_queue_numbers)
                name = ipcnames.clienthost_reply_queue(self.instance, self._pid, self._start, n)
                try:
                    mq = queues.create(name, queues.QueuePlan(depth=info.reply_depth, msgsize=info.reply_size))
                    break
                except posix_ipc.ExistentialError:
                    # Ours from before an exec() (same pid and start time, numbering restarted at 1):
                    # the daemon drops it when this process exits; take the next number.
                    continue
            else:
                raise BrokenResourceError(f"cannot create a reply queue for process {self._pid}: "
                                          f"1000 names in a row are taken")
        except LimitError as e:
            os.close(pidfd)
            raise LimitError(f"{e} (this is the reply queue of local process {self._pid}; the client "
                             f"daemon sets its size with --reply-depth/--reply-size)") from None
        except BaseException:
            os.close(pidfd)
            raise
        s = _Session(info, pidfd, name, queues.Queue(name, mq))
        s.finalizer = weakref.finalize(self, _unlink_own, name, self._pid)    # at exit if never closed
        self._attaching = s
        try:
            if self._closed:                   # close() came before it could see this session
                raise ClosedResourceError("this Client was closed while it attached to the client daemon")
            s.uplink = queues.Queue(info.uplink)
            s.thread = threading.Thread(target=self._read_loop, args=(s,), daemon=True,
                                        name=f"duprep-local-{self.instance}")
            s.thread.start()
            deadline = time.monotonic() + self.attach_timeout
            self._put(s, Attach(LOCAL_VERSION, self._pid, self._start, n, self.pushes), 0, deadline)
            if not s.attached.wait(max(0.0, deadline - time.monotonic())):
                raise Timeout(f"the client daemon of {self.instance!r} did not answer within "
                              f"{self.attach_timeout:g} s")
            if self._closed:                   # close() in another thread meanwhile: leave nothing
                raise ClosedResourceError("this Client was closed while it attached to the client daemon")
            if s.refused:
                raise BrokenResourceError(f"the client daemon refused to attach us: {s.refused}")
            if s.broken is not None and s.welcome is None:
                raise BrokenResourceError(str(s.broken))
        except BaseException:
            self._end_session(s, detach=True)      # if the daemon attached us after all, it is told
            raise
        finally:
            self._attaching = None
        return s

    def _end_session(self, s: _Session, *, detach: bool) -> None:
        """Stop the reader, remove our queue, tell the daemon (if asked), close everything."""
        queues.unlink(s.name)          # first: never a moment with a name but no endpoint
        with s.left:
            s.ending = True
        try:
            s.wake_w.send(b"x")        # (wakes the reader, and calls waiting in _put)
        except OSError:
            pass
        if s.thread is not None and s.thread is not threading.current_thread():
            s.thread.join(timeout=5)
        if s.broken is None and not s.ep and s.thread is not None and not s.thread.is_alive():
            self._drain(s)             # an Attached that came as we gave up waiting: detach it too
        if detach and s.ep and s.broken is None and s.uplink is not None:
            try:
                self._put(s, Detach(s.ep, self._pid), 0, time.monotonic() + DETACH_TIMEOUT, closing=True)
            except (Timeout, BrokenResourceError, OSError, posix_ipc.Error):
                pass                   # the daemon learns it from our pidfd instead
        if s.broken is None:
            s.broken = ClosedResourceError("this Client is closed")
        self._fail_waiters(s, s.broken)
        with s.left:                   # the descriptors below are closed only once nobody polls them
            s.left.wait_for(lambda: s.waiting == 0, timeout=5)
        for q in (s.reply, s.uplink):
            if q is not None:
                q.close()
        os.close(s.pidfd)
        s.wake_r.close()
        s.wake_w.close()
        if s.finalizer is not None:
            s.finalizer.detach()

    # --- requests ------------------------------------------------------------------------------

    def _register(self, s: _Session) -> tuple[int, _Waiter]:
        waiter = _Waiter(s)
        with self._lock:
            if s.broken is not None:       # the reader failed the waiters already: this one would wait in vain
                raise type(s.broken)(str(s.broken))
            msgid = next(self._ids)
            self._waiting[msgid] = waiter
        return msgid, waiter

    def _unregister(self, msgid: int) -> None:
        with self._lock:
            self._waiting.pop(msgid, None)

    def _put(self, s: _Session, message: msgspec.Struct, msgid: int, deadline: float | None, *,
             closing: bool = False) -> None:
        """Put ``message`` on the uplink, waiting for room (and watching the daemon) until ``deadline``;
        a wait ends with ClosedResourceError when the session ends (``closing``: the Detach that ends it)."""
        data = encode(message)
        assert s.uplink is not None
        if len(data) > s.uplink.msgsize:
            self._unregister(msgid)
            raise RemoteError(f"FRAME_TOO_LARGE: a message of {len(data)} bytes exceeds the uplink queue's "
                              f"message size {s.uplink.msgsize} (client daemon --uplink-size)",
                              code=ErrorCode.FRAME_TOO_LARGE, msgid=msgid)
        try:
            s.uplink.put_nowait(data)
            return
        except WouldBlock:
            pass
        with s.left:
            if s.ending and not closing:
                self._unregister(msgid)
                raise ClosedResourceError("this Client is closed")
            s.waiting += 1
        try:
            self._wait_room(s, data, msgid, deadline, closing)
        finally:
            with s.left:
                s.waiting -= 1
                s.left.notify_all()

    def _wait_room(self, s: _Session, data: bytes, msgid: int, deadline: float | None, closing: bool) -> None:
        assert s.uplink is not None
        poller = select.poll()
        poller.register(s.uplink.fileno(), select.POLLOUT)
        poller.register(s.pidfd, select.POLLIN)
        poller.register(s.wake_r.fileno(), select.POLLIN)       # written once, when the session ends
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._unregister(msgid)
                raise Timeout(f"the uplink queue {s.uplink.name} stayed full: is the client daemon stuck?",
                              msgid=msgid)
            ready = dict(poller.poll(None if left is None else max(1, int(left * 1000))))
            if s.ending and not closing:
                self._unregister(msgid)
                raise ClosedResourceError("this Client was closed while it waited for room on the uplink")
            if s.pidfd in ready:
                self._unregister(msgid)
                raise BrokenResourceError(f"the client daemon of instance {self.instance!r} exited")
            try:
                s.uplink.put_nowait(data)
                return
            except WouldBlock:
                pass

    def _wait(self, msgid: int, waiter: _Waiter, timeout: float | None, deadline: float | None) -> bytes:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not waiter.event.wait(left):
            with self._lock:
                if self._waiting.pop(msgid, None) is not None:
                    _remember(self._late, msgid)
                    raise Timeout(f"no reply to msgid {msgid} within {timeout:g} s", msgid=msgid)
            waiter.event.wait()       # the reader filled it in while we were timing out
        frame = waiter.frame
        kind = type(frame)
        if kind is Reply:
            return frame.data  # type: ignore[attr-defined, no-any-return]
        if kind is Defer:
            raise Deferred(f"msgid {msgid} deferred: the answer will come through receive()", msgid=msgid)
        if kind is Error:
            text = f"{ErrorCode.names.get(frame.code, frame.code)}: {frame.message}"  # type: ignore[attr-defined]
            if frame.code == ErrorCode.UNKNOWN_TARGET:  # type: ignore[attr-defined]
                raise UnknownTarget(text, code=frame.code, msgid=msgid)  # type: ignore[attr-defined]
            raise RemoteError(text, code=frame.code, msgid=msgid)  # type: ignore[attr-defined]
        assert isinstance(frame, _Failed)
        raise frame.error

    def _fail_waiters(self, s: _Session, error: BaseException) -> None:
        with self._lock:
            mine = {m: w for m, w in self._waiting.items() if w.session is s}
            for m in mine:
                del self._waiting[m]
        for w in mine.values():
            w.frame = _Failed(error)
            w.event.set()

    # --- the reader thread ----------------------------------------------------------------------

    def _read_loop(self, s: _Session) -> None:
        poller = select.poll()
        reply_fd, wake_fd = s.reply.fileno(), s.wake_r.fileno()
        for fd in (reply_fd, s.pidfd, wake_fd):
            poller.register(fd, select.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if wake_fd in ready:
                    return                     # close(): _end_session does the rest
                self._drain(s)
                if s.pidfd in ready:
                    self._drain(s)             # what the daemon said before it went
                    s.broken = BrokenResourceError(
                        f"the client daemon of instance {self.instance!r} (pid {s.info.pid}) exited")
                    self._lose_outstanding(str(s.broken))
                    break
        except BaseException as e:             # noqa: BLE001 - record every end of the reader
            s.broken = BrokenResourceError(f"the local client's reader failed: {e!r}")
        s.attached.set()
        self._fail_waiters(s, s.broken)
        self._inbox.put(s)                     # wakes a blocked receive()

    def _lose_outstanding(self, reason: str) -> None:
        """The daemon is gone: late and deferred answers will never come; say so through receive()."""
        with self._lock:
            lost = sorted({**self._late, **self._deferred})
            self._late.clear()
            self._deferred.clear()
        for msgid in lost:
            self._inbox.put(Message("error", msgid, reason.encode(), "", self._pid, LINK_LOST))

    def _drain(self, s: _Session) -> None:
        decode, feed = self._decoder.decode, s.pieces.feed
        while True:
            try:
                data = feed(s.reply.get_nowait())
            except WouldBlock:
                return
            if data is None:
                continue                       # a piece of a larger message
            try:
                msg = decode(data)
            except (msgspec.DecodeError, ValueError, RecursionError):
                continue                       # not from our daemon: ignore
            self._dispatch(s, msg)

    def _dispatch(self, s: _Session, msg: object) -> None:
        kind = type(msg)
        if kind is Push:
            self._inbox.offer(Message("relay" if msg.source else "push", 0, msg.data,  # type: ignore[attr-defined]
                                      msg.source, msg.cpid))  # type: ignore[attr-defined]
            return
        if kind is Attached:
            s.welcome = msg  # type: ignore[assignment]
            s.ep = msg.ep  # type: ignore[attr-defined]
            s.attached.set()
            return
        if kind is Refused:
            s.refused = msg.message  # type: ignore[attr-defined]
            s.attached.set()
            return
        if kind is Broken:
            for msgid in msg.msgids:  # type: ignore[attr-defined]
                self._answer(msgid, _Failed(BrokenResourceError(msg.reason)), msg.reason)  # type: ignore[attr-defined]
            return
        self._answer(msg.msgid, msg, "")  # type: ignore[attr-defined]

    def _answer(self, msgid: int, frame: object, reason: str) -> None:
        """Hand ``frame`` to the thread waiting for ``msgid``, or to receive() if none is."""
        kind = type(frame)
        with self._lock:
            waiter = self._waiting.pop(msgid, None)
            late = deferred = False
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
        if kind is Defer:
            return                                       # a late DEFERRED: the final answer follows
        if kind is _Failed:                              # a late/deferred request or a send, lost with the link
            self._inbox.put(Message("error", msgid, reason.encode(), "", self._pid, LINK_LOST))
        elif kind is Error:
            self._inbox.put(Message("error", msgid, frame.message.encode(), "", frame.cpid,  # type: ignore[attr-defined]
                                    frame.code))  # type: ignore[attr-defined]
        elif kind is Reply:      # also one nobody waits for (forgotten, or after WORKER_LOST): "late"
            self._inbox.put(Message("deferred" if deferred else "late", msgid, frame.data, "",  # type: ignore[attr-defined]
                                    frame.cpid))  # type: ignore[attr-defined]
