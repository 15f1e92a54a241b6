"""The business side (seed ``s_process``): take client requests, answer them.

A :class:`Worker` attaches to a running gateway instance and blocks on its
request queue (zero CPU while idle); :func:`serve` runs a plain function in
one or more worker processes::

    from duprep import bus

    def handle(request: bus.Request) -> bytes | None:
        return request.data.upper()          # the reply; None: "I answer later"

    bus.serve(handle, instance="default", workers=4)

A :class:`Request` is a msgspec Struct.  Keep it, encode it
(``msgspec.msgpack.encode``), hand it to another process and answer it there
with :meth:`Worker.reply`: ``(sid, generation)`` makes sure the answer
reaches the connection that asked, or nobody if it is gone (counted).

Replies are batched without waiting: while a worker still holds requests it
took in the same queue message, replies collect; they are sent the moment it
has none left or would block, so one queue message carries many replies.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from typing import Callable, cast

import msgspec

from . import hangs, ipcnames
from .errors import (BrokenResourceError, ClosedResourceError, ConfigError, DuprepError, ProtocolError, Timeout,
                     UnknownTarget, WouldBlock)
from .frame import (DELIVER_OVERHEAD, LENGTH, NOWHERE, PREFIXES, BadFrame, BatchPacker, Close, Defer, Deliver, Error,
                    ErrorCode, Push, Reply, Request, decode_chunks, prefix)
from .lock import InstanceLock, gateway_lock_held
from .queues import Queue
from .recovery import answer_for, take_over
from .status import acceptor_alive
from .table import COUNTERS, FIRST_WORKER_ROW, NCOUNTERS, GatewayState, ProcRow, Role, SlotInfo, SlotState, Table

__all__ = ["Request", "Worker", "Replier", "WorkerStatistics", "serve", "Handler", "DEFERRED"]

log = logging.getLogger("duprep")

class _Deferred:
    def __repr__(self) -> str:
        return "DEFERRED"


#: A handler returns this to send DEFERRED now and answer later (from anywhere) with reply().
DEFERRED: "bytes" = _Deferred()  # type: ignore[assignment]

Handler = Callable[[Request], "bytes | None"]
_encode = msgspec.msgpack.Encoder().encode
# REPLY's tag: run_handler encodes a reply as the tuple (REPLY_TAG, msgid, cpid, data), the same bytes as
# the Reply Struct (array_like, tag first; tests/test_units.py checks it) and 20 ns less than building one.
REPLY_TAG = cast(int, Reply.__struct_config__.tag)
_pack_length = LENGTH.pack
REPLY_BACKLOG = 256 * 1024   # reply bytes a Worker holds before it waits for room instead of taking requests
U32_MAX, U64_MAX = 2**32 - 1, 2**63 - 1   # the wire's integer fields (frame.py: U32, U64)
HEARTBEAT = 30.0        # seconds between heartbeats of an idle worker, unless the gateway says (table header)
LOOK_EVERY = 0.05       # seconds between two looks whether the gateway is still there, while sending
C_REQUESTS, C_REPLIES, C_ERRORS, C_QMSGS, C_HELD = range(5)   # (and "lost": recovery.py writes it)
C_BAD = COUNTERS[Role.WORKER].index("bad_frames")


def _data(data: object, what: str) -> bytes:
    """``data`` as the bytes a frame carries; TypeError for anything else, before it reaches the wire
    (a str there would be a valid msgpack str, and the client would drop the connection over it)."""
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{what} is bytes (or bytearray, memoryview), not {type(data).__name__}")


def _int(value: object, what: str, high: int) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise ValueError(f"{what} is an int from 0 to {high}, not {value!r}")
    return value


class WorkerStatistics(msgspec.Struct, frozen=True):
    """What one worker has done since it attached."""
    requests: int       #: requests fully handled (the next one was asked for)
    replies: int        #: REPLY, DEFERRED, ERROR and PUSH frames sent
    handler_errors: int  #: requests answered with APP_ERROR
    queue_messages: int  #: request-queue messages taken (each a batch)
    held: int           #: requests taken from the queue but not yet returned by receive()
    bad_frames: int = 0  #: malformed REQUEST/SEND frames answered with BAD_FRAME (the connection ended)


class Replier:
    """A handle that can answer, defer, fail and push, but takes no requests.

    For the process that finishes deferred work (the seed's "process the
    request when conditions are ripe"): it gets a :class:`Request` from a
    worker (e.g. msgpack-encoded through a file, pipe or database) and calls
    :meth:`reply`.  :class:`Worker` is a Replier that also receives.

    A Replier belongs to the run of the gateway it attached to, and holds
    none of the instance's locks between calls, so it never delays a new
    gateway's start.  Once that gateway has stopped (or was killed, or
    replaced by a new one), every call raises BrokenResourceError: its
    clients are gone with it; make a new Replier for the next run.

    Raises :class:`~duprep.errors.BrokenResourceError` if the instance has
    no running gateway.
    """

    _LAZY = False      # Worker: a reply that finds the queue full waits for the next receive()
    _KEEPS_ATTACH_LOCK = False   # Worker: it holds a row, and is a process of the run until it closes
    _heartbeat = HEARTBEAT

    def __init__(self, instance: str = "default", *, wait: float = 0.0) -> None:
        self.instance = ipcnames.check_instance(instance)
        deadline = time.monotonic() + wait
        while True:
            try:
                self._table = Table.attach(ipcnames.table_name(instance))
                break
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    raise BrokenResourceError(
                        f"no gateway is running for instance {instance!r} (start 'duprep serve --instance "
                        f"{instance}')") from None
                time.sleep(0.1)    # waiting for a gateway that is not there yet: nothing to block on
        self._lock = InstanceLock(instance)
        self._closed = False
        self._batch: deque[Request] = deque()
        self._c = [0] * NCOUNTERS
        self._pidfd = -1
        self._next_look = 0.0            # _check_gateway
        self._stopped = False
        try:
            self._lock.attach()          # (waits while a gateway still sets the instance up)
            # Map the table again: the one mapped above may be an earlier run's, if a gateway
            # (re)started while we waited for its boot.
            self._table.close()
            try:
                self._table = Table.attach(ipcnames.table_name(instance))
            except FileNotFoundError:
                raise BrokenResourceError(f"the gateway of instance {instance!r} stopped while this "
                                          f"{type(self).__name__} attached") from None
            self._table_ino = os.stat(os.path.join(ipcnames.SHM_DIR, ipcnames.table_name(instance))).st_ino
            self._pidfd = _acceptor_pidfd(self._table.get("acceptor_pid"))
            held = gateway_lock_held(instance)
            if held is False or (self._pidfd < 0 and not held):
                raise BrokenResourceError(f"the gateway of instance {instance!r} is gone (a crashed run's "
                                          f"table is left; the next 'duprep serve' removes it)")
            # Readable once the acceptor has exited.  No pidfd: the acceptor runs in another pid
            # namespace; then the table's inode and the gateway lock tell (_gone, the idle check).
            self._acceptor = select.poll()
            if self._pidfd >= 0:
                self._acceptor.register(self._pidfd, select.POLLIN)
            self._replies = Queue(ipcnames.reply_queue(instance))
            if not self._KEEPS_ATTACH_LOCK:
                self._lock.close()       # a Replier is not a process of the run: never delay the next one
        except BaseException:
            self._release()
            raise
        self._out = BatchPacker(self._replies.msgsize)
        self._pending: deque[bytes] = deque()     # packed reply messages the queue had no room for yet
        self._pending_bytes = 0
        self._room = self._replies.msgsize - 3 - DELIVER_OVERHEAD     # wire bytes one Deliver can carry
        self._open_sid, self._open_gen = -1, -1          # the connection the frames below are for
        self._open_frames: list[bytes] = []
        self._open_size = 0

    # --- answering -------------------------------------------------------------

    def reply(self, request: Request, data: bytes, /) -> None:
        """Answer ``request``; may be called later and from another process.

        A one-way request (a SEND: ``request.oneway``) is never answered (protocol.md 1.6): reply(),
        defer() and fail() do nothing for it, so code that treats both kinds alike stays correct.
        """
        if request.oneway:
            return
        if self._closed:
            self._check()
        if type(data) is not bytes:
            data = _data(data, "a reply")
        origin = request.origin
        self._add(origin.sid, origin.generation, _encode(Reply(request.msgid, request.cpid, data)), Reply)

    def defer(self, request: Request, /) -> None:
        """Tell the client now that the answer will come later (its request() raises Deferred)."""
        if request.oneway:
            return
        self._send(request.sid, request.generation, Defer(request.msgid, request.cpid))

    def fail(self, request: Request, message: str, /, *, code: int = ErrorCode.APP_ERROR) -> None:
        """Answer ``request`` with an ERROR frame (the client's request() raises RemoteError)."""
        if request.oneway:
            return
        if type(message) is not str:
            raise TypeError(f"an error message is a str, not {type(message).__name__}")
        _int(code, "an error code", U32_MAX)
        self._c[C_ERRORS] += 1
        self._send(request.sid, request.generation, Error(request.msgid, request.cpid, code, message[:1000]))

    def push(self, target: str | int, data: bytes, /, *, cpid: int = 0) -> tuple[int, int]:
        """Send an unsolicited message to a client named ``target`` (or with sid ``target``).

        Returns the ``(sid, generation)`` it was addressed to; raises
        UnknownTarget if no such client is connected (or it has not
        finished its handshake: WELCOME is always a connection's first frame).
        """
        self._check()
        self._check_gateway()
        data = _data(data, "a push")
        _int(cpid, "cpid", U64_MAX)
        if isinstance(target, str):
            found = self._table.find_name(target)
            if found is None:
                raise UnknownTarget(f"no client named {target!r} is connected", code=ErrorCode.UNKNOWN_TARGET)
            sid, gen = found
        else:
            info = self._table.slot(target) if 0 <= target < self._table.nslots else None
            if info is None or info.state != SlotState.names[SlotState.OPEN] or not info.ready:
                raise UnknownTarget(f"no client at sid {target}", code=ErrorCode.UNKNOWN_TARGET)
            sid, gen = target, info.generation
        self._send(sid, gen, Push(cpid, "", data))
        return sid, gen

    def _send(self, sid: int, gen: int, frame: msgspec.Struct) -> None:
        """Queue one frame for (sid, gen); consecutive frames for one connection share a Deliver."""
        if self._closed:
            self._check()
        self._add(sid, gen, _encode(frame), type(frame))

    def _add(self, sid: int, gen: int, body: bytes, kind: type) -> None:
        """Frame ``body`` (of a ``kind`` frame) for (sid, gen): every answer but run_handler's runs of replies."""
        size = len(body) + 4
        if size > self._room:
            raise ProtocolError(f"a {kind.__name__} frame of {size} bytes exceeds the largest frame "
                                f"this instance carries ({self._room} bytes; see --queue-size)")
        if self._open_sid == sid and self._open_gen == gen and self._open_size + size <= self._room:
            self._open_frames.append(prefix(size - 4) + body)
            self._open_size += size
        else:
            self._seal()
            self._open_sid, self._open_gen = sid, gen
            self._open_frames = [prefix(size - 4) + body]
            self._open_size = size
        if not self._batch:              # nothing else in hand: send now (a Worker does not wait for room)
            self._seal()
            self._push(block=not self._LAZY)

    def _add_run(self, sid: int, gen: int, frames: list[bytes], size: int) -> None:
        """Add prefixed frames for (sid, gen) that fit one Deliver (``size`` bytes): run_handler's path."""
        self._seal()
        self._open_sid, self._open_gen = sid, gen
        self._open_frames = frames
        self._open_size = size
        self._seal()

    def _seal(self) -> None:
        frames = self._open_frames
        if frames:
            self._out.add(Deliver(self._open_sid, self._open_gen,
                                  frames[0] if len(frames) == 1 else b"".join(frames), len(frames)),
                          DELIVER_OVERHEAD + self._open_size)
            self._c[C_REPLIES] += len(frames)
            self._open_frames = []
            self._open_sid = -1

    def flush(self, *, timeout: float | None = 30.0) -> None:
        """Send every reply collected so far (blocks while the reply queue is full)."""
        self._seal()
        self._push(block=True, timeout=timeout)

    def _gone(self) -> bool:
        """Has the gateway this handle attached to stopped?  Its acceptor exited, or the instance's
        table is gone or another one (a new run): true in any pid namespace, at two syscalls."""
        if self._acceptor.poll(0):
            return True
        try:
            return os.stat(os.path.join(ipcnames.SHM_DIR, ipcnames.table_name(self.instance))).st_ino \
                != self._table_ino
        except FileNotFoundError:
            return True

    def _check_gateway(self) -> None:
        """Raise BrokenResourceError if the gateway has stopped; looks at most every LOOK_EVERY seconds
        (a reply put meanwhile into a stopped gateway's queue is one its clients could not get anyway)."""
        now = time.monotonic()
        if now < self._next_look:
            return
        if self._stopped or self._gone():
            self._stopped = True
            self._pending.clear()
            self._pending_bytes = 0
            self._replies.close()        # (the old run's queue holds RLIMIT_MSGQUEUE while it is open)
            raise BrokenResourceError(f"the gateway of instance {self.instance!r} this {type(self).__name__} "
                                      "attached to has stopped (its clients are gone with it)")
        self._next_look = now + LOOK_EVERY

    def _push(self, *, block: bool, timeout: float | None = 30.0) -> None:
        """Put packed reply messages on the queue, in order; without ``block``, stop when it is full.

        While earlier messages wait for room, the open one is not sealed: it
        goes on filling, so a sender that is behind gets fewer, fuller
        messages rather than one small one per request message (each costs
        every process on the way a wake-up).  Afterwards replies are left in
        the open message only if some wait in ``_pending`` too.
        """
        self._check_gateway()            # (once per batch of replies)
        out, pending = self._out, self._pending
        deadline = None if timeout is None or not block else time.monotonic() + timeout
        while True:
            if out:                      # the open message goes once nothing waits before it
                for message in (out.take() if not pending or block else out.take_full_messages()):
                    pending.append(message)
                    self._pending_bytes += len(message)
            if not pending:
                return
            try:
                if block:
                    # in steps of at most a heartbeat: waiting on the sender is no hang of ours (hangs.py)
                    step = self._heartbeat if deadline is None else min(self._heartbeat,
                                                                        deadline - time.monotonic())
                    self._replies.put(pending[0], timeout=max(0.0, step))
                else:
                    self._replies.put_nowait(pending[0])
            except WouldBlock:
                if block:
                    if deadline is None or time.monotonic() < deadline:
                        self._alive()
                        continue
                    raise Timeout(f"reply queue stayed full for {timeout} s: is the gateway's sender stuck?") \
                        from None
                return
            self._pending_bytes -= len(pending.popleft())

    def _alive(self) -> None:
        """Show life while waiting (a Worker publishes its heartbeat; a Replier has no row)."""

    def clients(self) -> list[SlotInfo]:
        """Every open connection of the instance, from the shared table."""
        self._check()
        self._check_gateway()
        return list(self._table.slots())

    # --- closing ----------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"this {type(self).__name__} is closed")

    def close(self) -> None:
        """Send what is pending and let go of the instance."""
        if self._closed:
            return
        try:
            self.flush(timeout=5.0)
        except DuprepError as e:
            log.error("closing: %s", e)
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        if hasattr(self, "_replies"):
            self._replies.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._table.close()
        self._lock.close()

    def __enter__(self) -> "Replier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Worker(Replier):
    """A business process's handle on a gateway instance: receive requests, answer them.

    Not thread-safe: use one Worker per thread.  Close it (or use ``with``)
    to release its row in the table.

    Raises :class:`~duprep.errors.BrokenResourceError` if the instance has
    no running gateway, or when the gateway stops while waiting.
    """

    _LAZY = True
    _KEEPS_ATTACH_LOCK = True
    _in_hand_n = 0
    _in_hand_after = 0
    _held: Request | None = None   # returned by receive(), its answer not yet on its way
    _in_run = False                # run_handler is working through a message ...
    _run_done = 0                  # ... and this many of its requests have their answers packed

    def __init__(self, instance: str = "default", *, wait: float = 0.0) -> None:
        self._ep = select.epoll()
        super().__init__(instance, wait=wait)
        try:
            row = self._lock.claim_row(FIRST_WORKER_ROW, self._table.nprocs)
            self._in_hand = self._table.in_hand(row)
            self._in_hand_n = 0       # requests of the message in hand; -1 while it is being unpacked
            lost = take_over(self._table, row)      # a worker before us died in this row
            if lost is not None:
                log.error("worker %d died in row %d holding %d requests and %d sends; answered them with "
                          "ERROR WORKER_LOST", lost.pid, row, lost.requests, lost.sends)
                for message in lost.answered:
                    self._pending.append(message)
                    self._pending_bytes += len(message)
            previous = list(self._table.proc_part(row).read_own()[7:])     # the row is ours now
            self._row = ProcRow(self._table, row, Role.WORKER, index=row - FIRST_WORKER_ROW)
            self._row.counters[:] = previous          # keep the drain arithmetic of the instance right
            self._c = self._row.counters
            self._requests = Queue(ipcnames.request_queue(instance))
            # at least this often while idle: a supervisor takes a longer silence for a hang (hangs.py)
            self._heartbeat = self._table.get("heartbeat") or HEARTBEAT
            self._ep.register(self._requests.fileno(), select.EPOLLIN)
            if self._pidfd >= 0:
                self._ep.register(self._pidfd, select.EPOLLIN)
        except BaseException:
            self._release()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ep.register(self._wake_r.fileno(), select.EPOLLIN)
        self._holding = False        # a request returned by receive() is being handled
        self._looked = time.monotonic()  # when an idle wait last looked whether the gateway is still there
        self._watching_replies = False   # the reply queue is in the epoll set (replies wait for room)
        self._interrupted = False
        self._row.beat()
        if self._pending:
            self._push(block=False)

    # --- receiving ---------------------------------------------------------

    def receive(self, *, timeout: float | None = None) -> Request:
        """The next request, waiting up to ``timeout`` seconds (None: for ever).

        Raises Timeout, BrokenResourceError (gateway gone), or
        ClosedResourceError (closed, or interrupted by :meth:`interrupt`).
        """
        if self._batch and not self._closed:      # the common case, kept short
            if self._holding:
                self._c[C_REQUESTS] += 1
            self._holding = True
            request = self._held = self._batch.popleft()
            return request
        self._check()
        self._done_one()
        self._wait_batch(timeout)
        return self._hand(self._batch.popleft())

    def _alive(self) -> None:
        self._row.beat()

    def _wait_batch(self, timeout: float | None) -> None:
        """Send the replies collected so far, then wait until the next queue message is in hand."""
        self._seal()
        self._push(block=self._pending_bytes > REPLY_BACKLOG)
        if self._interrupted:
            self.flush()
            raise ClosedResourceError("worker interrupted")
        deadline = None if timeout is None else time.monotonic() + timeout
        heartbeat = self._heartbeat
        reply_fd = self._replies.fileno()
        while True:
            try:
                message = self._requests.get_nowait()
            except WouldBlock:
                # replies still here (pending, and the open message behind them): the drain must wait
                self._row.state = len(self._pending) + bool(self._out)
                self._c[C_HELD] = 0                    # waiting: nothing in hand
                self._row.beat()
                wait = heartbeat if deadline is None else min(heartbeat, deadline - time.monotonic())
                if wait <= 0:
                    raise Timeout(f"no request within {timeout:g} s") from None
                self._watch_room()
                events = self._ep.poll(wait)
                if not events and time.monotonic() - self._looked >= heartbeat and (
                        self._gone() or gateway_lock_held(self.instance) is False):
                    # (idle, once per heartbeat: also seen from another pid namespace, where the
                    # acceptor's pid names some other process and its pidfd says nothing)
                    raise BrokenResourceError(f"the gateway of instance {self.instance!r} stopped")
                if not events:
                    self._looked = time.monotonic()
                for fd, _ in events:
                    if fd == reply_fd:
                        self._push(block=False)
                    elif fd == self._pidfd:
                        raise BrokenResourceError(f"the gateway of instance {self.instance!r} stopped")
                    elif fd == self._wake_r.fileno():
                        self._drain_wake()
                        if self._interrupted:
                            self.flush()
                            raise ClosedResourceError("worker interrupted") from None
                continue
            self._c[C_QMSGS] += 1
            self._expand(message)
            self._row.state = len(self._pending) + bool(self._out)
            self._c[C_HELD] = len(self._batch)     # if we die now, this many requests die with us
            self._row.beat()          # status shows what this worker holds
            if self._batch:
                return

    def _watch_room(self) -> None:
        """Have the epoll set (and so fileno()) watch the reply queue for room exactly while replies wait."""
        if bool(self._pending) != self._watching_replies:
            self._watching_replies = not self._watching_replies
            if self._watching_replies:
                self._ep.register(self._replies.fileno(), select.EPOLLOUT)
            else:
                self._ep.unregister(self._replies.fileno())

    def receive_nowait(self) -> Request:
        """The next request if one is already there, else raise WouldBlock; never blocks.

        For your own selector, with :meth:`fileno`.  Replies that find the
        reply queue full wait in the worker (fileno() is readable once they
        can go); past REPLY_BACKLOG bytes of them it takes no more requests
        (WouldBlock), as receive() would wait.  Raises BrokenResourceError
        once the gateway has stopped, ClosedResourceError after :meth:`interrupt`.
        """
        self._check()
        self._done_one()
        while not self._batch:
            self._next_look = 0.0        # look now: the selector may have woken for that
            self._seal()
            self._push(block=False)      # (raises BrokenResourceError if the gateway has stopped)
            # replies still here: a graceful stop waits for them
            self._row.state = len(self._pending) + bool(self._out)
            self._watch_room()
            self._drain_wake()           # (first: an interrupt() from now on leaves its byte for the next call)
            if self._interrupted:
                raise ClosedResourceError("worker interrupted")
            if self._pending_bytes > REPLY_BACKLOG:
                raise WouldBlock(f"{self._pending_bytes} reply bytes wait for room in the reply queue")
            message = self._requests.get_nowait()    # (WouldBlock: fileno() is readable when one comes)
            self._expand(message)
            self._c[C_QMSGS] += 1
        return self._hand(self._batch.popleft())

    def _expand(self, message: bytes) -> None:
        """Turn one request-queue message into Requests (the frames come undecoded from the receiver).

        The message is copied to the row's HAND region first: if this
        process dies before its answers are out, whoever takes the row
        answers its requests with ERROR WORKER_LOST (recovery.py).
        """
        self._in_hand_n = -1
        self._in_hand.hold(message, self._c[C_REQUESTS])
        try:
            chunks = decode_chunks(message)
        except (msgspec.DecodeError, ValueError) as e:
            log.error("dropped an undecodable request-queue message: %s", e)
            self._in_hand_n = 0
            self._in_hand.clear(self._c[C_REQUESTS])
            return
        extend = self._batch.extend
        for chunk, requests in chunks:
            if type(requests) is list:
                extend(requests)
            else:
                assert isinstance(requests, BadFrame)
                extend(requests.requests)
                self._c[C_REQUESTS] += requests.dropped   # dropped with the connection: handled
                self._bad_frame(chunk.sid, chunk.generation, requests.reason)
        self._in_hand_n = n = len(self._batch)
        self._in_hand_after = self._c[C_REQUESTS] + n     # the counter once this message is done
        if not n:
            self._in_hand.clear(self._in_hand_after)

    def _push(self, *, block: bool, timeout: float | None = 30.0) -> None:
        super()._push(block=block, timeout=timeout)
        n = self._in_hand_n
        if n > 0 and not self._pending:        # every answer so far is on the queue
            # Answered: the requests handed out, except one received and not answered yet; in
            # run_handler, those before the run of replies it has not packed yet (and before the
            # request in the handler, whose push() may have brought us here).
            handed = self._run_done if self._in_run else n - len(self._batch) - (self._held is not None)
            if handed == n:
                self._in_hand_n = 0
                self._in_hand.clear(self._in_hand_after)
            else:
                self._in_hand.answered(handed)

    def _bad_frame(self, sid: int, gen: int, why: str) -> None:
        """A REQUEST/SEND the receiver passed on unchecked is malformed: tell the client, end it."""
        log.info("sid %d gen %d: malformed frame: %s", sid, gen, why)
        self._c[C_BAD] += 1
        self._send(sid, gen, Error(0, 0, ErrorCode.BAD_FRAME, why[:200]))
        self._seal()
        self._out.add(Close(sid, gen, ErrorCode.BAD_FRAME))
        self.flush()

    def _hand(self, request: Request) -> Request:
        self._holding = True
        self._held = request
        return request

    def _done_one(self) -> None:
        if self._holding:
            self._holding = False
            self._held = None
            self._c[C_REQUESTS] += 1

    # The request receive() returned is answered once one of these is given it: if this process dies
    # before its next receive(), the row's next owner must not answer it again with WORKER_LOST.
    # (Cleared before the answer is added: adding the last one of a message pushes it at once, and
    # the push must count this request as answered.)

    def reply(self, request: Request, data: bytes, /) -> None:
        self._answering(request, lambda: Replier.reply(self, request, data))

    def defer(self, request: Request, /) -> None:
        self._answering(request, lambda: Replier.defer(self, request))

    def fail(self, request: Request, message: str, /, *, code: int = ErrorCode.APP_ERROR) -> None:
        self._answering(request, lambda: Replier.fail(self, request, message, code=code))

    def _answering(self, request: Request, answer: Callable[[], None]) -> None:
        held = request is self._held
        if held:
            self._held = None
        try:
            answer()
        except BaseException:
            if held:
                self._held = request
            raise

    def interrupt(self) -> None:
        """Make a blocked :meth:`receive` raise ClosedResourceError once held requests are done."""
        self._interrupted = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(256):
                pass
        except BlockingIOError:
            pass

    def wakeup_fd(self) -> int:
        """A descriptor for ``signal.set_wakeup_fd``: a signal then wakes a blocked receive()."""
        return self._wake_w.fileno()

    def statistics(self) -> WorkerStatistics:
        c = self._c
        return WorkerStatistics(c[C_REQUESTS], c[C_REPLIES], c[C_ERRORS], c[C_QMSGS], len(self._batch), c[C_BAD])

    def fileno(self) -> int:
        """A descriptor for your own selector: readable while requests wait, when held replies can
        go, after :meth:`interrupt`, and once the gateway has stopped -- then call
        :meth:`receive_nowait`, which takes the request or raises why not."""
        return self._ep.fileno()

    def close(self) -> None:
        """Send what is pending and let go of the instance.

        Requests taken and not answered (still in hand, or the one
        receive() returned last) are answered with ERROR WORKER_LOST, as if
        this worker had died: finish them first (``serve`` does).
        """
        if self._closed:
            return
        held, rest = self._held, list(self._batch)
        self._batch.clear()
        self._done_one()                  # the one receive() returned counts as handled, answered or not
        self._c[C_REQUESTS] += len(rest)
        unanswered = ([held] if held is not None else []) + rest
        if unanswered:
            log.error("worker closed holding %d unanswered requests; answering them with ERROR WORKER_LOST",
                      len(unanswered))
            try:
                for request in unanswered:
                    self.fail(request, "the worker stopped before answering", code=ErrorCode.WORKER_LOST)
            except DuprepError as e:
                log.error("closing: %s", e)
        super().close()

    def _release(self) -> None:
        if hasattr(self, "_row"):
            self._row.state = 0          # whatever close() could not send is gone; do not hold up a drain
            self._row.beat()
        if hasattr(self, "_requests"):
            self._requests.close()
        self._ep.close()
        for s in ("_wake_r", "_wake_w"):
            if hasattr(self, s):
                getattr(self, s).close()
        super()._release()

    def __enter__(self) -> "Worker":
        return self


def run_handler(worker: Worker, handler: Handler, *, stop: Callable[[], bool] = lambda: False) -> None:
    """Serve requests with ``handler`` until the worker is interrupted (:meth:`Worker.interrupt`,
    e.g. from a signal) and ``stop()`` is true; raises BrokenResourceError when the gateway stops.

    A handler that raises answers its request with APP_ERROR (and is logged);
    the worker carries on with the next request.  Requests are taken a queue
    message at a time; the replies to one message leave together, when the
    last of its requests is handled.
    """
    pulse = _Pulse(worker._row, worker._batch, min(worker._heartbeat, 1.0))
    try:
        _run_handler(worker, handler, stop, pulse)
    finally:
        pulse.close()


def _run_handler(worker: Worker, handler: Handler, stop: Callable[[], bool], pulse: "_Pulse") -> None:
    batch = worker._batch
    counters = worker._c
    room = worker._room
    add_run = worker._add_run
    prefixes = PREFIXES                   # (frame.prefix, inlined: a frame of n bytes has a body of n - 4)
    cached = len(PREFIXES) + 4
    while True:
        try:
            worker._check()
            worker._done_one()            # a request taken with receive() before we were called
            worker._wait_batch(None)
        except ClosedResourceError:
            if stop():
                return
            raise
        pulse.busy()
        # A message's requests come grouped by connection (a Chunk each): the replies to a group
        # are framed here and handed over together, one Deliver per group, not one call per reply.
        # Until a run is packed, the HAND (recovery.py) must not count it as answered: _run_done says
        # how many requests are, for a push() the handler may make (it is updated per run, not per
        # request; requests without an answer count once the next run is packed).
        origin = NOWHERE                  # the run's (requests of one Chunk share one Origin)
        frames: list[bytes] = []
        size = done = 0
        worker._in_run, worker._run_done = True, 0
        try:
            while batch:
                request = batch.popleft()
                try:
                    result = handler(request)
                except Exception as e:
                    done += 1
                    log.exception("handler failed on msgid %d from sid %d", request.msgid, request.sid)
                    if not request.oneway:
                        if frames:           # the run first: answers leave in order
                            worker._run_done = done - 1
                            add_run(origin.sid, origin.generation, frames, size)
                            frames = []
                            size = 0
                        worker.fail(request, f"{type(e).__name__}: {e}")
                    continue
                except BaseException:        # e.g. SystemExit: not handled; close() answers it
                    batch.appendleft(request)
                    raise
                done += 1
                if request.oneway or result is None:
                    continue
                if type(result) is bytes:
                    body = _encode((REPLY_TAG, request.msgid, request.cpid, result))
                    n = len(body) + 4
                    if request.origin is not origin or size + n > room:
                        if frames:
                            worker._run_done = done - 1
                            add_run(origin.sid, origin.generation, frames, size)
                            frames = []
                            size = 0
                        origin = request.origin
                    if n <= room:
                        frames.append((prefixes[n - 4] if n < cached else _pack_length(n - 4)) + body)
                        size += n
                        continue
                if frames:                   # (as above)
                    worker._run_done = done - 1
                    add_run(origin.sid, origin.generation, frames, size)
                    frames = []
                    size = 0
                try:
                    if result is DEFERRED:
                        worker.defer(request)
                    else:
                        worker.reply(request, result)
                except TypeError:
                    log.error("handler returned %s for msgid %d from sid %d: a reply is bytes, None or "
                              "bus.DEFERRED", type(result).__name__, request.msgid, request.sid)
                    worker.fail(request, f"the handler returned {type(result).__name__}, not bytes")
                except ProtocolError as e:        # e.g. a reply larger than the largest frame
                    log.error("cannot answer msgid %d from sid %d: %s", request.msgid, request.sid, e)
                    worker.fail(request, str(e))
        finally:
            pulse.idle()
            if frames:
                add_run(origin.sid, origin.generation, frames, size)
            worker._in_run = False
            counters[C_REQUESTS] += done
        if worker._interrupted and stop():
            worker.flush()
            return


class _Pulse:
    """A worker's heartbeat while run_handler works through a queue message.

    One message can hold many clients' requests, handled one after another; the worker beats only
    as it takes a message, so a long but moving batch would look hung to its supervisor (hangs.py).
    While a message is in hand, a thread looks every ``every`` seconds whether a handler call began
    since its last look (another message, or the batch got shorter) and if so publishes the
    heartbeat.  A call that never returns stops the beats, which is the point.  Nothing per call in
    the worker's own thread; the thread sleeps on an Event while the worker waits for requests.
    """

    def __init__(self, row: ProcRow, batch: "deque[Request]", every: float) -> None:
        self._row, self._batch, self._every = row, batch, every
        self._busy = False
        self._messages = 0                  # taken so far: with the batch's length, what "moved" means
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duprep-pulse", daemon=True)
        self._thread.start()

    def busy(self) -> None:
        """A message is in hand (the worker's thread, after taking it)."""
        self._messages += 1
        self._busy = True
        if not self._wake.is_set():
            self._wake.set()

    def idle(self) -> None:
        self._busy = False

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(5)

    def _run(self) -> None:
        seen = (-1, -1)
        while True:
            self._wake.wait()
            if self._closed.wait(self._every):
                return
            if not self._busy:
                self._wake.clear()
                if self._busy:              # (busy() may have run between the test and the clear)
                    self._wake.set()
                continue
            state = (self._messages, len(self._batch))
            if state != seen:
                seen = state
                self._row.publish_heartbeat()


def serve(handler: Handler, *, instance: str = "default", workers: int = 1, wait: float = 0.0) -> int:
    """Run ``handler`` in ``workers`` processes until the gateway stops or SIGTERM/SIGINT.

    With one worker it runs in the calling process: returns 0 after a clean
    stop (SIGTERM, or the gateway went away) and raises if it cannot attach
    (BrokenResourceError: no gateway; InstanceBusyError: every worker row is
    taken; ConfigError: the instance belongs to another user).

    With ``workers > 1`` the calling process forks them and supervises them
    (a small gunicorn arbiter):

    * SIGTERM/SIGINT are forwarded to every worker (each finishes what it
      holds and exits 0); the parent returns when all have exited;
    * every worker's end is logged with its cause;
    * a worker that exits 0 (the gateway stopped, or it was sent SIGTERM
      alone) is not started again, unless it left requests unanswered (a
      handler's os._exit(0)): those are answered, and it is replaced;
    * a worker that cannot start (exit 3: cannot attach; 4: the instance
      belongs to another user) is not started again either: the parent stops
      the others, as a gateway halts on a worker that cannot boot;
    * a worker that dies with a non-zero exit or by a signal: the parent
      answers the requests it held with ERROR WORKER_LOST (as the acceptor
      does for its own workers); if it crashed (not one of the above, nor a
      signal the parent forwarded) it is started again at once.  After more
      than 5 crashes within 60 s the parent gives up and stops the others.

    Returns 0 if every worker stopped cleanly, else the first failure: the
    worker's exit code, or 128 + N for one killed by signal N (also when it
    was replaced: the code says that something went wrong).
    """
    from .gateway.child import (EXIT_BOOT_ERROR, EXIT_CONFIG_ERROR, NO_RESPAWN, access_denied, die_with_parent,
                                signal_name)
    MAX_CRASHES, CRASH_WINDOW = 5, 60.0
    if workers < 1:
        raise ValueError("workers must be >= 1")

    def attach() -> Worker:
        try:
            return Worker(instance, wait=wait)
        except (PermissionError, ConfigError) as e:     # the objects are mode 0600: another user's gateway
            raise ConfigError(f"cannot attach to instance {instance!r}: {access_denied(instance, e)}") from None
        except ProtocolError as e:       # a gateway of another duprep version: restarting us cannot help
            raise ConfigError(f"cannot attach to instance {instance!r}: {e}") from None

    if workers == 1:
        return _serve_one(handler, attach())

    pidfds: dict[int, int] = {}          # pidfd -> pid of each live worker
    hung = hangs.Watch(instance)         # workers that stop showing life are aborted (hangs.py)
    forwarded: set[int] = set()          # signals passed on to the workers: a stop is under way
    crashes: deque[float] = deque()
    poller = select.poll()
    stop_signals = {signal.SIGTERM, signal.SIGINT}

    parent = os.getpid()

    def child() -> None:
        """The forked worker: attach, serve, exit; never returns."""
        code = EXIT_BOOT_ERROR
        try:
            die_with_parent(parent)                   # no worker outlives its supervisor
            for s in stop_signals:
                signal.signal(s, signal.SIG_DFL)      # not the parent's forwarding handler...
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)   # ...which start() kept from running
            for fd in pidfds:
                os.close(fd)
            try:
                worker = attach()
            except ConfigError as e:
                code = EXIT_CONFIG_ERROR
                log.error("cannot start: %s", e)
            except DuprepError as e:
                log.error("cannot start: %s", e)
            else:
                code = 1                              # if serving raises: a crash
                code = _serve_one(handler, worker)
        except BaseException:
            log.exception("worker %d crashed", os.getpid())
        finally:
            os._exit(code)

    def start() -> None:
        # Stop signals wait until the new worker is in pidfds (parent) or has its own handlers (child).
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            if forwarded:                     # a stop came in since the caller looked: start nothing
                return
            pid = os.fork()
            if pid == 0:
                child()
            fd = os.pidfd_open(pid)
            pidfds[fd] = pid
            poller.register(fd, select.POLLIN)
            hung.add(pid, fd)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    def stop_all(signum: int) -> None:
        forwarded.add(signum)
        for pid in list(pidfds.values()):     # (a pid leaves pidfds before it is reaped: never a reused one)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:        # reaped behind our back (the caller ignores SIGCHLD)
                pass

    old = {s: signal.signal(s, lambda signum, frame: stop_all(signum)) for s in stop_signals}
    old_chld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # SIG_IGN would reap our workers behind our back
    failure = 0
    try:
        for _ in range(workers):
            if not forwarded:
                start()
        while pidfds:
            until = hung.timeout()
            events = poller.poll(None if until is None else until * 1000 + 1)
            if not events:
                hung.check()          # a worker silent for the gateway's hang_timeout is aborted
            for fd, _ in events:
                poller.unregister(fd)
                os.close(fd)
                pid = pidfds.pop(fd)
                hung.remove(pid)
                try:
                    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                except ChildProcessError:     # (as above): its status is lost
                    code = 0
                how, result = (f"exit code {code}", code) if code >= 0 else \
                    (f"killed by {signal_name(-code)}", 128 - code)
                # before a successor can take another row (not after a stop: the gateway is going)
                held = (code != 0 or _serving(instance)) and _answer_for(instance, pid)
                # Exit 0 is a stop (the gateway's, or a SIGTERM to that child alone: it finished what
                # it held); with requests left unanswered it is a handler's os._exit(0) or the like:
                # replaced like a crash, though its status is no failure.
                unexpected = code == 0 and held and not forwarded and _serving(instance)
                if (code == 0 and not unexpected) or -code in forwarded:
                    log.info("worker %d stopped (%s)", pid, how)
                    continue
                if not unexpected:
                    failure = failure or result
                if code in NO_RESPAWN:
                    log.error("worker %d could not start (%s)%s", pid, how,
                              "" if forwarded else "; stopping the other workers")
                    if not forwarded:
                        stop_all(signal.SIGTERM)
                elif forwarded:
                    log.error("worker %d failed while stopping (%s)", pid, how)
                else:
                    now = time.monotonic()
                    crashes.append(now)
                    while crashes[0] < now - CRASH_WINDOW:
                        crashes.popleft()
                    if len(crashes) > MAX_CRASHES:
                        log.error("worker %d died (%s), crash %d within %g s: giving up, stopping the other "
                                  "workers", pid, how, len(crashes), CRASH_WINDOW)
                        stop_all(signal.SIGTERM)
                    else:
                        log.error("worker %d died (%s); starting another", pid, how)
                        start()
    except BaseException:
        stop_all(signal.SIGTERM)          # the parent fails (e.g. fork): do not leave workers behind
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGCHLD, old_chld)
        for fd in pidfds:
            os.close(fd)
    return failure


