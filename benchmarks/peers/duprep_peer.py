"""Peer 5, duprep itself, started through its own command line.

What: ``python -m duprep serve --port 0 --instance NAME --workers K --app
benchmarks.apps:<app>`` in a process group of its own; readiness is
``python -m duprep status --instance NAME --json`` reporting state "ready"
and the bound port, polled until a deadline (a serve process that exits
meanwhile is an error).  Stop: SIGTERM to the acceptor alone (it stops its
children and removes its IPC objects itself); whatever IPC object of the
instance is still there afterwards is reported and removed with
``duprep cleanup``.  Instance names are unique per run; only one duprep
instance runs at a time (POSIX queue memory is limited per user).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import cbuild, sysctl
from benchmarks.loadgen import LoadSpec, run_load
from benchmarks.plan import default_workers
from benchmarks.servers import Server, ServerError, StopReport, log_tail, term_with_parent

__all__ = ["launch", "measure_once", "add_load_options", "load_spec", "instance_name", "ipc_leftovers"]

_counter = 0


def instance_name() -> str:
    """A fresh instance name: bench-<harness pid>-<n>."""
    global _counter
    _counter += 1
    return f"bench-{os.getpid()}-{_counter}"


def _status(python: str, instance: str, cwd: Path, env: dict[str, str]) -> dict[str, Any] | None:
    try:
        res = subprocess.run([python, "-m", "duprep", "status", "--instance", instance, "--json"],
                             capture_output=True, text=True, timeout=20, cwd=cwd, env=env)
        obj = json.loads(res.stdout) if res.stdout.strip() else None
    except (subprocess.TimeoutExpired, ValueError, OSError):
        return None
    return obj if isinstance(obj, dict) else None


def _serve_options(python: str, cwd: Path, env: dict[str, str]) -> str:
    try:
        return subprocess.run([python, "-m", "duprep", "serve", "--help"], capture_output=True, text=True,
                              timeout=30, cwd=cwd, env=env).stdout
    except (subprocess.TimeoutExpired, OSError):
        return ""


def ipc_leftovers(instance: str) -> list[str]:
    """Files of ``instance`` still in /dev/shm and /dev/mqueue (if mounted)."""
    found = []
    for d in ("/dev/shm", "/dev/mqueue"):
        try:
            found += [os.path.join(d, n) for n in os.listdir(d) if f".{instance}." in n]
        except OSError:
            continue
    return sorted(found)


def queues_text(status: dict[str, Any]) -> str:
    """The queue geometry a gateway chose (it depends on the kernel's limits: README, "Kernel limits")."""
    q = status.get("queues") or {}
    parts = [f"{name} {q[name]['capacity']} x {q[name]['message_size']} bytes"
             for name in ("requests", "replies") if name in q]
    return "queues: " + ", ".join(parts) if parts else ""


def launch(*, app: str, workers: int, max_conns: int, repo: Path, env: dict[str, str],
           log_path: Path, python: str = sys.executable, timeout: float = 60.0,
           extra: Sequence[str] = ()) -> Server:
    """Start duprep serving ``benchmarks.apps:<app>`` and wait until it is ready (``extra``: more
    ``duprep serve`` options, e.g. for benchmarks.ab)."""
    instance = instance_name()
    cmd = [python, "-m", "duprep", "serve", "--host", "127.0.0.1", "--port", "0", "--instance", instance,
           "--workers", str(workers), "--app", f"benchmarks.apps:{app}"]
    if "--max-clients" in _serve_options(python, repo, env):
        cmd += ["--max-clients", str(max(4096, max_conns + 1024))]
    cmd += extra

    def after_stop(report: StopReport) -> None:
        left = ipc_leftovers(instance)
        if left:
            report.notes.append(f"IPC objects left after stop: {', '.join(left)}; ran duprep cleanup")
            subprocess.run([python, "-m", "duprep", "cleanup", "--instance", instance], capture_output=True,
                           timeout=30, cwd=repo, env=env)
        if report.exit_code not in (0, None):
            report.notes.append(f"duprep serve exited {report.exit_code}")

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=repo, env=env,
                                process_group=0, preexec_fn=term_with_parent)
    server = Server(proc, 0, log_path, stop_signal_group=False, on_stopped=after_stop)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(f"duprep serve exited {proc.returncode} before ready:\n{log_tail(log_path)}")
            st = _status(python, instance, repo, env)
            if st and st.get("state") == "ready" and st.get("port"):
                server.port = int(st["port"])
                server.setup = queues_text(st)
                return server
            if time.monotonic() > deadline:
                raise ServerError(f"duprep not ready within {timeout:.0f}s (last status {st}):\n"
                                  f"{log_tail(log_path)}")
            try:                       # paces the polling and notices an early exit at once
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        server.stop()
        raise


def add_load_options(p: argparse.ArgumentParser, *, duration: float, apps: bool = False) -> None:
    """The options of the one load that ``measure_once`` runs (with ``apps``, also ``--app``), and
    ``--stock-mqueue``: what benchmarks.ab and benchmarks.sensitivity share."""
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--payload", type=int, default=64)
    if apps:
        p.add_argument("--app", choices=("echo", "kv"), default="echo")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=duration)
    sysctl.add_option(p)


def load_spec(args: argparse.Namespace) -> LoadSpec:
    """The load that ``add_load_options`` described (the port is filled in per gateway)."""
    return LoadSpec(port=0, conns=args.conns, depth=args.depth, payload=args.payload,
                    app=getattr(args, "app", "echo"), warmup_s=args.warmup, duration_s=args.duration)


def measure_once(spec: LoadSpec, *, workers: int, repo: Path, env: dict[str, str], log_path: Path,
                 extra: Sequence[str] = (), label: str = "duprep",
                 python: str = sys.executable) -> tuple[dict[str, Any], str]:
    """A fresh gateway, one load, then stopped: loadgen's result and the queues the gateway took.

    For the tools that compare duprep with itself (benchmarks.ab, benchmarks.sensitivity); anything
    the stop had to clean up is printed to stderr under ``label``.
    """
    server = launch(app=spec.app, workers=workers, max_conns=spec.conns, repo=repo, env=env,
                    log_path=log_path, extra=extra, python=python)
    try:
        # the gateway's processes are watched: the result gives their CPU time in the window ("watched")
        return run_load(cbuild.build("loadgen"), dataclasses.replace(spec, port=server.port,
                                                                     watch=tuple(server.pids()))), server.setup
    finally:
        stopped = server.stop()
        if stopped.notes:
            print(f"  note ({label}): {'; '.join(stopped.notes)}", file=sys.stderr)
