"""Reads what the benchmark reports about server processes from /proc.

What: the processes of a server (its session: every peer is started with
``start_new_session=True``, so its session id is its leader's pid and covers
forked children, pool workers and duprep's roles alike), their memory (RSS and
PSS from ``/proc/PID/smaps_rollup``) and their CPU time (utime + stime from
``/proc/PID/stat``), and how many client connections a server still holds
(``/proc/net/tcp``).  Why /proc: it is what the issue asks for, needs no
extra package, and counts a process tree exactly.  Processes may exit while
being read; every reader skips those silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ProcInfo", "session_pids", "memory", "cpu_ticks", "cpu_ns", "tcp_held", "CLK_TCK"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcInfo:
    """Fields of /proc/PID/stat the benchmark uses."""

    pid: int
    state: str
    ppid: int
    session: int
    ticks: int          # utime + stime, in CLK_TCK units


def _stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    # rest[0]=state, 1=ppid, 2=pgrp, 3=session, ..., 11=utime, 12=stime
    return ProcInfo(pid, rest[0], int(rest[1]), int(rest[3]), int(rest[11]) + int(rest[12]))


def _all_stats() -> list[ProcInfo]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                out.append(info)
    return out


def session_pids(session: int, *, include_zombies: bool = False) -> list[int]:
    """Live processes whose session id is ``session`` (zombies left out by default)."""
    return sorted(p.pid for p in _all_stats()
                  if p.session == session and (include_zombies or p.state != "Z"))


def memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ``pids``; RSS double-counts shared pages, PSS does not."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith(b"Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def cpu_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime of each pid still alive (CLK_TCK units)."""
    out = {}
    for pid in pids:
        info = _stat(pid)
        if info is not None:
            out[pid] = info.ticks
    return out


def cpu_ns(pids: list[int]) -> dict[int, int]:
    """CPU time of each pid still alive in nanoseconds (/proc/PID/schedstat, first field).

    utime+stime count whole clock ticks (10 ms at 100 Hz) and are sampled, so
    a process that wakes for a few microseconds every second can be charged a
    full tick; the scheduler's own runtime counter is exact.
    """
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat", "rb") as f:
                out[pid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


# Server-side TCP states in which the server still holds a client's connection:
# SYN_RECV, ESTABLISHED and CLOSE_WAIT (the client closed, the server has not yet).
_HELD_STATES = frozenset({"03", "01", "08"})


def tcp_held(port: int) -> int:
    """Connections whose local port is ``port`` that the server has not closed yet."""
    held = 0
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split(None, 4)
                    if fields[1].endswith(suffix) and fields[3] in _HELD_STATES:
                        held += 1
        except OSError:
            continue
    return held
