"""Who a local process is: pid plus start time, and a pidfd that says when it dies.

A pid alone names a process only while it lives; the kernel hands the
number to the next process soon after.  ``(pid, start)`` -- ``start`` being
field 22 of ``/proc/PID/stat``, the start time in clock ticks after boot --
names one process for ever, so a reply for a dead process can never reach
the stranger who inherited its pid.

:func:`watch` turns a claimed identity into a pidfd (``os.pidfd_open``),
readable in epoll the moment that very process exits.  The order of checks
makes the answer exact: open the pidfd first, then compare the start time,
then make sure the pidfd's process has not exited yet.  While it is alive
its pid cannot be reused, so the stat we read was its own.

On the wire a local process is named by :func:`cpid`: its start time and
pid in one number, so an answer or push for a process that died can never
reach the stranger who got its pid (a pid alone would).

Owns nothing: the caller closes the returned pidfd.
"""

from __future__ import annotations

import os
import select
from typing import Final

__all__ = ["ProcessGone", "start_time", "watch", "exited", "cpid", "from_cpid", "PID_BITS"]

PID_BITS: Final = 22     # Linux's pid_max is at most 2**22


class ProcessGone(LookupError):
    """The process with this pid and start time does not exist (any more)."""


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat; raises ProcessGone if there is no such process.

    The command name (field 2) may hold spaces and parentheses, so fields
    are counted after the *last* ')'.
    """
    if not 0 < pid < 1 << PID_BITS:
        raise ProcessGone(f"{pid} is not a process id")
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"no process {pid}") from None
    fields = stat.rsplit(b")", 1)[1].split()
    return int(fields[19])       # fields[0] is field 3 (state), so field 22 is fields[19]


def exited(pidfd: int) -> bool:
    """True once the process behind ``pidfd`` has exited (zombie or reaped)."""
    p = select.poll()              # (not select(): it cannot take descriptors >= 1024)
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def watch(pid: int, start: int) -> int:
    """A pidfd for the live process ``(pid, start)``; raises ProcessGone otherwise.

    **Resource handling**: the caller owns the returned descriptor.
    """
    if not 0 < pid < 1 << PID_BITS:
        raise ProcessGone(f"{pid} is not a process id")
    try:
        pidfd = os.pidfd_open(int(pid))
    except ProcessLookupError:
        raise ProcessGone(f"process {pid} has exited") from None
    try:
        if start_time(pid) != start:
            raise ProcessGone(f"pid {pid} now belongs to another process (start time differs)")
        if exited(pidfd):
            raise ProcessGone(f"process {pid} has exited")
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def cpid(pid: int, start: int) -> int:
    """The wire name of process ``(pid, start)``: unique while the host is up, the pid in its low bits."""
    return start << PID_BITS | pid


def from_cpid(value: int) -> tuple[int, int]:
    """``(pid, start)`` of a :func:`cpid`."""
    return value & ((1 << PID_BITS) - 1), value >> PID_BITS
