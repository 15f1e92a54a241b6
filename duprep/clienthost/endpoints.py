"""The local side of the client daemon: attached endpoints and their reply queues.

A *local process* is ``(pid, start)``; it may hold several endpoints (one
per :class:`duprep.local.Client` object), each with its own reply queue
``/duprep-ch.<i>.p<pid>.<start>.<n>``, created by the process before it
attaches.

Owns, per local process, one pidfd registered in the daemon's epoll: it
becomes readable the moment the process exits, which is how orphans are
found without polling anyone.  Per endpoint it owns the daemon's handle on
the reply queue (closed on detach, exit or daemon stop) and the right to
*unlink* that queue -- but only when the owner is dead or the daemon stops;
a live owner unlinks its own queue when it closes, so a name is never
removed under a process that may create it again.

Delivery never blocks the daemon: a reply is cut into pieces that fit the
queue (protocol.split_down); pieces for a queue that is full wait in the
endpoint's ``pending`` deque, and the queue's descriptor is watched for
EPOLLOUT until it has drained.  At most ``max_pending`` pieces wait per
endpoint; a reply that would exceed it is dropped whole and counted (that
endpoint does not read).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Callable, Iterator

import posix_ipc

from .. import ipcnames, queues
from ..errors import BrokenResourceError, ConfigError, WouldBlock
from ..gateway.loop import READ, WRITE, EventLoop
from . import procid
from .instance import LiveLeftover
from .protocol import LOCAL_VERSION, MORE, Attach, split_down

MIN_REPLY_SIZE = 64      # bytes per reply-queue message a local process must offer (answers travel in pieces)

__all__ = ["AttachError", "Endpoint", "LocalProcess", "Endpoints"]

log = logging.getLogger("duprep")


class AttachError(Exception):
    """An Attach cannot be honoured; ``queue`` is open if the refusal can be told."""

    def __init__(self, message: str, queue: queues.Queue | None) -> None:
        super().__init__(message)
        self.queue = queue


class Endpoint:
    """One attached local client and the daemon's handle on its reply queue."""

    __slots__ = ("ep", "proc", "n", "name", "queue", "pushes", "pending", "watching",
                 "requests", "replies", "dropped", "attached_at")

    def __init__(self, ep: int, proc: "LocalProcess", n: int, name: str, queue: queues.Queue,
                 pushes: bool) -> None:
        self.ep = ep
        self.proc = proc
        self.n = n
        self.name = name
        self.queue = queue
        self.pushes = pushes
        self.pending: deque[bytes] = deque()
        self.watching = False         # queue fd registered for EPOLLOUT
        self.requests = 0             # requests, sends and relays forwarded
        self.replies = 0              # messages for its reply queue (sent or pending)
        self.dropped = 0              # replies dropped: max_pending pieces waiting
        self.attached_at = time.time()

    @property
    def pid(self) -> int:
        return self.proc.pid


class LocalProcess:
    """A live local process: its pidfd, endpoints, and leftover queues of an earlier run."""

    __slots__ = ("pid", "start", "cpid", "pidfd", "endpoints", "leftovers")

    def __init__(self, pid: int, start: int, pidfd: int) -> None:
        self.pid = pid
        self.start = start
        self.cpid = procid.cpid(pid, start)      # its name on the wire
        self.pidfd = pidfd
        self.endpoints: dict[int, Endpoint] = {}
        self.leftovers: list[str] = []


ExitHook = Callable[[LocalProcess, list[Endpoint], int], None]


