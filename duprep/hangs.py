"""Hung processes: what a supervisor does about a child that stopped showing life.

gunicorn's ``murder_workers`` on the table's heartbeats.  Every process of an
instance publishes a heartbeat in its table row at least every ``heartbeat``
seconds while its loop runs (a worker also each time it takes a queue
message, every second while it works through one if a handler call began
since (``bus._Pulse``), and while it waits for room on the reply queue).  A
supervised process that has a row (a worker still importing its app has none
yet) and whose last heartbeat is older than ``hang_timeout`` -- a handler that
never returns, a loop that spins, a process stopped with SIGSTOP -- is aborted
with SIGABRT, so that faulthandler writes its Python traceback to the log, and
killed if it is still there ABORT_GRACE seconds later.  Its supervisor then
handles it as a crash: it answers what it held (WORKER_LOST) and replaces it.

Used by the gateway's acceptor for its children and by ``duprep worker -n N``
for its workers; both take the limits from the table's header, so one setting
(``duprep serve --hang-timeout``) holds for the whole instance.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Final, Iterable, Mapping

from . import ipcnames
from .errors import DuprepError
from .table import Table

__all__ = ["ABORT_GRACE", "overdue", "rowless", "abort", "kill", "Watch"]

log = logging.getLogger("duprep")

ABORT_GRACE: Final = 5.0      # seconds between SIGABRT (traceback, then core or exit) and SIGKILL


def overdue(table: Table, pids: Iterable[int], limit: float, now: float,
            spawned: Mapping[int, float] | None = None) -> tuple[dict[int, float], float]:
    """Which of these processes have shown no life for ``limit`` seconds.

    A process's last sign of life is its row's heartbeat.  One without a row yet is not judged (see
    :func:`rowless`): a worker importing a slow app, or waiting for its gateway (``--wait``), has not
    started serving.  ``spawned``: when each process was started (``time.time()``); a row begun
    before that is an earlier process's that had the same pid, not this one's.  Returns
    ``({pid: seconds silent}, when the next one could be overdue)``.
    """
    wanted = set(pids)
    since = spawned or {}
    beats: dict[int, float] = {}
    for p in table.procs():
        if p.pid in wanted and p.started >= since.get(p.pid, 0.0) - CLOCK_SLACK:
            beats[p.pid] = max(beats.get(p.pid, 0.0), p.heartbeat)
    late: dict[int, float] = {}
    next_check = now + limit          # (a process that takes a row later is due after that)
    for pid, last in beats.items():
        if now - last >= limit:
            late[pid] = now - last
        else:
            next_check = min(next_check, last + limit)
    return late, next_check


CLOCK_SLACK = 1.0    # seconds: a row started this much before the spawn time we know still counts


def rowless(table: Table, pids: Iterable[int]) -> set[int]:
    """Those of these processes that have no row in the table (yet)."""
    return set(pids) - {p.pid for p in table.procs()}


def abort(pidfd: int) -> None:
    """SIGABRT, then SIGCONT so that a stopped process acts on it; nothing if the process is gone."""
    for sig in (signal.SIGABRT, signal.SIGCONT):
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            return


def kill(pidfd: int) -> None:
    """SIGKILL, for a process that did not die of SIGABRT (traced, or blocked in the kernel)."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Watch:
    """The hang check for a supervisor without an event loop of its own (``duprep worker -n N``).

    Call :meth:`timeout` for the wait's timeout and :meth:`check` when it expires.  The table is
    attached afresh at each check: a gateway started again meanwhile has a new one.
    """

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.pidfds: dict[int, int] = {}         # pid -> pidfd, for each live worker
        self.spawned: dict[int, float] = {}      # pid -> time.time() it was added (overdue: pid reuse)
        self.kill_at: dict[int, float] = {}      # aborted pid -> when SIGKILL follows
        self.next_check: float | None = time.monotonic()   # the first check reads the limit from the table

    def add(self, pid: int, pidfd: int) -> None:
        self.pidfds[pid] = pidfd
        self.spawned[pid] = time.time()

    def remove(self, pid: int) -> None:
        self.pidfds.pop(pid, None)
        self.spawned.pop(pid, None)
        self.kill_at.pop(pid, None)

    def timeout(self) -> float | None:
        """Seconds until :meth:`check` has something to do, None for never."""
        deadlines = list(self.kill_at.values())
        if self.next_check is not None and self.pidfds:
            deadlines.append(self.next_check)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def check(self) -> None:
        now = time.monotonic()
        for pid, at in list(self.kill_at.items()):
            if at <= now:
                log.error("worker %d still there %g s after SIGABRT: killing it", pid, ABORT_GRACE)
                kill(self.pidfds[pid])
                del self.kill_at[pid]
        if self.next_check is None or now < self.next_check:
            return
        try:
            table = Table.attach(ipcnames.table_name(self.instance))
        except (FileNotFoundError, DuprepError, OSError):
            self.next_check = now + 1.0          # no gateway yet (or any more): look again
            return
        try:
            limit = table.get("hang_timeout")
            if not limit:
                self.next_check = None           # hang checks are off for this instance
                return
            watched = [pid for pid in self.pidfds if pid not in self.kill_at]
            late, self.next_check = overdue(table, watched, limit, now, self.spawned)
        finally:
            table.close()
        for pid, silent in late.items():
            log.error("worker %d showed no sign of life for %.0f s (hang_timeout %g of the gateway): aborting "
                      "it with SIGABRT (its traceback follows) and replacing it", pid, silent, limit)
            abort(self.pidfds[pid])
            self.kill_at[pid] = now + ABORT_GRACE
