"""The daemon's msgid map: which local request a gateway answer belongs to.

Every local process numbers its own requests from 1, so their msgids
collide on the shared link.  The daemon gives each request it forwards a
daemon-wide msgid (never reused while the daemon lives) and remembers
``wire msgid -> (endpoint, local msgid)``; the answer is mapped back and
the entry forgotten on the final answer (REPLY or ERROR; a DEFERRED keeps
it until the final REPLY).

Some answers never come: a handler that returns None sends none (documented
in protocol.md 1.6).  So the map is bounded twice over:

* a request with a deadline (``timeout_ms`` > 0) is forgotten ``grace``
  seconds after it, unless a DEFERRED came (the final answer of a deferred
  request may come much later); :meth:`Routes.expire` does it, from a timer
  that runs only while such routes exist.  An answer within the grace still
  reaches the local process, which hands it out as "late";
* at most ``max_routes`` requests are remembered at all (those without a
  deadline, deferred ones, or a flood within the grace): beyond that the
  oldest is forgotten and returned, so that its requester can be told.

When an endpoint goes away its entries become *orphans*: the answers may
still come, and must be discarded and counted rather than delivered to
anyone.  Orphans are remembered up to ``orphan_memory`` msgids (oldest
forgotten first) and all forgotten when the link is lost, because answers
never come on a dead connection.  So are requests answered with
``ERROR WORKER_LOST``: a REPLY may still follow (protocol.md 1.6), and it
goes to the endpoint, whose Client hands it out as "late".

Owns no descriptors.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

__all__ = ["Route", "Routes"]


class Route:
    """One forwarded request waiting for its answer."""

    __slots__ = ("ep", "msgid", "deferred", "due")

    def __init__(self, ep: int, msgid: int, due: float = 0.0) -> None:
        self.ep = ep                 # endpoint id that asked
        self.msgid = msgid           # its own msgid
        self.deferred = False        # a DEFERRED came; the final REPLY is still due
        self.due = due               # monotonic time its requester stops waiting (0: no deadline)


class Routes:
    """wire msgid -> Route, indexed by endpoint as well."""

    def __init__(self, *, orphan_memory: int = 100_000, max_routes: int = 100_000, grace: float = 10.0) -> None:
        self._ids = itertools.count(1)
        self._live: OrderedDict[int, Route] = OrderedDict()     # oldest first
        self._by_ep: dict[int, set[int]] = {}
        self._orphans: OrderedDict[int, int] = OrderedDict()   # wire msgid -> endpoint id
        self._lost: OrderedDict[int, Route] = OrderedDict()    # answered WORKER_LOST: a REPLY may follow
        self.orphan_memory = orphan_memory
        self.max_routes = max_routes
        self.grace = grace

    def next_id(self) -> int:
        """A fresh daemon-wide msgid (also for SENDs, which need no route)."""
        return next(self._ids)

    def add(self, ep: int, msgid: int, *, due: float = 0.0) -> tuple[int, Route | None]:
        """Remember a request of endpoint ``ep`` (its requester waits until ``due``, 0: for ever).

        Returns its wire msgid, and the oldest route if it had to be
        forgotten to stay within ``max_routes`` (its requester must be told).
        """
        wire = next(self._ids)
        self._live[wire] = Route(ep, msgid, due)
        self._by_ep.setdefault(ep, set()).add(wire)
        if len(self._live) <= self.max_routes:
            return wire, None
        old, route = self._live.popitem(last=False)
        self._unindex(old, route)
        return wire, route

    def _unindex(self, wire: int, route: Route) -> None:
        ids = self._by_ep.get(route.ep)
        if ids is not None:
            ids.discard(wire)
            if not ids:
                del self._by_ep[route.ep]

    def resolve(self, wire: int, *, final: bool) -> Route | None:
        """The route of an answer; forgotten if ``final``.  None if unknown or orphaned."""
        route = self._live.get(wire)
        if route is None:
            if final:                 # the answer that may follow a WORKER_LOST: the last one
                return self._lost.pop(wire, None)
            return None
        if final:
            del self._live[wire]
            self._unindex(wire, route)
        else:
            route.deferred = True
        return route

    def worker_lost(self, wire: int, route: Route) -> None:
        """``route`` was answered ERROR WORKER_LOST: keep it for a REPLY that may still follow."""
        self._lost[wire] = route
        while len(self._lost) > self.orphan_memory:
            self._lost.popitem(last=False)

    def take_orphan(self, wire: int, *, final: bool) -> bool:
        """True if ``wire`` belonged to an endpoint that is gone (forgotten if ``final``)."""
        if wire not in self._orphans:
            return False
        if final:
            del self._orphans[wire]
        return True

    def in_flight(self, ep: int) -> tuple[int, int]:
        """``(waiting, deferred)`` request counts of endpoint ``ep``."""
        ids = self._by_ep.get(ep, ())
        deferred = sum(1 for w in ids if self._live[w].deferred)
        return len(ids) - deferred, deferred

    def orphan(self, ep: int) -> int:
        """Endpoint ``ep`` is gone: its routes become orphans; return how many."""
        ids = self._by_ep.pop(ep, set())
        for wire in ids:
            del self._live[wire]
            self._orphans[wire] = ep
        while len(self._orphans) > self.orphan_memory:
            self._orphans.popitem(last=False)
        return len(ids)

    def fail_all(self) -> dict[int, list[int]]:
        """The link is gone: forget everything; return ``{ep: [local msgids]}`` to fail."""
        failed: dict[int, list[int]] = {}
        for route in self._live.values():
            failed.setdefault(route.ep, []).append(route.msgid)
        self._live.clear()
        self._by_ep.clear()
        self._orphans.clear()
        self._lost.clear()
        return failed

    def expire(self, now: float) -> tuple[int, bool]:
        """Forget the routes whose requester stopped waiting more than ``grace`` seconds ago.

        Deferred routes stay (their final answer may come much later).
        Returns ``(forgotten, more)``: ``more`` if routes with a deadline
        remain, so the caller knows whether to look again.
        """
        limit = now - self.grace
        gone = [w for w, r in self._live.items() if r.due and not r.deferred and r.due <= limit]
        for wire in gone:
            self._unindex(wire, self._live.pop(wire))
        more = any(r.due and not r.deferred for r in self._live.values())
        return len(gone), more

    def waiting(self, *, include_deferred: bool = True) -> int:
        """Requests still expecting an answer (for the graceful stop)."""
        if include_deferred:
            return len(self._live)
        return sum(1 for r in self._live.values() if not r.deferred)

    def overdue(self, now: float) -> int:
        """Requests whose requester has stopped waiting (kept for the grace, in case a late answer comes)."""
        return sum(1 for r in self._live.values() if r.due and not r.deferred and r.due <= now)

    def last_due(self) -> float | None:
        """When the last requester still waiting for an answer gives up (None: one waits for ever).

        A graceful stop need not wait beyond it: later answers are late ones.
        """
        last = 0.0
        for r in self._live.values():
            if not r.deferred:
                if not r.due:
                    return None
                last = max(last, r.due)
        return last

    @property
    def orphans(self) -> int:
        return len(self._orphans)