class Endpoints:
    """Every attached endpoint, by endpoint id and by process.

    ``on_exit(process, endpoints, discarded)`` is called after a process
    died and its queues are gone; ``discarded`` counts the replies that were
    waiting for it (in the daemon or in its queue).
    """

    def __init__(self, instance: str, loop: EventLoop, *, max_pending: int, on_exit: ExitHook) -> None:
        self.instance = instance
        self.loop = loop
        self.max_pending = max_pending
        self.on_exit = on_exit
        self._next_ep = 1
        self._eps: dict[int, Endpoint] = {}
        self._procs: dict[tuple[int, int], LocalProcess] = {}
        self.changed = False          # the set of queue names changed (registry must be rewritten)

    # --- looking up ---------------------------------------------------------------

    def get(self, ep: int) -> Endpoint | None:
        return self._eps.get(ep)

    def __len__(self) -> int:
        return len(self._eps)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(list(self._eps.values()))

    def processes(self) -> list[LocalProcess]:
        return list(self._procs.values())

    def process(self, pid: int, start: int) -> LocalProcess | None:
        """The live process ``(pid, start)``, if it is attached."""
        return self._procs.get((pid, start))

    def push_takers(self) -> list[Endpoint]:
        return [e for e in self._eps.values() if e.pushes]

    def queue_names(self) -> list[str]:
        names = [e.name for e in self._eps.values()]
        for proc in self._procs.values():
            names.extend(proc.leftovers)
        return sorted(names)

    # --- attaching ----------------------------------------------------------------------

    def attach(self, msg: Attach) -> Endpoint:
        """Validate and register an endpoint; raises AttachError."""
        name = ipcnames.clienthost_reply_queue(self.instance, msg.pid, msg.start, msg.n)
        try:
            queue = queues.Queue(name)
        except (BrokenResourceError, ConfigError, OSError, posix_ipc.Error) as e:   # e.g. out of descriptors
            raise AttachError(f"cannot open reply queue {name}: {e}", None) from None
        try:
            if queue.msgsize < MIN_REPLY_SIZE:
                raise AttachError(f"reply queue {name} takes messages of {queue.msgsize} bytes; "
                                  f"at least {MIN_REPLY_SIZE} are needed", None)
            if msg.version != LOCAL_VERSION:
                raise AttachError(f"local protocol version {msg.version} not supported; "
                                  f"this daemon speaks {LOCAL_VERSION}", queue)
            if any(e.name == name for e in self._eps.values()):
                raise AttachError(f"{name} is already attached", queue)
            proc = self._procs.get((msg.pid, msg.start))
            if proc is None:
                try:
                    pidfd = procid.watch(msg.pid, msg.start)
                except procid.ProcessGone as e:
                    queue.close()
                    queues.unlink(name)           # its owner is dead: an orphan already
                    raise AttachError(str(e), None) from None
                proc = self._add_process(msg.pid, msg.start, pidfd)
        except AttachError as e:
            if e.queue is None:
                queue.close()
            raise
        ep = Endpoint(self._next_ep, proc, msg.n, name, queue, msg.pushes)
        self._next_ep += 1
        self._eps[ep.ep] = ep
        proc.endpoints[ep.ep] = ep
        if name in proc.leftovers:
            proc.leftovers.remove(name)
        self.changed = True
        return ep

    def adopt(self, left: LiveLeftover) -> None:
        """Watch the live owner of a reply queue left by an earlier run (takes the pidfd)."""
        proc = self._procs.get((left.pid, left.start))
        if proc is None:
            proc = self._add_process(left.pid, left.start, left.pidfd)
        else:
            os.close(left.pidfd)
        proc.leftovers.append(left.name)
        self.changed = True

    def _add_process(self, pid: int, start: int, pidfd: int) -> LocalProcess:
        proc = LocalProcess(pid, start, pidfd)
        self._procs[(pid, start)] = proc
        self.loop.register(pidfd, READ, lambda _ev: self._exited(proc))   # readable: it exited
        return proc

    def detach(self, ep: Endpoint) -> None:
        """The endpoint closed: forget it and close our handle (its owner unlinks the queue)."""
        self._forget(ep)
        self.loop.close_later(ep.queue)
        proc = ep.proc
        if not proc.endpoints and not proc.leftovers:
            self._drop_process(proc)

    def _forget(self, ep: Endpoint) -> None:
        self._eps.pop(ep.ep, None)
        ep.proc.endpoints.pop(ep.ep, None)
        ep.watching = False
        self.changed = True

    def _drop_process(self, proc: LocalProcess) -> None:
        self._procs.pop((proc.pid, proc.start), None)
        if proc.pidfd >= 0:
            self.loop.unregister(proc.pidfd)
            os.close(proc.pidfd)
            proc.pidfd = -1

    # --- orphans ---------------------------------------------------------------------------

    def _exited(self, proc: LocalProcess) -> None:
        """The process died: discard what waits for it, remove its queues."""
        self._drop_process(proc)
        gone = list(proc.endpoints.values())
        discarded = 0
        for ep in gone:                 # count whole messages, not the pieces large ones travel in
            discarded += sum(1 for part in ep.pending if part[0] != MORE)
            try:
                while True:
                    discarded += ep.queue.get_nowait()[0] != MORE
            except (WouldBlock, OSError, posix_ipc.Error, IndexError):
                pass
            ep.pending.clear()
            self._forget(ep)
            self.loop.close_later(ep.queue)
            queues.unlink(ep.name)
        for name in proc.leftovers:
            queues.unlink(name)
        proc.leftovers.clear()
        self.changed = True
        self.on_exit(proc, gone, discarded)

    # --- delivering ---------------------------------------------------------------------------

    def deliver(self, ep: Endpoint, data: bytes) -> bool:
        """Put one message on the endpoint's reply queue, or keep it until there is room.

        False if it was dropped whole (``max_pending`` pieces would be waiting).
        """
        parts = split_down(data, ep.queue.msgsize)
        if ep.pending and len(ep.pending) + len(parts) > self.max_pending:
            ep.dropped += 1
            return False
        ep.replies += 1
        if not ep.pending:
            for i, part in enumerate(parts):
                try:
                    ep.queue.put_nowait(part)
                except WouldBlock:
                    parts = parts[i:]
                    break
            else:
                return True
        ep.pending.extend(parts)
        if not ep.watching:
            ep.watching = True
            self.loop.register(ep.queue.fileno(), WRITE, lambda _ev: self._on_writable(ep))
        return True

    def _on_writable(self, ep: Endpoint) -> None:
        while ep.pending:
            try:
                ep.queue.put_nowait(ep.pending[0])
            except WouldBlock:
                return
            ep.pending.popleft()
        ep.watching = False
        self.loop.unregister(ep.queue.fileno())

    # --- stopping ----------------------------------------------------------------------------

    def close_all(self) -> None:
        """Daemon exit: close and unlink every queue we know (their owners make new ones)."""
        for ep in list(self._eps.values()):
            self._forget(ep)
            if ep.queue.fileno() >= 0:
                self.loop.unregister(ep.queue.fileno())
            ep.queue.close()
            queues.unlink(ep.name)
        for proc in list(self._procs.values()):
            for name in proc.leftovers:
                queues.unlink(name)
            self._drop_process(proc)
