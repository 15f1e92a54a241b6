"""Answering for a dead worker: ERROR WORKER_LOST for the requests it held.

A worker takes requests a queue message at a time and keeps a copy of the
message it is working on in its row's HAND region (``table.InHand``).  When
it dies, whoever takes the row next -- the acceptor as it reaps a worker it
supervises, or the next worker to claim the row (an external worker that
systemd restarted) -- calls :func:`take_over` while holding the row's lock:
every REQUEST of that message whose answer had not reached the reply queue
gets ``ERROR(msgid, cpid, WORKER_LOST)`` at once, instead of its client
waiting for a timeout; a SEND (nothing comes back) is only counted.  The
row's counters are made to add up again (the lost requests count as
handled), so the gateway's graceful stop does not wait for answers that
cannot come.

What is not covered: answers the dead worker kept because the reply queue
was full (its row's ``state``), and requests it had DEFERRED (their final
answer was the application's to give).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import msgspec

from .frame import BatchPacker, Deliver, Error, ErrorCode, Request, decode_chunks, encode_wire
from .lock import InstanceLock
from .table import COUNTERS, Role, Table

__all__ = ["Lost", "take_over", "requests_of"]

log = logging.getLogger("duprep")

C_REQUESTS, C_HELD, C_LOST = (COUNTERS[Role.WORKER].index(n) for n in ("requests", "held", "lost"))
MESSAGE = "the business worker handling this request died before answering it; it may have been partly processed"


class Lost(NamedTuple):
    """What a dead worker held, as :func:`take_over` found it."""
    pid: int                 # the dead worker's
    answered: list[bytes]    # reply-queue messages: one ERROR WORKER_LOST per unanswered REQUEST
    requests: int            # REQUESTs among them
    sends: int               # SENDs lost (nothing to answer)


def requests_of(message: bytes) -> list[Request]:
    """A request-queue message's requests, in the order a Worker hands them out.

    A Chunk with a malformed frame contributes the good frames before it, as
    in ``Worker._expand`` (the worker answered the bad one and ended that
    connection the moment it took the message).
    """
    return _frames_of(message)[0]


def _frames_of(message: bytes) -> tuple[list[Request], int]:
    """:func:`requests_of`, and how many frames the worker counted as handled when it dropped them."""
    out: list[Request] = []
    dropped = 0
    for _chunk, requests in decode_chunks(message):
        if type(requests) is list:
            out.extend(requests)
        else:
            out.extend(requests.requests)    # type: ignore[union-attr]
            dropped += requests.dropped      # type: ignore[union-attr]
    return out, dropped


def take_over(table: Table, row: int) -> Lost | None:
    """Answer for the dead worker of ``row``; None if it left nothing unanswered.

    The caller holds the row's lock (so its owner is dead or gone), sends
    ``Lost.answered`` on the reply queue, and owns the row's counters only
    for this call.  The HAND region is empty afterwards.
    """
    hand = table.in_hand(row)
    part = table.proc_part(row)
    pid, role, _state, index, pad, started, heartbeat, *counters = part.read_own()   # the row is ours now
    held = hand.read()
    requests: list[Request] = []
    if held is None:
        # Nothing unanswered; but it may have died before publishing the count of its last message.
        counters[C_REQUESTS] = max(counters[C_REQUESTS], hand.done())
    else:
        message, done, base = held
        try:
            every, dropped = _frames_of(message)
        except (msgspec.DecodeError, ValueError) as e:     # cannot happen: the worker decoded it
            log.error("row %d: the message its worker held is undecodable (%s); its requests are lost", row, e)
            every, dropped = [], 0
        requests = every[done:]
        # Every frame of the message counts as handled now (answered, WORKER_LOST, or dropped), whatever
        # the dead worker had published of them: the drain compares this sum with the receiver's count.
        counters[C_REQUESTS] = base + len(every) + dropped
        counters[C_LOST] += len(requests)
    packer = BatchPacker(table.msgsize)
    sends = 0
    for r in requests:
        if r.oneway:
            sends += 1
        else:
            packer.add(Deliver(r.sid, r.generation,
                               encode_wire(Error(r.msgid, r.cpid, ErrorCode.WORKER_LOST, MESSAGE))))
    counters[C_HELD] = 0
    if pid or role:                  # (a row never used stays all zero)
        part.write(pid, role, 0, index, pad, started, heartbeat, *counters)
    hand.clear(counters[C_REQUESTS])
    return Lost(pid, packer.take(), len(requests) - sends, sends) if requests else None


def answer_for(table: Table, lock: InstanceLock, pid: int) -> Lost | None:
    """A supervisor's half: worker ``pid`` died; take its row (if no worker has taken it since, which
    then answered for it) and answer for what it held (``take_over``)."""
    row = next((p.row for p in table.procs() if p.role == "worker" and p.pid == pid), None)
    if row is None or not lock.take_row(row):
        return None
    try:
        return take_over(table, row)
    finally:
        lock.release_row(row)

