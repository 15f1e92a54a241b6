"""Reads what the benchmark reports about server processes from /proc.

What: the processes of a server (its leader and every descendant: forked
children, pool workers and duprep's roles alike, whatever process group they
put themselves in), their memory (RSS and
PSS from ``/proc/PID/smaps_rollup``) and their CPU time (utime + stime from
``/proc/PID/stat``), and how many client connections a server still holds
(``/proc/net/tcp``).  Why /proc: it is what the issue asks for, needs no
extra package, and counts a process tree exactly.  Processes may exit while
being read; every reader skips those silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ProcInfo", "descendants", "start_time", "memory", "cpu_ticks", "cpu_ns", "role", "tcp_held", "CLK_TCK"]

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcInfo:
    """Fields of /proc/PID/stat the benchmark uses."""

    pid: int
    state: str
    ppid: int
    ticks: int          # utime + stime, in CLK_TCK units
    start: int          # start time after boot, in CLK_TCK units: (pid, start) names a process for good


def _stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2:].split()
    # rest[0]=state, 1=ppid, 2=pgrp, 3=session, ..., 11=utime, 12=stime, ..., 19=starttime
    return ProcInfo(pid, rest[0], int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19]))


def _all_stats() -> list[ProcInfo]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = _stat(int(name))
            if info is not None:
                out.append(info)
    return out


def descendants(pid: int) -> list[ProcInfo]:
    """Every live process below ``pid`` in the process tree (zombies left out)."""
    children: dict[int, list[ProcInfo]] = {}
    for p in _all_stats():
        if p.state != "Z":
            children.setdefault(p.ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def start_time(pid: int) -> int | None:
    """The start time of live process ``pid`` (None if it is gone or a zombie)."""
    info = _stat(pid)
    return None if info is None or info.state == "Z" else info.start


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


def role(pid: int, leader: int) -> str:
    """What a server's process is, for the CPU breakdown: duprep's role from its command line
    (acceptor, receiver, sender, worker), else "main" for the leader and "child" for the others."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    for w in words:
        if w.startswith("duprep.gateway."):
            return w.rsplit(".", 1)[1]
    if "duprep" in words[:-1]:
        sub = words[words.index("duprep") + 1]
        return {"serve": "acceptor"}.get(sub, sub)
    return "main" if pid == leader else "child"


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
