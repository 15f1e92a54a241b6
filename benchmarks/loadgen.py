"""Runs the C load generator (c/loadgen.c) and parses its JSON.

What: :func:`run_load` drives one measurement (warm-up + window) and returns
loadgen's result; :class:`IdleClients` holds N idle connections open while
the harness samples a server's memory and CPU, and releases them on exit.
Why a wrapper: the harness deals in Python objects and deadlines; the C
program only knows sockets.  Every subprocess here is bounded by a timeout
and killed on any error.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LoadSpec", "LoadError", "run_load", "IdleClients"]


class LoadError(RuntimeError):
    """The load generator failed or did not answer in time."""


@dataclass(frozen=True)
class LoadSpec:
    """One load: loadgen's command-line options."""

    port: int
    conns: int
    depth: int = 1
    payload: int = 64
    mode: str = "persistent"       # persistent | connect | idle
    proto: str = "frame"           # frame | zmtp
    app: str = "echo"              # echo | kv
    warmup_s: float = 1.0
    duration_s: float = 3.0
    setup_timeout_s: float = 60.0
    timeout_ms: int = 10000
    watch: tuple[int, ...] = ()    # processes whose CPU time in the window the result gives ("watched")

    def argv(self, binary: Path) -> list[str]:
        return [str(binary), "--host", "127.0.0.1", "--port", str(self.port), "--conns", str(self.conns),
                "--depth", str(self.depth), "--payload", str(self.payload), "--mode", self.mode,
                "--proto", self.proto, "--app", self.app, "--warmup", str(self.warmup_s),
                "--duration", str(self.duration_s), "--setup-timeout", str(self.setup_timeout_s),
                "--timeout-ms", str(self.timeout_ms), *(["--watch", ",".join(map(str, self.watch))] if self.watch else [])]


def run_load(binary: Path, spec: LoadSpec) -> dict[str, Any]:
    """Run one closed-loop measurement; return loadgen's JSON result."""
    limit = spec.setup_timeout_s + spec.warmup_s + spec.duration_s + 30
    try:
        res = subprocess.run(spec.argv(binary), stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise LoadError(f"loadgen did not finish within {limit:.0f}s") from None
    if res.returncode != 0:
        raise LoadError(f"loadgen exited {res.returncode}: {res.stderr.strip()[-500:]}")
    return _last_json(res.stdout)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)  # type: ignore[no-any-return]
            except ValueError:
                break
    raise LoadError(f"no result from loadgen: {text[-300:]!r}")


class IdleClients:
    """``with IdleClients(binary, spec) as idle:`` keeps ``spec.conns`` idle connections open.

    On entry it waits until every connection did its handshake and one
    request (``idle.ready`` is loadgen's "ready" record); on exit it tells
    loadgen to close them and stores the final record in ``idle.done``.
    """

    def __init__(self, binary: Path, spec: LoadSpec) -> None:
        self._argv = spec.argv(binary)
        self._timeout = spec.setup_timeout_s * 2 + 30
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self.ready: dict[str, Any] = {}
        self.done: dict[str, Any] = {}

    def __enter__(self) -> IdleClients:
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        try:
            self.ready = json.loads(self._line(self._timeout))
        except ValueError as exc:
            self._kill()
            raise LoadError(f"unreadable answer from loadgen: {exc}") from None
        except BaseException:
            self._kill()
            raise
        return self

    def alive_after(self, seconds: float) -> bool:
        """Wait ``seconds`` (a measurement window); False if loadgen died meanwhile."""
        assert self._proc is not None
        try:
            self._proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return True
        return False

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.close()           # EOF on stdin: loadgen closes everything
            self.done = json.loads(self._line(30))
            self._proc.wait(timeout=30)
        except (LoadError, ValueError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self._kill()

    def _line(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise LoadError(f"loadgen gave no answer within {timeout:.0f}s")
                chunk = os.read(self._proc.stdout.fileno(), 65536)
                if not chunk:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    raise LoadError(f"loadgen exited early: {err[-300:]}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()
