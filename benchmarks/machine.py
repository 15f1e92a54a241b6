"""Records where and when a result was measured: machine, versions, commit, date.

What: one dict that goes into every result file (JSON and Markdown).  Why:
benchmark numbers without the machine and commit next to them cannot be
compared or reproduced; the issue asks for nproc, memory, kernel, Python,
package versions, commit and date in each file.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import cbuild

__all__ = ["describe", "PACKAGES"]

PACKAGES = ("msgspec", "posix_ipc", "uvloop", "pyzmq", "matplotlib", "duprep")


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _git(repo: Path, *args: str) -> str:
    try:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def _work_tree_version(name: str) -> str:
    """duprep is usually run from the work tree, not installed: ask the package."""
    try:
        mod = importlib.import_module(name)
    except ImportError:
        return "not installed"
    return f"{getattr(mod, '__version__', '?')} (work tree)"


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = _work_tree_version(name)
    try:
        import zmq
        out["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    import sqlite3
    out["sqlite"] = sqlite3.sqlite_version
    return out


def _python_build() -> str:
    """Which interpreter, and the configure flags that change its speed.

    Every Python peer runs on this interpreter, and builds of one version
    differ in speed (a build without PGO/LTO runs pure-Python loops about a
    quarter slower), so a result says which one it had.
    """
    import sys
    import sysconfig
    args = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    flags = [f for f in ("--enable-optimizations", "--with-lto", "--enable-shared") if f in args]
    return f"{os.path.realpath(sys.executable)}, configured with {' '.join(flags) or 'none of --enable-optimizations, --with-lto, --enable-shared'}"


def _rlimit_nofile() -> list[int]:
    import resource
    return list(resource.getrlimit(resource.RLIMIT_NOFILE))


def describe(repo: Path) -> dict[str, Any]:
    """Machine, software and commit facts for the result files."""
    commit = _git(repo, "rev-parse", "HEAD") or "none (no commit yet)"
    dirty = bool(_git(repo, "status", "--porcelain"))
    uname = platform.uname()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
        "nproc": os.cpu_count(),
        "mem_total_bytes": _mem_total(),
        "kernel": f"{uname.system} {uname.release}",
        "machine": uname.machine,
        "python": platform.python_version(),
        "python_build": _python_build(),
        "cc": cbuild.compiler_version(),
        "packages": _versions(),
        "rlimit_nofile": _rlimit_nofile(),
    }
