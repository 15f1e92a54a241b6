"""POSIX message queues: sizing against kernel limits, creation, access.

Only the acceptor creates and unlinks queues (never at run time: a process
still holding an unlinked queue would read a dead queue for ever).  Every
user opens them non-blocking and waits in epoll on ``fileno()``, which is
readable while the queue holds a message and writable while it has room.

posix_ipc reports limit problems vaguely (``ValueError: Invalid
parameter(s)``, or an ``OSError`` about open files with no errno when the
per-user ``RLIMIT_MSGQUEUE`` is exhausted).  :func:`create` turns each into
a :class:`~duprep.errors.LimitError` that names the limit, the bytes needed
and the fix.
"""

from __future__ import annotations

import resource
import select
import time
from dataclasses import dataclass

import posix_ipc

from .errors import BrokenResourceError, ConfigError, LimitError, WouldBlock

__all__ = ["KernelLimits", "QueuePlan", "kernel_limits", "plan", "create", "Queue", "unlink", "charge"]

_PROC = "/proc/sys/fs/mqueue/"
# Bytes the kernel charges against RLIMIT_MSGQUEUE per message slot beyond
# its payload (measured on this kernel, pitfalls.md).
OVERHEAD = 96
# The default plan keeps at least this many messages per queue before it takes bigger ones (plan).
MIN_DEPTH = 8


@dataclass(frozen=True)
class KernelLimits:
    """The limits that decide what queues can be created."""
    msg_max: int
    msgsize_max: int
    queues_max: int
    rlimit_msgqueue: int   # soft RLIMIT_MSGQUEUE in bytes (per user, all queues)


@dataclass(frozen=True)
class QueuePlan:
    """The depth and message size chosen for an instance's queues."""
    depth: int
    msgsize: int
    clamped: str = ""      # why the plan is smaller than asked, "" if it is not

    @property
    def bytes(self) -> int:
        return charge(self.depth, self.msgsize)


def charge(depth: int, msgsize: int) -> int:
    """Bytes one queue costs against RLIMIT_MSGQUEUE."""
    return depth * (msgsize + OVERHEAD)


def _read(name: str, default: int) -> int:
    try:
        with open(_PROC + name) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


def kernel_limits() -> KernelLimits:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)
    return KernelLimits(
        msg_max=_read("msg_max", 10), msgsize_max=_read("msgsize_max", 8192),
        queues_max=_read("queues_max", 256),
        rlimit_msgqueue=soft if soft != resource.RLIM_INFINITY else 2**62)


