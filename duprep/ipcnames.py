"""The one place that derives the names of an instance's IPC objects.

The acceptor, ``duprep status``, ``duprep.bus``, the client daemon and the
test fixtures all call these functions, so they can never disagree.

====================  =====================================  ==============
object                name                                   created by
====================  =====================================  ==============
connection table      ``/dev/shm/duprep.<instance>.table``   acceptor
request queue         ``/duprep.<instance>.req``             acceptor
reply queue           ``/duprep.<instance>.rep``             acceptor
instance lock file    ``/dev/shm/duprep.<instance>.lock``    acceptor
====================  =====================================  ==============

The client daemon (``duprep client-daemon``, :mod:`duprep.clienthost`) of a
client host has its own namespace, ``duprep-ch``, so that a gateway and a
client daemon may share an instance name on one machine:

====================  ==============================================  ===============
object                name                                            created by
====================  ==============================================  ===============
uplink queue          ``/duprep-ch.<instance>.up``                    client daemon
reply queue           ``/duprep-ch.<instance>.p<pid>.<start>.<n>``    local process
daemon lock file      ``/dev/shm/duprep-ch.<instance>.lock``          client daemon
daemon info file      ``/dev/shm/duprep-ch.<instance>.info``          client daemon
reply-queue registry  ``/dev/shm/duprep-ch.<instance>.queues``        client daemon
status socket         abstract ``@duprep-ch.<instance>.ctl``          client daemon
====================  ==============================================  ===============
"""

from __future__ import annotations

import os
import re

from .errors import ConfigError

__all__ = ["check_instance", "table_name", "request_queue", "reply_queue", "lock_path", "all_names", "fs_paths",
           "SHM_DIR", "MQUEUE_DIR",
           "clienthost_uplink", "clienthost_reply_queue", "clienthost_reply_prefix",
           "parse_clienthost_reply_queue", "clienthost_lock_path", "clienthost_info_path",
           "clienthost_registry_path", "clienthost_control", "clienthost_all_names"]

PREFIX = "duprep"
_VALID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}\Z")
SHM_DIR = "/dev/shm"            # where Linux shows shared-memory segments as files
MQUEUE_DIR = "/dev/mqueue"      # where POSIX queues show as files, once an mqueue fs is mounted there
LOCK_DIR = os.environ.get("DUPREP_LOCK_DIR", SHM_DIR)


def check_instance(instance: str) -> str:
    """Return ``instance`` if it can name IPC objects, else raise ConfigError."""
    if not _VALID.match(instance) or ".." in instance:
        raise ConfigError(
            f"invalid instance name {instance!r}: use 1-48 characters from A-Z a-z 0-9 _ . -, "
            "not starting with '.' or '-'")
    return instance


def table_name(instance: str) -> str:
    """Shared-memory segment name (multiprocessing.shared_memory style, no slash)."""
    return f"{PREFIX}.{check_instance(instance)}.table"


def request_queue(instance: str) -> str:
    """POSIX queue from the receiver to the business workers (seed qid3)."""
    return f"/{PREFIX}.{check_instance(instance)}.req"


def reply_queue(instance: str) -> str:
    """POSIX queue from business workers and the receiver to the sender (seed qid4)."""
    return f"/{PREFIX}.{check_instance(instance)}.rep"


def lock_path(instance: str) -> str:
    """Lock file every process of the instance holds with flock(LOCK_SH)."""
    return os.path.join(LOCK_DIR, f"{PREFIX}.{check_instance(instance)}.lock")


def all_names(instance: str) -> dict[str, str]:
    """Every IPC name of ``instance``, for cleanup and leak checks."""
    return {
        "table": table_name(instance),
        "requests": request_queue(instance),
        "replies": reply_queue(instance),
        "lock": lock_path(instance),
    }


def fs_paths(instance: str) -> dict[str, str]:
    """Where each of :func:`all_names` shows in the file system (the queues only while MQUEUE_DIR is
    mounted): for leak checks, owners and modes."""
    names = all_names(instance)
    return {key: name if key == "lock" else os.path.join(SHM_DIR, name) if key == "table" else MQUEUE_DIR + name
            for key, name in names.items()}


# --- client daemon (duprep.clienthost) ------------------------------------------------

CLIENTHOST_PREFIX = "duprep-ch"


def clienthost_uplink(instance: str) -> str:
    """POSIX queue from every local process to the client daemon (seed qid1)."""
    return f"/{CLIENTHOST_PREFIX}.{check_instance(instance)}.up"


def clienthost_reply_prefix(instance: str) -> str:
    """The common start of every reply-queue name of ``instance`` (for cleanup scans)."""
    return f"/{CLIENTHOST_PREFIX}.{check_instance(instance)}.p"


def clienthost_reply_queue(instance: str, pid: int, start: int, n: int) -> str:
    """Reply queue ``n`` of the local process ``pid`` started at ``start`` (seed qid2, mtype=cpid).

    ``start`` is field 22 of /proc/PID/stat, so a recycled pid never names
    the queue of a dead process.
    """
    return f"{clienthost_reply_prefix(instance)}{int(pid)}.{int(start)}.{int(n)}"


def parse_clienthost_reply_queue(instance: str, name: str) -> tuple[int, int, int] | None:
    """``(pid, start, n)`` if ``name`` is a reply queue of ``instance``, else None."""
    prefix = clienthost_reply_prefix(instance)
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    pid, start, n = (int(p) for p in parts)
    return pid, start, n


def clienthost_lock_path(instance: str) -> str:
    """Lock file the client daemon holds with flock(LOCK_EX) for its whole life."""
    return os.path.join(LOCK_DIR, f"{CLIENTHOST_PREFIX}.{check_instance(instance)}.lock")


def clienthost_info_path(instance: str) -> str:
    """Where the client daemon publishes its pid, start time and queue sizes for local processes."""
    return os.path.join(LOCK_DIR, f"{CLIENTHOST_PREFIX}.{check_instance(instance)}.info")


def clienthost_registry_path(instance: str) -> str:
    """The client daemon's list of reply queues, for cleanup after a crash."""
    return os.path.join(LOCK_DIR, f"{CLIENTHOST_PREFIX}.{check_instance(instance)}.queues")


def clienthost_control(instance: str) -> str:
    """Abstract AF_UNIX address of the client daemon's status socket (no file to clean up)."""
    return f"\0{CLIENTHOST_PREFIX}.{check_instance(instance)}.ctl"


def clienthost_all_names(instance: str) -> dict[str, str]:
    """The client daemon's fixed IPC names (reply queues: see clienthost_reply_prefix)."""
    return {
        "uplink": clienthost_uplink(instance),
        "lock": clienthost_lock_path(instance),
        "info": clienthost_info_path(instance),
        "registry": clienthost_registry_path(instance),
        "control": clienthost_control(instance),
    }
