"""The client daemon's claim on an instance: lock, published info, crash cleanup.

Owns three files in ``ipcnames.LOCK_DIR`` (``/dev/shm``) and removes them on
a clean exit:

* ``duprep-ch.<i>.lock`` -- held with ``flock(LOCK_EX)`` for the daemon's
  whole life.  A second daemon for the instance fails to take it and
  refuses to start; a daemon that takes it knows that no daemon of the
  instance is alive (the kernel drops the locks of killed processes), so
  whatever an earlier run left behind may go.
* ``duprep-ch.<i>.info`` -- what a local process needs before it can
  attach: the daemon's pid and start time (to watch it with a pidfd), the
  uplink queue name and the reply queue size to create.  Written by
  rename, so a reader sees the old file, the new one or none.
* ``duprep-ch.<i>.queues`` -- the reply queues the daemon knows of, one per
  line, so that the next run can remove those of processes that died while
  no daemon was watching even where ``/dev/mqueue`` is not mounted.

Stale reply queues are judged one by one from their names: the owner
``(pid, start)`` is alive -> keep it and watch the owner (it re-attaches and
removes the queue itself); dead -> unlink it now.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass

import msgspec
import posix_ipc

from .. import ipcnames, queues
from ..errors import BrokenResourceError, InstanceBusyError
from . import procid

__all__ = ["DaemonInfo", "DaemonLock", "publish_info", "read_info", "write_registry",
           "stale_reply_queues", "remove_stale", "cleanup", "crashed"]

log = logging.getLogger("duprep")
MQUEUE_FS = ipcnames.MQUEUE_DIR


class DaemonInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The contents of the info file."""
    version: int
    pid: int
    start: int
    uplink: str
    uplink_size: int
    reply_depth: int
    reply_size: int
    server: str
    name: str


class DaemonLock:
    """``flock(LOCK_EX)`` on the daemon lock file, held until :meth:`release`."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.path = ipcnames.clienthost_lock_path(instance)
        self.fd = -1

    def acquire(self) -> None:
        """Take the lock or raise InstanceBusyError."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InstanceBusyError(
                    f"a client daemon for instance {self.instance!r} is already running "
                    f"(lock {self.path} is held); stop it first or choose another --instance") from None
            # A daemon that stopped between our open() and flock() unlinked the
            # file: then we would hold a lock nobody else can see.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file while still holding it, then let go."""
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def publish_info(instance: str, info: DaemonInfo) -> None:
    _write_atomic(ipcnames.clienthost_info_path(instance), msgspec.json.encode(info))


def read_info(instance: str) -> DaemonInfo:
    """The running daemon's info; raises BrokenResourceError if there is none."""
    path = ipcnames.clienthost_info_path(instance)
    try:
        with open(path, "rb") as f:
            return msgspec.json.decode(f.read(), type=DaemonInfo)
    except FileNotFoundError:
        raise BrokenResourceError(
            f"no client daemon is running for instance {instance!r} (no {path}); start one with "
            f"'duprep client-daemon --instance {instance} --server HOST:PORT'") from None
    except (msgspec.DecodeError, ValueError) as e:
        raise BrokenResourceError(f"unreadable client daemon info {path}: {e}") from None


def write_registry(instance: str, names: list[str]) -> None:
    _write_atomic(ipcnames.clienthost_registry_path(instance), "".join(n + "\n" for n in names).encode())


def stale_reply_queues(instance: str) -> set[str]:
    """Reply queue names of ``instance`` that may exist: from /dev/mqueue and the registry."""
    prefix = ipcnames.clienthost_reply_prefix(instance)
    found: set[str] = set()
    try:
        for entry in os.listdir(MQUEUE_FS):
            if ("/" + entry).startswith(prefix):
                found.add("/" + entry)
    except OSError:
        pass              # not mounted: the registry is all we have
    try:
        with open(ipcnames.clienthost_registry_path(instance)) as f:
            found.update(line.strip() for line in f if line.strip().startswith(prefix))
    except FileNotFoundError:
        pass
    return {n for n in found if ipcnames.parse_clienthost_reply_queue(instance, n) is not None}


@dataclass
class LiveLeftover:
    """A reply queue of an earlier run whose owner is still alive."""
    name: str
    pid: int
    start: int
    pidfd: int


def remove_stale(instance: str) -> list[LiveLeftover]:
    """Remove what a crashed daemon left; return the reply queues whose owner lives.

    Only call this holding the :class:`DaemonLock`.  **Resource handling**:
    the caller owns the pidfds of the returned leftovers.
    """
    removed, live = _remove_stale(instance)
    if removed:
        log.warning("removed objects left by an earlier run of client daemon %s: %s",
                    instance, ", ".join(removed))
    return live


def _remove_stale(instance: str) -> tuple[list[str], list[LiveLeftover]]:
    """``remove_stale`` without the log line: ``(names removed, live leftovers)``."""
    removed: list[str] = []
    names = ipcnames.clienthost_all_names(instance)
    if queues.unlink(names["uplink"]):
        removed.append(names["uplink"])
    for key in ("info",):
        try:
            os.unlink(names[key])
            removed.append(names[key])
        except FileNotFoundError:
            pass
    live: list[LiveLeftover] = []
    for name in sorted(stale_reply_queues(instance)):
        pid, start, _n = ipcnames.parse_clienthost_reply_queue(instance, name)  # type: ignore[misc]
        try:
            pidfd = procid.watch(pid, start)
        except procid.ProcessGone:
            if queues.unlink(name):
                removed.append(name)
            continue
        if not _exists(name):            # a name from the registry its owner has removed since
            os.close(pidfd)
            continue
        live.append(LiveLeftover(name, pid, start, pidfd))
    return removed, live


def _exists(name: str) -> bool:
    try:
        posix_ipc.MessageQueue(name).close()
    except posix_ipc.ExistentialError:
        return False
    except posix_ipc.Error:
        return True                      # there, though we may not open it
    return True


def cleanup(instance: str) -> tuple[list[str], list[str]]:
    """``duprep client-cleanup``: remove what a crashed daemon of ``instance`` left, without starting one.

    Takes the daemon lock first, so a live daemon is never cleaned up
    (raises InstanceBusyError).  Removes the uplink queue, the info file and
    the reply queues of dead local processes, as a starting daemon does,
    then the registry and the lock file.  Reply queues whose owner still
    lives are kept (their owner removes them, or re-attaches to the next
    daemon) and stay in the registry, so that the next daemon watches them
    even where /dev/mqueue is not mounted.  Returns ``(removed, kept)``.
    """
    lock = DaemonLock(instance)
    had_lock = os.path.exists(lock.path)      # the crashed daemon's, or none (then ours is no leftover)
    lock.acquire()
    try:
        removed, live = _remove_stale(instance)
        for left in live:
            os.close(left.pidfd)
        kept = [left.name for left in live]
        registry = ipcnames.clienthost_registry_path(instance)
        if kept:
            write_registry(instance, kept)
        else:
            try:
                os.unlink(registry)
                removed.append(registry)
            except FileNotFoundError:
                pass
        if had_lock:
            removed.append(lock.path)
    finally:
        lock.release()              # unlinks the lock file
    return removed, kept


def crashed(instance: str) -> DaemonInfo | None:
    """The info of a daemon of ``instance`` that died without cleaning up (its info file is left,
    its process is gone), or None.  Takes no lock: safe beside a daemon that is starting."""
    try:
        info = read_info(instance)
    except BrokenResourceError:
        return None
    try:
        os.close(procid.watch(info.pid, info.start))
    except procid.ProcessGone:
        return info
    return None
