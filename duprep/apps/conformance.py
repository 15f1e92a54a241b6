"""A business app for testing clients: echo, plus payloads that make the gateway send every answer.

Why: a client written from docs/protocol.md alone must handle DEFERRED,
application ERRORs, worker PUSHes, large replies, late replies and requests
that are never answered; an echo app produces none of them.  Run
``duprep serve --app duprep.apps.conformance:handle`` and send (protocol.md
1.14 is the normative list)::

    payload              answer
    anything else        REPLY with the payload (echo)
    fail:TEXT            ERROR APP_ERROR (11); its message is "RuntimeError: TEXT"
    defer:MS             DEFERRED, then about MS milliseconds later REPLY with the whole payload
    push:DATA            PUSH (source "", cpid 0) with DATA to the sender, and REPLY with the payload
    sleep:MS             REPLY with the payload, MS milliseconds later (client timeouts, late answers)
    size:N               REPLY of N bytes of b"x"; above the largest frame the queues carry,
                         ERROR APP_ERROR instead (protocol.md 1.13)
    none                 no answer at all

MS is capped at 10 000 and N at 16 MiB.  Deferred answers and pushes go out
through a ``bus.Replier`` of the worker's instance (``DUPREP_INSTANCE``, which
``duprep worker`` sets), from one thread per worker process.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time

from .. import bus
from ..bus import DEFERRED, Request

__all__ = ["handle"]

MAX_MS = 10_000
MAX_SIZE = 1 << 24

_lock = threading.Condition()
_due: list[tuple[float, int, Request]] = []      # deferred requests, by when to answer them
_order = itertools.count()
_replier: bus.Replier | None = None
_thread: threading.Thread | None = None


def handle(request: Request) -> bytes | None:
    data = request.data
    if data.startswith(b"fail:"):
        raise RuntimeError(data[5:].decode("utf-8", "replace"))
    if data.startswith(b"defer:"):
        _defer(request, _number(data[6:], MAX_MS))
        return DEFERRED
    if data.startswith(b"push:"):
        with _lock:
            _out().push(request.sid, data[5:])
        return data
    if data.startswith(b"sleep:"):
        time.sleep(_number(data[6:], MAX_MS) / 1000)
        return data
    if data.startswith(b"size:"):
        return b"x" * _number(data[5:], MAX_SIZE)
    if data == b"none":
        return None
    return data


def _number(text: bytes, cap: int) -> int:
    try:
        return max(0, min(cap, int(text)))
    except ValueError:
        raise ValueError(f"not a number: {text[:40]!r}") from None


def _out() -> bus.Replier:
    """The process's Replier (under ``_lock``)."""
    global _replier
    if _replier is None:
        _replier = bus.Replier(os.environ.get("DUPREP_INSTANCE", "default"))
    return _replier


def _defer(request: Request, ms: int) -> None:
    global _thread
    with _lock:
        heapq.heappush(_due, (time.monotonic() + ms / 1000, next(_order), request))
        if _thread is None:
            _thread = threading.Thread(target=_answer_deferred, name="conformance-defer", daemon=True)
            _thread.start()
        _lock.notify()


def _answer_deferred() -> None:
    with _lock:
        while True:
            if not _due:
                _lock.wait()
                continue
            wait = _due[0][0] - time.monotonic()
            if wait > 0:
                _lock.wait(wait)
                continue
            _, _, request = heapq.heappop(_due)
            try:
                _out().reply(request, request.data)
            except Exception:       # the gateway went away: nothing left to answer
                return
