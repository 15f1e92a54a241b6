"""The instance lock file: who is alive, decided by the kernel.

Two independent kinds of lock on ``ipcnames.lock_path(instance)``:

* ``flock(LOCK_EX)`` -- the *gateway* lock, held by the acceptor for its
  whole life.  A second gateway with the same instance name fails to get it
  and refuses to start.  ``duprep status`` finds it in /proc/locks
  (:func:`gateway_lock_held`), which works for a gateway in another pid
  namespace too.
* open file description (OFD) record locks (``fcntl(F_OFD_SETLK)``) -- byte
  1, held exclusively by the acceptor beside its flock, lets anyone ask
  whether a gateway is alive (``F_OFD_GETLK``), from any pid namespace; byte
  0 is the *attach* lock: every process that uses the instance's queues holds
  it shared.  A starting acceptor that can take it exclusively knows that no
  process of an earlier run is alive (the kernel drops the locks of killed
  processes), so it may unlink the objects a crash left behind.  Bytes
  ``ROW_LOCK_BASE + row`` claim process rows of the table (see table.py).

On Linux flock and record locks do not interact.  Why OFD locks and not
``lockf``: classic POSIX record locks belong to the *process*, so two
Workers (or a Worker and a Replier) in one process would share them -- both
would get the same row -- and closing any descriptor of the file (one
Replier's ``close()``) would drop every record lock of the process, letting
another process take a live worker's row.  An OFD lock belongs to the open
file description: each :class:`InstanceLock` ``open()``s the file itself, so
its locks conflict with every other InstanceLock's, in this process or
another, and vanish only when it closes its descriptor or its process dies.
OFD locks conflict with classic record locks as well, so a duprep that still
used ``lockf`` would see them.

Two consequences.  (1) OFD locks have no owning pid: /proc/locks shows them
as ``OFDLCK`` with pid -1 and ``F_OFD_GETLK`` reports ``l_pid`` -1, so nothing
may learn a holder's pid from them (status takes pids from the table rows
and asks only "is this row's lock held?", :func:`rows_held`).  (2) A child of
``fork()`` shares its parent's open file descriptions, and with them the
parent's locks: it would keep them alive after the parent died.  So a forked
child closes its inherited copies at once (``os.register_at_fork``) and must
open its own, as classic record locks are not inherited either; the
descriptor is ``O_CLOEXEC``, so an ``exec``ed child never has it.

Waiting for a lock (a gateway still booting holds the attach byte
exclusively) retries the non-blocking request with a short backoff until
the deadline: no SIGALRM, so it works in any thread and leaves the
application's timers and handlers alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import weakref

from . import ipcnames
from .errors import InstanceBusyError
from .table import ROW_LOCK_BASE

__all__ = ["InstanceLock", "gateway_lock_held", "rows_held"]

ATTACH_BYTE = 0
GATEWAY_BYTE = 1          # held exclusively by the acceptor beside its flock: askable from anywhere
# struct flock on Linux (64-bit): l_type, l_whence, (pad), l_start, l_len, l_pid, (pad)
_FLOCK = struct.Struct("@hhqqi4x")
_BUSY = (errno.EAGAIN, errno.EACCES)
WAIT_STEP_MAX = 0.01      # seconds: the longest pause between two tries while waiting for a lock

_open_locks: "weakref.WeakSet[InstanceLock]" = weakref.WeakSet()    # for the fork handler


class InstanceLock:
    """One handle on an instance's lock file, with locks of its own.

    Every Worker, Replier and acceptor has one; each holds its locks
    independently of any other InstanceLock, also in the same process.
    """

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.path = ipcnames.lock_path(instance)
        self.fd = -1

    def open(self) -> "InstanceLock":
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            _open_locks.add(self)
        return self

    def close(self) -> None:
        """Close the descriptor: this releases every lock this object holds (and only those)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _open_locks.discard(self)

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
            if same and _try(self.fd, fcntl.F_WRLCK, GATEWAY_BYTE):
                break
            self.close()
        if not _lock_timed(self.fd, fcntl.F_WRLCK, ATTACH_BYTE, wait_attached):
            self.close()
            raise InstanceBusyError(
                f"processes of an earlier run of instance {self.instance!r} are still attached "
                f"(record lock on {self.path}); stop the business workers of that run first")

    def share_attach(self) -> None:
        """Downgrade the attach lock to shared (atomic for record locks) once set up."""
        _set(self.fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, ATTACH_BYTE)

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
        if not _lock_timed(self.fd, fcntl.F_RDLCK, ATTACH_BYTE, timeout):
            raise InstanceBusyError(f"instance {self.instance!r} did not finish starting within {timeout:g} s")

    def claim_row(self, first: int, last: int) -> int:
        """Claim the first free process row in [first, last); raise if none."""
        for row in range(first, last):
            if self.take_row(row):
                return row
        raise InstanceBusyError(f"all {last - first} worker rows of instance {self.instance!r} are taken")

    def take_row(self, row: int) -> bool:
        """Lock process row ``row`` if nobody holds it (its worker is gone); False if a worker does."""
        return _try(self.fd, fcntl.F_WRLCK, ROW_LOCK_BASE + row)

    def release_row(self, row: int) -> None:
        _set(self.fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, ROW_LOCK_BASE + row)


