"""Fixtures: unique instance names, gateways that always stop, leak checks."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import posix_ipc
import pytest

from duprep import ipcnames
from duprep.launch import GatewayProcess, start_gateway
from duprep.wire import FrameReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ids = itertools.count()


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def ipc_leftovers(instance: str) -> list[str]:
    """Names of the instance's IPC objects that still exist."""
    names = ipcnames.all_names(instance)
    left = []
    for key in ("requests", "replies"):
        try:
            posix_ipc.MessageQueue(names[key]).close()
            left.append(names[key])
        except posix_ipc.ExistentialError:
            pass
    if os.path.exists("/dev/shm/" + names["table"]):
        left.append(names["table"])
    if os.path.exists(names["lock"]):
        left.append(names["lock"])
    return left


def unlink_all(instance: str) -> None:
    names = ipcnames.all_names(instance)
    for key in ("requests", "replies"):
        try:
            posix_ipc.unlink_message_queue(names[key])
        except posix_ipc.ExistentialError:
            pass
    for path in ("/dev/shm/" + names["table"], names["lock"]):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def instance() -> Iterator[str]:
    """A unique instance name; its IPC objects are checked and removed afterwards."""
    name = f"t{os.getpid()}-{next(_ids)}"
    yield name
    left = ipc_leftovers(name)
    unlink_all(name)
    assert not left, f"IPC objects left behind: {left}"


@pytest.fixture
def gateway(instance: str) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``gateway(*args)`` starts ``duprep serve`` with tests.apps; always stopped afterwards."""
    started: list[GatewayProcess] = []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(*args: str, workers: int = 2, app: str = "tests.apps:handle", name: str | None = None,
              **kw: object) -> GatewayProcess:
        gw = start_gateway(name or instance, args=["--workers", str(workers), "--app", app, *args], env=env, **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        family = [gw.pid, *descendants(gw.pid)]
        if gw.proc.poll() is None:
            gw.stop(timeout=30)
        for pid in family:        # a test that failed half-way must not leave processes behind
            if alive(pid) and pid != gw.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def duprep_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "duprep", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def read_frames(sock: socket.socket, reader: FrameReader, n: int, timeout: float = 20.0) -> list[object]:
    """The next ``n`` frames the gateway sends on ``sock`` (fails the test if the connection ends first)."""
    from duprep import frame
    dec, out = frame.server_decoder(), []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        assert data, f"connection closed after {out}"
        out += map(dec.decode, reader.feed(data))
    return out


def worker_rows(instance: str) -> list[dict[str, Any]]:
    """The worker rows of the instance's table (``duprep status``)."""
    from duprep.status import snapshot
    return [p for p in snapshot(instance)["processes"] if p["role"] == "worker"]
