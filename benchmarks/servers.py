"""Starting and stopping peer servers, each in a process group of its own.

What: :class:`Server` wraps one server's leader process, started in a new
process group (``process_group=0``) but in the harness's session.  Its
processes are the leader and its descendants, remembered by (pid, start
time) from the first time they are seen, so that children that outlive the
leader are still found; :meth:`Server.stop` signals it, waits with a
deadline, then SIGKILLs whatever is still alive and reports it.

Why not a session of its own (as the first version did): with the kernel's
autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on by
default), every session is a scheduling group, and a server in its own
session competes *as a whole* with the load generator's session.  That
halves the CPU share of every multi-process server against the
single-process C line whenever the load generator is busy (measured here:
duprep 475k against 665k replies/s, same binary, same load).  In one session
all processes compete one by one, as on a host where the clients are
elsewhere.  :func:`start_announcing` starts a peer that prints
``{"port": N}`` on stdout when it accepts connections and waits for that line.
Why: every process the benchmark starts must end, on success, on error and on
Ctrl-C, and the memory probe must know exactly which processes to count.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procfs

__all__ = ["ServerError", "StopReport", "Server", "start_announcing", "wait_until", "log_tail",
           "term_with_parent"]

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server did not start, or died."""


@dataclass
class StopReport:
    """How a server ended."""

    exit_code: int | None
    forced: bool = False                        # had to SIGKILL the leader
    leftovers_killed: list[int] = field(default_factory=list)   # processes still alive after it
    notes: list[str] = field(default_factory=list)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))


def term_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux prctl).

    Used as ``preexec_fn`` for server leaders (and by forking peers for their
    workers): if the harness is SIGKILLed and cannot run its finally blocks,
    the servers it started still stop.  Best effort: silently does nothing
    where prctl is unavailable.
    """
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Server:
    """A running server: leader process, port, and the processes below it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path, *,
                 stop_signal_group: bool = True, on_stopped: Callable[[StopReport], None] | None = None) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self._group = stop_signal_group
        self._on_stopped = on_stopped
        self._report: StopReport | None = None
        self._seen: dict[int, int] = {}        # pid -> start time of every process of the server seen so far
        self.setup = ""       # what the server chose for itself that a result should show (duprep: its queues)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """Every live process of this server: the leader, its descendants, and those seen before that
        outlived their parent (checked by start time, so a reused pid is never taken for one)."""
        live = {}
        start = procfs.start_time(self.pid)
        if start is not None:
            live[self.pid] = start
            live.update((p.pid, p.start) for p in procfs.descendants(self.pid))
        for pid, start in list(self._seen.items()):
            if pid not in live:
                if procfs.start_time(pid) == start:
                    live[pid] = start
                else:
                    del self._seen[pid]
        self._seen.update(live)
        return sorted(live)

    def stop(self, timeout: float = 15.0) -> StopReport:
        """SIGTERM (the group, or the leader alone for duprep), wait, then SIGKILL what is left."""
        if self._report is not None:
            return self._report
        report = StopReport(exit_code=self.proc.poll())
        if report.exit_code is None:
            try:
                if self._group:
                    os.killpg(self.pid, signal.SIGTERM)
                else:
                    os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                report.exit_code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                report.forced = True
                report.notes.append(f"leader did not exit within {timeout:.0f}s of SIGTERM; SIGKILLed")
                _killpg(self.pid, signal.SIGKILL)
                report.exit_code = self.proc.wait(timeout=timeout)
        # Processes that outlive the leader (children finishing up): give them a moment, then
        # kill them and say so.
        if not wait_until(lambda: not self.pids(), 5.0):
            left = self.pids()
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            report.leftovers_killed = left
            report.notes.append(f"{len(left)} process(es) of the server outlived the leader; SIGKILLed")
            wait_until(lambda: not self.pids(), 5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._report = report
        if self._on_stopped is not None:
            self._on_stopped(report)
        return report

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start_announcing(cmd: list[str], *, env: dict[str, str], cwd: Path, log_path: Path,
                     timeout: float = 60.0) -> Server:
    """Start ``cmd`` in a new process group and wait for its ``{"port": N}`` line on stdout."""
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                cwd=cwd, env=env, process_group=0, preexec_fn=term_with_parent)
    finally:
        log.close()
    server = Server(proc, 0, log_path)
    try:
        line = _read_line(proc, timeout)
        try:
            server.port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            raise ServerError(f"unexpected readiness line {line!r}") from None
    except ServerError as exc:
        server.stop()
        raise ServerError(f"{exc}\n{log_tail(log_path)}") from None
    except BaseException:
        server.stop()
        raise
    return server


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(f"no readiness line within {timeout:.0f}s")
            if sel.select(left):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise ServerError(f"exited with {proc.wait()} before it was ready")
                buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace")
