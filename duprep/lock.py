"""The instance lock file: who is alive, decided by the kernel.

Two independent kinds of lock on ``ipcnames.lock_path(instance)``:

* ``flock(LOCK_EX)`` -- the *gateway* lock, held by the acceptor for its
  whole life.  A second gateway with the same instance name fails to get it
  and refuses to start.
* POSIX record locks (``lockf``) -- byte 0 is the *attach* lock: every process
  that uses the instance's queues holds it shared.  A starting acceptor that
  can take it exclusively knows that no process of an earlier run is alive
  (the kernel drops the locks of killed processes), so it may unlink the
  objects a crash left behind.  Bytes ``ROW_LOCK_BASE + row`` claim process
  rows of the table (see table.py).

On Linux flock and record locks do not interact.  Record locks are per
process and vanish when the process closes *any* descriptor of the file, so
each process opens the file exactly once (this class) and keeps it open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from typing import Any

from . import ipcnames
from .errors import InstanceBusyError
from .table import ROW_LOCK_BASE

__all__ = ["InstanceLock"]


class InstanceLock:
    """The calling process's handle on an instance's lock file."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.path = ipcnames.lock_path(instance)
        self.fd = -1

    def open(self) -> "InstanceLock":
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- gateway ----------------------------------------------------------------

    def acquire_gateway(self, *, wait_attached: float = 5.0) -> None:
        """Take the gateway lock and the attach lock exclusively, or raise InstanceBusyError.

        Processes of an earlier run (receiver, sender, workers of a gateway
        that was killed) notice its death and exit; wait up to
        ``wait_attached`` seconds for them.
        """
        while True:
            self.open()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.close()
                raise InstanceBusyError(
                    f"instance {self.instance!r} is already served by a running gateway "
                    f"(lock {self.path} is held); stop it first or choose another --instance") from None
            # The file may have been unlinked by a gateway that stopped between
            # our open() and flock(): then we hold a lock nobody else can see.
            try:
                same = os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            self.close()
        if not _lockf_timed(self.fd, fcntl.LOCK_EX, 0, wait_attached):
            self.close()
            raise InstanceBusyError(
                f"processes of an earlier run of instance {self.instance!r} are still attached "
                f"(record lock on {self.path}); stop the business workers of that run first")

    def share_attach(self) -> None:
        """Downgrade the attach lock to shared (atomic for record locks) once set up."""
        fcntl.lockf(self.fd, fcntl.LOCK_SH, 1, 0)

    def unlink(self) -> None:
        """Remove the lock file (acceptor, at the very end, still holding the locks)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # --- everyone else ------------------------------------------------------------

    def attach(self, *, timeout: float = 5.0) -> None:
        """Hold the attach lock shared; waits while a gateway is still setting up."""
        self.open()
        if not _lockf_timed(self.fd, fcntl.LOCK_SH, 0, timeout):
            raise InstanceBusyError(f"instance {self.instance!r} did not finish starting within {timeout:g} s")

    def claim_row(self, first: int, last: int) -> int:
        """Claim the first free process row in [first, last); raise if none."""
        for row in range(first, last):
            if self.take_row(row):
                return row
        raise InstanceBusyError(f"all {last - first} worker rows of instance {self.instance!r} are taken")

    def take_row(self, row: int) -> bool:
        """Lock process row ``row`` if nobody holds it (its worker is gone); False if a worker does."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, ROW_LOCK_BASE + row)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False

    def release_row(self, row: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, ROW_LOCK_BASE + row)


def gateway_lock_held(instance: str) -> bool | None:
    """Does a live acceptor hold ``instance``'s gateway lock?  Looked up in /proc/locks, without
    taking anything (taking it, even for a moment, could make a starting gateway think the instance
    busy).  The kernel drops the lock when its holder dies, whatever pid namespace it ran in.
    None if /proc/locks cannot be read."""
    try:
        st = os.stat(ipcnames.lock_path(instance))
    except FileNotFoundError:
        return False
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4711 00:1a:123 0 EOF"; waiters have "->" after the number
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == want:
            return True
    return False


class _Expired(Exception):
    pass


def _lockf_timed(fd: int, kind: int, start: int, timeout: float) -> bool:
    """``lockf(kind)`` on one byte, waiting at most ``timeout`` seconds."""
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB, 1, start)
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES) or timeout <= 0:
            if timeout <= 0 and e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise

    def expire(signum: int, frame: Any) -> None:
        raise _Expired

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        fcntl.lockf(fd, kind, 1, start)    # blocks in the kernel until granted or the alarm
        return True
    except _Expired:
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
