"""Builds the benchmark's C programs with the system compiler, outside the repo.

What: compiles ``c/loadgen.c`` and ``c/cecho.c`` with ``$CC`` (default cc)
into a per-user cache directory (``$XDG_CACHE_HOME/duprep-bench`` or
``~/.cache/duprep-bench``), named by a hash of the sources and flags, so an
unchanged program is built once and no binary is ever written into the
repository.  The build writes a temporary file and renames it, so a
concurrent run never sees half a binary.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

__all__ = ["BuildError", "build", "cache_dir", "compiler_version"]

C_DIR = Path(__file__).resolve().parent / "c"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]


class BuildError(RuntimeError):
    """The C compiler is missing or rejected a source."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "duprep-bench"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "cc"))


def compiler_version() -> str:
    """First line of ``cc --version``, or "unavailable"."""
    try:
        out = subprocess.run([*_compiler(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "unavailable"


def build(name: str) -> Path:
    """Return the path of the built program ``name`` (loadgen or cecho), building it if needed."""
    src = C_DIR / f"{name}.c"
    digest = hashlib.sha256()
    for part in (src, C_DIR / "mp.h"):
        digest.update(part.read_bytes())
    digest.update(" ".join(_compiler() + CFLAGS).encode())
    target = cache_dir() / f"{name}-{digest.hexdigest()[:16]}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=target.parent)
    os.close(fd)
    try:
        cmd = [*_compiler(), *CFLAGS, "-I", str(C_DIR), "-o", tmp, str(src)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError(f"cannot run the C compiler: {exc}") from None
        if res.returncode != 0:
            raise BuildError(f"{' '.join(cmd)} failed:\n{res.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