def _acceptor_pidfd(pid: int) -> int:
    """A pidfd of the acceptor with this pid, or -1 if no process of ours is one (it exited, or it
    runs in another pid namespace, where its pid names some other process or none)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    if not acceptor_alive(pid):          # (the pid reused by another process, or in another namespace)
        os.close(fd)
        return -1
    return fd


def _serving(instance: str) -> bool:
    """Does the instance's gateway run and serve (not stopping, not gone)?"""
    try:
        table = Table.attach(ipcnames.table_name(instance))
    except (FileNotFoundError, DuprepError, OSError):
        return False
    try:
        return table.get("state") == GatewayState.READY and gateway_lock_held(instance) is True
    finally:
        table.close()


def _answer_for(instance: str, pid: int) -> bool:
    """A worker of ``serve(workers > 1)`` died: answer the requests it held with ERROR WORKER_LOST now,
    as the acceptor does for the workers it supervises, not when (if ever) another worker takes its row.
    A no-op if it held nothing, or if a worker has taken the row already (and answered them itself).
    True if it held something."""
    try:
        table = Table.attach(ipcnames.table_name(instance))
    except (FileNotFoundError, DuprepError, OSError):
        return False                               # the gateway is gone: nobody to answer
    lock = InstanceLock(instance)
    try:
        lost = answer_for(table, lock.open(), pid)
        if lost is None:
            return False
        log.error("worker %d died holding %d requests and %d sends; answering the requests with "
                  "ERROR WORKER_LOST", pid, lost.requests, lost.sends)
        replies = Queue(ipcnames.reply_queue(instance))
        try:
            for i, message in enumerate(lost.answered):
                replies.put(message, timeout=5.0)
        except WouldBlock:
            log.error("the reply queue stayed full: %d WORKER_LOST messages not sent", len(lost.answered) - i)
        finally:
            replies.close()
        return True
    except (DuprepError, OSError) as e:
        log.error("could not answer for worker %d: %s", pid, e)
        return False
    finally:
        lock.close()
        table.close()


def _serve_one(handler: Handler, worker: Worker) -> int:
    """Serve with an attached ``worker`` until the gateway stops or SIGTERM/SIGINT; return 0."""
    stopping = [False]
    with worker:
        def on_signal(signum: int, frame: object) -> None:
            stopping[0] = True
            worker._interrupted = True

        old_fd = signal.set_wakeup_fd(worker.wakeup_fd(), warn_on_full_buffer=False)
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            run_handler(worker, handler, stop=lambda: stopping[0])
        except BrokenResourceError as e:
            log.info("%s; worker exiting", e)
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
    return 0
