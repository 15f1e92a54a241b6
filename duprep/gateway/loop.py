"""A small event loop on epoll: one wait point per process, nothing hidden.

Modelled on redis ``ae.c``: callbacks per descriptor, a timer heap whose
earliest deadline is the epoll timeout (no fixed tick: an idle process
sleeps until something happens), and hooks that run before every sleep, where
the receiver and sender flush the batch they collected while handling events.

Signals follow gunicorn and trio: the C-level handler only writes the signal
number into a non-blocking socketpair (``signal.set_wakeup_fd``); the loop
reads the numbers and calls the registered handler from the loop itself.

Descriptors shared between processes (trio ``_io_epoll.py``): epoll watches
the open file description, which other processes keep alive, so a socket must
be unregistered *before* it is closed, or its registration fires for ever and
can no longer be removed.  And fd numbers are reused at once, so a socket
closed in the middle of a batch could get its number back before a stale
event for it is handled.  :meth:`EventLoop.close_later` does both right:
unregister now, close after the batch.
"""

from __future__ import annotations

import heapq
import itertools
import select
import signal
import socket
import time
from typing import Any, Callable

__all__ = ["EventLoop", "Timer", "READ", "WRITE"]

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
ERR = select.EPOLLERR | select.EPOLLHUP


class Timer:
    """A pending :meth:`EventLoop.call_at`; ``cancel()`` makes it a no-op."""

    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callable[[], Any]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Callbacks on descriptors, timers, signals and before-sleep hooks."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._ep = select.epoll()
        self._handlers: dict[int, Callable[[int], Any]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._before_sleep: list[Callable[[], Any]] = []
        self._to_close: list[Any] = []
        self._signals: dict[int, Callable[[int], Any]] = {}
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self.running = False
        self._stop_asked = False

    # --- descriptors ------------------------------------------------------

    def register(self, fd: int, events: int, callback: Callable[[int], Any]) -> None:
        """Call ``callback(events)`` whenever ``fd`` is ready (level-triggered)."""
        self._ep.register(fd, events)
        self._handlers[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._ep.unregister(fd)

    def registered(self, fd: int) -> bool:
        return fd in self._handlers

    def close_later(self, obj: Any) -> None:
        """Unregister ``obj`` (a socket) now; close it after the current batch."""
        try:
            fd = obj.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd >= 0:
            self.unregister(fd)
        self._to_close.append(obj)

    # --- time ---------------------------------------------------------------

    def call_at(self, deadline: float, callback: Callable[[], Any]) -> Timer:
        timer = Timer(deadline, callback)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timer:
        return self.call_at(self.clock() + delay, callback)

    def before_sleep(self, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` after every batch of events, before waiting again."""
        self._before_sleep.append(callback)

    # --- signals ------------------------------------------------------------

    def add_signal(self, signum: int, callback: Callable[[int], Any]) -> None:
        """Run ``callback(signum)`` from the loop when ``signum`` arrives."""
        if self._wake is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            self._wake = (r, w)
            self.register(r.fileno(), READ, self._on_wakeup)
        self._signals[signum] = callback
        signal.signal(signum, _record_only)

    def _on_wakeup(self, _events: int) -> None:
        assert self._wake is not None
        try:
            data = self._wake[0].recv(256)
        except BlockingIOError:
            return
        for signum in dict.fromkeys(data):   # each signal once per batch, in order
            cb = self._signals.get(signum)
            if cb is not None:
                cb(signum)

    # --- running --------------------------------------------------------------

    def stop(self) -> None:
        """Leave :meth:`run` after the current batch; asked before it starts, it returns at once."""
        self.running = False
        self._stop_asked = True

    def run(self) -> None:
        self.running = not self._stop_asked
        while self.running:
            self.run_once()

    def run_once(self) -> None:
        for hook in self._before_sleep:
            hook()
        self._close_pending()
        if not self.running:
            return
        timeout = -1.0
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if timers:
            timeout = max(0.0, timers[0][0] - self.clock())
        events = self._ep.poll(timeout)
        handlers = self._handlers
        for fd, ev in events:
            cb = handlers.get(fd)
            if cb is not None:   # unregistered earlier in this batch: stale event
                cb(ev)
        now = self.clock()
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.callback()

    def _close_pending(self) -> None:
        while self._to_close:
            obj = self._to_close.pop()
            try:
                obj.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close every descriptor the loop owns (not the registered ones)."""
        self._close_pending()
        if self._wake is not None:
            signal.set_wakeup_fd(-1)
            for s in self._wake:
                s.close()
            self._wake = None
        self._ep.close()


def _record_only(signum: int, frame: Any) -> None:
    """Python-level handler: the wakeup fd has recorded the signal already."""
