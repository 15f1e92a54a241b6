"""The POSIX queue limits a benchmark run gives duprep: those of a production install.

What: while a run lasts, raise ``fs.mqueue.msg_max`` and ``msgsize_max`` to
the values of ``systemd/60-duprep.conf`` (never lower them), and put back
what was there when it ends.  Why: the peers are compared as their users
would run them, and a duprep install raises these limits with that file
(README, "Kernel limits"); on the stock limits its queues are 10 messages of
8 KiB, with them 12 of 16 KiB under the default RLIMIT_MSGQUEUE.  Only root
can write them; otherwise, or with ``--stock-mqueue``, the run keeps what the
machine has.  Either way the result files say which limits the run had.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

__all__ = ["KEYS", "INSTALL_CONF", "read_conf", "current", "production_limits", "add_option", "for_run"]

KEYS = ("fs.mqueue.msg_max", "fs.mqueue.msgsize_max")
INSTALL_CONF = Path(__file__).resolve().parent.parent / "systemd" / "60-duprep.conf"


def _path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_conf(path: Path) -> dict[str, int]:
    """The ``key = value`` lines of a sysctl.d file, for KEYS."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")) and "=" in line:
            key, value = (x.strip() for x in line.split("=", 1))
            if key in KEYS:
                out[key] = int(value)
    return out


def current() -> dict[str, int]:
    """The machine's values of KEYS now."""
    return {key: int(_path(key).read_text()) for key in KEYS}


@contextlib.contextmanager
def production_limits(conf: Path = INSTALL_CONF, *, enabled: bool = True) -> Iterator[dict[str, Any]]:
    """Raise KEYS to ``conf``'s values for the duration; yields what the run had, for the results.

    A value already at least as high is left alone; one that cannot be
    written (not root, a read-only /proc/sys) is left alone and said so
    (``notes``).  Whatever was raised is put back however the block ends; a
    value that cannot be put back is reported on stderr with the command
    that does it by hand.
    """
    before = current()
    info: dict[str, Any] = {"limits": dict(before), "raised": {}, "notes": []}
    changed: dict[str, int] = {}
    try:
        if not enabled:
            info["notes"].append("kept as they were: --stock-mqueue")
        elif os.geteuid() != 0:
            info["notes"].append("not root: the machine's limits kept")
        else:
            for key, value in read_conf(conf).items():
                if value > before[key]:
                    changed[key] = before[key]          # before the write: a write cut short is undone too
                    try:
                        _path(key).write_text(str(value))
                    except OSError as e:
                        del changed[key]
                        info["notes"].append(f"could not raise {key}: {e}; the machine's value kept")
                        continue
                    info["raised"][key] = value
            info["limits"] = current()
        yield info
    finally:
        for key, value in changed.items():
            try:
                _path(key).write_text(str(value))
            except OSError as e:
                print(f"warning: could not put {key} back to {value} ({e}); as root: sysctl -w {key}={value}",
                      file=sys.stderr)


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--stock-mqueue``, for every tool that starts duprep gateways (tools/bench, ab, sensitivity)."""
    parser.add_argument("--stock-mqueue", action="store_true",
                        help="keep the machine's fs.mqueue limits (default, as root: raise them to "
                             "systemd/60-duprep.conf's for the run, as an install does, and restore them)")


@contextlib.contextmanager
def for_run(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """:func:`production_limits` as ``--stock-mqueue`` asks, said on stdout; SIGTERM interrupts the
    run (KeyboardInterrupt) so that the limits are put back."""
    from benchmarks import report
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with production_limits(enabled=not args.stock_mqueue) as info:
        print(f"queue limits: {report.mqueue_text(info)}", flush=True)
        yield info
