"""What a client's ``receive()`` hands out, bounded where other parties decide the rate.

Pushes and relays arrive whenever a worker or another client sends them; a
process that calls ``receive()`` less often than they come would otherwise
hold every one of them in memory.  So pushes and relays are kept only while
the messages waiting stay under ``max_bytes``; beyond it they are dropped and
counted (``dropped``), with one warning in the log.  Late and deferred
answers and errors are always kept, and take none of that room: they
answer this client's own requests (a client tracks at most
``client.REMEMBER`` of them), and a pile of late replies must not get
pushes dropped.
"""

from __future__ import annotations

import logging
import queue
import threading

__all__ = ["Inbox", "DEFAULT_MAX_BYTES"]

log = logging.getLogger("duprep")

DEFAULT_MAX_BYTES = 16 << 20    # bytes of pushes and relays a client holds for receive()
OVERHEAD = 200                  # what one held message costs beside its data (object, queue slot)


class Inbox:
    """A FIFO of messages for ``receive()``: bounded for pushes and relays, not for answers."""

    __slots__ = ("max_bytes", "dropped", "_q", "_lock", "_bytes", "_warned")

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError("max_inbox must be >= 0")
        self.max_bytes = max_bytes
        self.dropped = 0                  # pushes and relays dropped because receive() fell behind
        self._q: queue.SimpleQueue[tuple[object, int]] = queue.SimpleQueue()   # (item, bytes it counts)
        self._lock = threading.Lock()
        self._bytes = 0
        self._warned = False

    def put(self, item: object) -> None:
        """Keep ``item`` (an answer, or a marker such as "closed"), whatever the size, outside the bound."""
        self._q.put((item, 0))

    def offer(self, item: object) -> bool:
        """Keep a push or relay if there is room; else drop and count it (False)."""
        size = len(getattr(item, "data", b"")) + OVERHEAD
        with self._lock:
            kept = self._bytes + size <= self.max_bytes
            if kept:
                self._bytes += size
            else:
                self.dropped += 1
                warn, self._warned = not self._warned, True
        if kept:
            self._q.put((item, size))
            return True
        if warn:
            log.warning("pushes arrive faster than receive() takes them: dropping those above %d bytes "
                        "waiting (counted in pushes_dropped)", self.max_bytes)
        return False

    def get(self, timeout: float | None) -> object:
        """The next item; raises queue.Empty after ``timeout`` seconds (None: wait for ever; 0: do not wait)."""
        item, size = self._q.get(timeout=timeout) if timeout is None or timeout > 0 else self._q.get_nowait()
        if size:
            with self._lock:
                self._bytes -= size
        return item
