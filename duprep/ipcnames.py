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
"""

from __future__ import annotations

import os
import re

from .errors import ConfigError

__all__ = ["check_instance", "table_name", "request_queue", "reply_queue", "lock_path", "all_names"]

PREFIX = "duprep"
_VALID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,47}\Z")
LOCK_DIR = os.environ.get("DUPREP_LOCK_DIR", "/dev/shm")


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