def _forget_inherited() -> None:
    """In a forked child: close the InstanceLock descriptors inherited from the parent.

    They share the parent's open file descriptions and so its OFD locks;
    kept, they would hold the parent's rows and attach lock after the parent
    died.  Closing the child's copies leaves the parent's locks as they are.
    """
    for lock in list(_open_locks):
        if lock.fd >= 0:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = -1
    _open_locks.clear()


os.register_at_fork(after_in_child=_forget_inherited)


def gateway_lock_held(instance: str) -> bool | None:
    """Does a live acceptor hold ``instance``'s gateway lock?  Asked without taking anything (taking
    it, even for a moment, could make a starting gateway think the instance busy): ``F_OFD_GETLK``
    on GATEWAY_BYTE, which the acceptor holds beside its flock, answers in any pid namespace (the
    /proc/locks of a child namespace hides the flock of a process outside it); /proc/locks is the
    fallback for a lock file we may not open.  The kernel drops both when the acceptor dies.
    None if neither can be read."""
    path = ipcnames.lock_path(instance)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    else:
        try:
            return _held(fd, GATEWAY_BYTE)
        finally:
            os.close(fd)
    try:
        st = os.stat(path)
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
        # "1: FLOCK  ADVISORY  WRITE 4711 00:1a:123 0 EOF"; waiters have "->" after the number.
        # (The record locks are "OFDLCK" lines with pid -1: never confused with this one.)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE" and fields[5] == want:
            return True
    return False


def rows_held(instance: str, rows: list[int]) -> dict[int, bool] | None:
    """Which of these process rows are claimed right now (their worker lives)?

    Asked with ``F_OFD_GETLK`` through a descriptor of our own, which takes
    no lock and conflicts with every holder, in any process and any pid
    namespace.  No lock file: nobody holds anything.  None if the file
    cannot be opened (another user's): the caller judges otherwise.
    """
    try:
        fd = os.open(ipcnames.lock_path(instance), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {row: False for row in rows}
    except OSError:
        return None
    try:
        return {row: _held(fd, ROW_LOCK_BASE + row) for row in rows}
    finally:
        os.close(fd)


def _set(fd: int, cmd: int, kind: int, start: int) -> bytes:
    """``fcntl(fd, cmd)`` with an OFD lock request for the one byte at ``start``."""
    result: bytes = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))
    return result


def _try(fd: int, kind: int, start: int) -> bool:
    """Take (or convert to) ``kind`` on byte ``start`` if nobody else's lock is in the way."""
    try:
        _set(fd, fcntl.F_OFD_SETLK, kind, start)
        return True
    except OSError as e:
        if e.errno not in _BUSY:
            raise
        return False


def _held(fd: int, start: int) -> bool:
    """Does any open file description but ``fd``'s hold a lock on byte ``start``?"""
    kind = _FLOCK.unpack(_set(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, start))[0]
    return bool(kind != fcntl.F_UNLCK)


def _lock_timed(fd: int, kind: int, start: int, timeout: float) -> bool:
    """Take ``kind`` on byte ``start``, waiting at most ``timeout`` seconds; False if it stayed taken.

    The wait retries the non-blocking request with a backoff from 1 ms up to
    WAIT_STEP_MAX: a lock is granted at most that late after it is freed.
    It happens only while a gateway boots (or an earlier run's processes
    exit), so polling costs nothing in steady state; a blocking F_OFD_SETLKW
    could only be cut short with a signal, which works in the main thread
    only and would take the application's SIGALRM and timer.
    """
    deadline = time.monotonic() + timeout
    step = 0.001
    while not _try(fd, kind, start):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(step, left))
        step = min(2 * step, WAIT_STEP_MAX)
    return True
