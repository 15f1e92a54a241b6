"""Where a run's idle CPU goes: what the scheduler costs a server of several processes.

What: ``python -m benchmarks.idlecpu`` drives each chosen peer (default:
duprep, then the C echo line) at one load (default the target cell: echo,
N=1000, D=8, P=64), records every CPU's context switches with ``perf sched
record -a`` for a window in the middle of the measurement, and prints per
peer:

- the idle share of all CPUs over that window (``/proc/stat``);
- how much of the idle time some task was runnable but waiting on another
  CPU's run queue: work the kernel did not move to the idle CPU;
- which tasks ran on the other CPUs while one was idle, and which waited.

Why: the ratio against the C line counts every idle moment against duprep.
On 2 cores the single-process C line leaves almost nothing idle; a
pipeline of five busy processes (receiver, sender, two workers, the load
generator) leaves a few per cent, and that loss is neither Python nor
syscalls, so no profile of a process shows it.  Needs ``perf`` and the
right to trace scheduler events (root).

The trace can miss a CPU's returns from idle (on this machine's VM, perf
records none for CPU 1): the breakdown then covers the CPUs it names, a
sample of the whole; the idle share from ``/proc/stat`` is exact.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import cbuild
from benchmarks.loadgen import LoadSpec, run_load
from benchmarks.peers.registry import PEERS, Launch
from benchmarks.plan import default_workers

__all__ = ["Slice", "IdleReport", "parse_timehist", "analyse", "main"]

REPO = Path(__file__).resolve().parent.parent
_ROW = re.compile(r"\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.+?)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s*$")


@dataclass(frozen=True)
class Slice:
    """One line of ``perf sched timehist``: a task switched out of ``cpu`` at ``end`` (seconds).

    It had waited ``delay`` seconds runnable before it ran, then ran ``run`` seconds.
    """

    end: float
    cpu: int
    task: str            # "name[pid]" or "name[tid/pid]"; "<idle>" for the idle task
    delay: float
    run: float

    @property
    def name(self) -> str:
        return self.task.split("[", 1)[0]


@dataclass
class IdleReport:
    """What :func:`analyse` found, in seconds."""

    idle: float = 0.0                   # summed over the CPUs in ``cpus``
    cpus: set[int] = field(default_factory=set)   # CPUs whose idle periods the trace shows
    idle_with_waiting: float = 0.0      # part of ``idle`` while some task waited on another CPU's run queue
    running_elsewhere: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    waiting_elsewhere: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))


def parse_timehist(text: str) -> list[Slice]:
    """The switch-out lines of ``perf sched timehist`` output (headers and other lines are skipped)."""
    out = []
    for line in text.splitlines():
        m = _ROW.match(line)
        if m:
            out.append(Slice(float(m[1]), int(m[2]), m[3].strip(), float(m[5]) / 1e3, float(m[6]) / 1e3))
    return out


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def analyse(slices: list[Slice]) -> IdleReport:
    """Split every idle period by what the other CPUs were doing meanwhile."""
    rep = IdleReport()
    idle = [(s.end - s.run, s.end, s.cpu) for s in slices if s.task == "<idle>"]
    tasks = [s for s in slices if s.task != "<idle>"]
    for i0, i1, cpu in idle:
        rep.idle += i1 - i0
        rep.cpus.add(cpu)
        waits = []
        for s in tasks:
            r0 = s.end - s.run
            if s.cpu != cpu:
                rep.running_elsewhere[s.name] += _overlap(i0, i1, r0, s.end)
            # Runnable from r0 - delay until r0, whichever CPU it then ran on: a task the idle CPU
            # finally pulled over shows that CPU.
            if s.delay > 0:
                w = _overlap(i0, i1, r0 - s.delay, r0)
                if w > 0:
                    rep.waiting_elsewhere[s.name] += w
                    waits.append((max(i0, r0 - s.delay), min(i1, r0)))
        end = i0
        for w0, w1 in sorted(waits):     # the union of the waits, not their sum
            if w1 > end:
                rep.idle_with_waiting += w1 - max(w0, end)
                end = w1
    return rep


def _cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def measure(peer_name: str, spec: LoadSpec, *, workers: int, window: float, tmp: Path) -> dict[str, Any]:
    """Drive ``peer_name`` with ``spec`` and record the scheduler for ``window`` s in mid-measurement."""
    peer = next(p for p in PEERS if p.name == peer_name)
    server = peer.start(Launch(app=spec.app, workers=workers, max_conns=spec.conns, repo=REPO, rundir=tmp,
                               env=_env(), log_path=tmp / f"{peer_name}.log"))
    result: dict[str, Any] = {}
    try:
        spec = LoadSpec(**{**spec.__dict__, "port": server.port})
        load = threading.Thread(target=lambda: result.update(run_load(cbuild.build("loadgen"), spec)))
        started = time.monotonic()
        load.start()
        # Timed, not a synchronisation: loadgen's own warm-up is timed too.  The window starts when
        # the connections are up (about a second for 1000) and the warm-up is over.
        time.sleep(max(0.0, spec.warmup_s + 1.0 - (time.monotonic() - started)))
        data = tmp / f"{peer_name}.sched"
        before = _cpu_times()
        subprocess.run(["perf", "sched", "record", "-a", "-o", str(data), "--", "sleep", str(window)],
                       capture_output=True, check=True)
        after = _cpu_times()
        load.join()
        hist = subprocess.run(["perf", "sched", "timehist", "-i", str(data)], capture_output=True, text=True,
                              check=True).stdout
    finally:
        server.stop()
    d = [b - a for a, b in zip(before, after)]
    return {"replies_per_s": result.get("replies_per_s", 0.0), "idle_share": d[3] / max(1, sum(d)),
            "report": analyse(parse_timehist(hist)), "window": window}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.idlecpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default="duprep,cecho", help="comma list of peers (default duprep,cecho)")
    p.add_argument("--conns", type=int, default=1000)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--payload", type=int, default=64)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--window", type=float, default=0.5, help="seconds of scheduler trace (default 0.5)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n for n in args.peers.split(",") if n]
    unknown = [n for n in names if n not in {p.name for p in PEERS}]
    if unknown or not names:
        print(f"unknown peers: {unknown}; known: {', '.join(p.name for p in PEERS)}", file=sys.stderr)
        return 2
    if shutil.which("perf") is None:
        print("benchmarks.idlecpu needs perf (linux-perf) on PATH", file=sys.stderr)
        return 2
    spec = LoadSpec(port=0, conns=args.conns, depth=args.depth, payload=args.payload,
                    warmup_s=1.0, duration_s=args.window + 2.5)
    with tempfile.TemporaryDirectory(prefix="duprep-idlecpu-") as tmp:
        for name in names:
            try:
                m = measure(name, spec, workers=args.workers, window=args.window, tmp=Path(tmp))
            except subprocess.CalledProcessError as e:
                print(f"{name}: {' '.join(e.cmd[:3])} failed: {(e.stderr or b'')[-300:]!r} (root needed?)",
                      file=sys.stderr)
                return 1
            rep: IdleReport = m["report"]
            cpus = ",".join(map(str, sorted(rep.cpus))) or "none"
            print(f"{name}: {m['replies_per_s']:,.0f} replies/s; idle {100 * m['idle_share']:.1f} % of all CPUs "
                  f"(/proc/stat); traced idle {1e3 * rep.idle:.1f} ms in {1e3 * m['window']:.0f} ms on CPU {cpus}, "
                  f"of which {1e3 * rep.idle_with_waiting:.1f} ms with a task waiting on another CPU's run queue")
            for label, counter in (("ran elsewhere", rep.running_elsewhere),
                                   ("waited elsewhere", rep.waiting_elsewhere)):
                most = sorted(counter.items(), key=lambda kv: -kv[1])[:5]
                top = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in most if v >= 5e-5)
                print(f"  while a CPU was idle, {label}: {top or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