def plan(*, depth: int | None = None, msgsize: int | None = None, queues: int = 2, share: int = 2,
         max_depth: int = 64, limits: KernelLimits | None = None) -> QueuePlan:
    """Choose depth and message size for ``queues`` queues.

    Explicit values are taken as they are (and checked by :func:`create`);
    defaults use what the kernel offers, up to ``max_depth`` messages of 64
    KiB, within 1/``share`` of RLIMIT_MSGQUEUE (a gateway: half, so that a
    second instance or a client daemon still fits beside it; a client
    daemon's uplink: an eighth).  When that budget is short, depth comes
    before size: the message size is halved (not below 8 KiB) until
    MIN_DEPTH messages fit, and only then is the depth lowered (not below 2).
    A few big messages let a full queue stall the stage behind it: at the
    benchmark's target cell 12 x 16 KiB ran a median 7 % faster than 3 x 64 KiB.
    """
    lim = limits or kernel_limits()
    if depth is not None and depth < 1 or msgsize is not None and msgsize < 1024:
        raise ConfigError("queue depth must be >= 1 and message size >= 1024 bytes")
    why = []
    d = depth if depth is not None else min(max_depth, lim.msg_max)
    s = msgsize if msgsize is not None else min(65536, lim.msgsize_max)
    if depth is None and lim.msg_max < max_depth:
        why.append(f"depth at most fs.mqueue.msg_max={lim.msg_max}")
    budget = lim.rlimit_msgqueue // share
    asked = (d, s)
    if msgsize is None:
        want = d if depth is not None else min(MIN_DEPTH, d)
        while s > 8192 and queues * charge(want, s) > budget:
            s = max(8192, s // 2)
    while depth is None and d > 2 and queues * charge(d, s) > budget:
        d -= 1
    if (d, s) != asked:
        why.append(f"{'half' if share == 2 else f'1/{share}'} of RLIMIT_MSGQUEUE={lim.rlimit_msgqueue} bytes")
    return QueuePlan(depth=d, msgsize=s, clamped=", ".join(why))


def create(name: str, plan: QueuePlan, *, limits: KernelLimits | None = None) -> posix_ipc.MessageQueue:
    """Create queue ``name`` exclusively (acceptor only)."""
    lim = limits or kernel_limits()
    try:
        mq = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o600,
                                    max_messages=plan.depth, max_message_size=plan.msgsize)
    except ValueError as e:
        raise LimitError(
            f"cannot create queue {name} with {plan.depth} messages of {plan.msgsize} bytes: "
            f"the kernel allows at most fs.mqueue.msg_max={lim.msg_max} messages and "
            f"fs.mqueue.msgsize_max={lim.msgsize_max} bytes ({e}). Fix: lower --queue-depth/"
            f"--queue-size, or as root raise the limits, e.g. 'sysctl fs.mqueue.msg_max={plan.depth}' "
            f"and 'sysctl fs.mqueue.msgsize_max={plan.msgsize}'") from None
    except posix_ipc.ExistentialError:
        raise
    except OSError as e:
        text = str(e)
        if "maximum number of files" in text or "Too many open files" in text:
            raise LimitError(
                f"cannot create queue {name}: it needs {plan.bytes} bytes "
                f"({plan.depth} x ({plan.msgsize} + {OVERHEAD})) of RLIMIT_MSGQUEUE, which is "
                f"{lim.rlimit_msgqueue} bytes for this user, shared by all its queues. Fix: set "
                f"LimitMSGQUEUE= in the systemd unit (or 'ulimit -q' as root), lower --queue-depth/"
                f"--queue-size, or stop other duprep instances of this user") from None
        if "Insufficient space" in text:
            raise LimitError(
                f"cannot create queue {name}: the system has fs.mqueue.queues_max={lim.queues_max} "
                f"queues already. Fix: remove stale queues ('duprep cleanup') or raise "
                f"fs.mqueue.queues_max") from None
        raise
    return mq


def unlink(name: str) -> bool:
    """Remove queue ``name``; False if it did not exist."""
    try:
        posix_ipc.unlink_message_queue(name)
        return True
    except posix_ipc.ExistentialError:
        return False


class Queue:
    """A non-blocking handle on an existing queue, for epoll-driven processes.

    ``put_nowait``/``get_nowait`` raise :class:`WouldBlock`; ``put``/``get``
    wait up to ``timeout`` seconds in poll(2) on the queue descriptor.
    """

    __slots__ = ("name", "mq", "msgsize", "depth", "_closed")

    def __init__(self, name: str, mq: posix_ipc.MessageQueue | None = None) -> None:
        self.name = name
        try:
            self.mq = mq or posix_ipc.MessageQueue(name)
        except posix_ipc.ExistentialError:
            raise BrokenResourceError(f"queue {name} does not exist: is the gateway running?") from None
        except posix_ipc.PermissionsError:
            raise ConfigError(f"queue {name} belongs to another user (mode 0600)") from None
        self.mq.block = False
        self.msgsize: int = self.mq.max_message_size
        self.depth: int = self.mq.max_messages
        self._closed = False

    def fileno(self) -> int:
        return int(self.mq.mqd)

    def put_nowait(self, data: bytes) -> None:
        try:
            self.mq.send(data)
        except posix_ipc.BusyError:
            raise WouldBlock(f"queue {self.name} is full") from None

    def get_nowait(self) -> bytes:
        try:
            message: bytes = self.mq.receive()[0]
            return message
        except posix_ipc.BusyError:
            raise WouldBlock(f"queue {self.name} is empty") from None

    def put(self, data: bytes, *, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.put_nowait(data)
            except WouldBlock:
                if not self._wait(select.POLLOUT, deadline):
                    raise

    def get(self, *, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self.get_nowait()
            except WouldBlock:
                if not self._wait(select.POLLIN, deadline):
                    raise

    def _wait(self, events: int, deadline: float | None) -> bool:
        p = select.poll()
        p.register(self.mq.mqd, events)
        ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
        if deadline is not None and time.monotonic() >= deadline:
            return False
        return bool(p.poll(ms))

    def depth_now(self) -> int:
        """Messages currently in the queue."""
        return int(self.mq.current_messages)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.mq.close()
