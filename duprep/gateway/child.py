"""What every gateway child shares: exit codes, logging, titles, boot.

The acceptor tells "crashed" from "cannot boot" by exit code: a child that
fails before it is serving exits with :data:`EXIT_BOOT_ERROR` (or
:data:`EXIT_CONFIG_ERROR`), and the acceptor halts the gateway instead of
respawning it in a loop (gunicorn's ``WORKER_BOOT_ERROR``).
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import pwd
import signal
import stat
import sys
from typing import Callable, Final

__all__ = ["EXIT_OK", "EXIT_CRASH", "EXIT_BOOT_ERROR", "EXIT_CONFIG_ERROR", "EXIT_BUSY", "EXIT_LIMIT",
           "NO_RESPAWN", "setup_logging", "set_title", "boot_failure", "run_child", "access_denied",
           "signal_name", "die_with_parent"]

EXIT_OK: Final = 0
EXIT_CRASH: Final = 1          # unexpected exception while serving: respawn
EXIT_BOOT_ERROR: Final = 3     # could not start (import, attach, bind): do not respawn
EXIT_CONFIG_ERROR: Final = 4   # invalid configuration: do not respawn
EXIT_BUSY: Final = 5           # instance owned by another live gateway
EXIT_LIMIT: Final = 6          # a kernel limit stopped IPC creation

NO_RESPAWN: Final = frozenset({EXIT_BOOT_ERROR, EXIT_CONFIG_ERROR, EXIT_BUSY, EXIT_LIMIT})

log = logging.getLogger("duprep")


def setup_logging(role: str, instance: str) -> None:
    """Log to stderr, one line per record, tagged with role and pid (systemd journal friendly).

    A fatal signal (SIGSEGV, SIGABRT, ...) also writes the Python traceback of every thread there:
    a supervisor aborts a hung process with SIGABRT, and the log must say where it hung.
    """
    level = os.environ.get("DUPREP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        stream=sys.stderr, level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s duprep[{instance}] {role}[%(process)d] %(levelname)s %(message)s",
        force=True)
    faulthandler.enable(file=sys.stderr, all_threads=True)


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; real-time signals (not in signal.Signals) as ``signal 40``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG), and
    exit now if ``parent`` is already gone (it died before the request took effect)."""
    _prctl(1, int(signal.SIGTERM))                         # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(EXIT_OK)


def set_title(role: str, instance: str) -> None:
    """Name the process ``duprep-<role>`` in /proc/PID/comm (what ps -o comm and top show)."""
    _prctl(15, f"duprep-{role}"[:15].encode())              # PR_SET_NAME


def _prctl(option: int, arg: int | bytes) -> None:
    """prctl(2), best effort (a process title or parent-death signal is not worth failing for)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except Exception:  # pragma: no cover - not Linux
        pass


def reset_signals() -> None:
    """Start from default dispositions: the parent's handlers must not leak in."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    # A vanished client must be an EPIPE on send, never a signal.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def boot_failure(exc: BaseException) -> int:
    """Log why a process could not start and return the exit code that says so."""
    from ..errors import ConfigError, InstanceBusyError, LimitError
    for kind, code in ((InstanceBusyError, EXIT_BUSY), (LimitError, EXIT_LIMIT), (ConfigError, EXIT_CONFIG_ERROR)):
        if isinstance(exc, kind):
            log.error("cannot start: %s", exc)
            return code
    log.error("cannot start", exc_info=exc)
    return EXIT_BOOT_ERROR


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def access_denied(instance: str, error: BaseException) -> str:
    """One line on why this process may not open ``instance``'s objects, and the fix.

    The gateway creates its table, lock file and queues mode 0600, so only
    processes of the gateway's user can attach (workers, Repliers, ``duprep
    status``): name the first object owned by someone else, its owner and mode.
    """
    from .. import ipcnames
    me = os.geteuid()
    for path in ipcnames.fs_paths(instance).values():
        try:
            st = os.stat(path)
        except OSError:
            continue
        if st.st_uid != me:
            owner = _user(st.st_uid)
            return (f"{path} belongs to {owner} (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}) and this "
                    f"process runs as {_user(me)} (uid {me}): run it as {owner}, the gateway's user")
    return f"{error}: run this process as the gateway's user (its objects are mode 0600)"


def run_child(role: str, instance: str, boot: Callable[[], Callable[[], int]]) -> None:
    """Boot then serve, mapping failures to the exit-code protocol.

    ``boot()`` prepares everything and returns the serve function; an
    exception from ``boot`` is a boot error, one from serving is a crash.
    """
    setup_logging(role, instance)
    set_title(role, instance)
    reset_signals()
    try:
        serve = boot()
    except Exception as e:
        sys.exit(boot_failure(e))
    try:
        code = serve()
    except Exception:
        log.exception("crashed")
        sys.exit(EXIT_CRASH)
    sys.exit(code)
