"""Is duprep variant B faster than variant A?  Interleaved pairs at one load.

What: ``python -m benchmarks.ab`` runs two duprep variants at one load
(default the target cell: echo, N=1000, D=8, P=64) in ``--pairs`` pairs, each
pair one load on A and one on B with a fresh gateway each, the order swapped
every pair, and prints each pair's B/A throughput ratio, their median and how
many pairs were above 1; and the same for the gateway's CPU time per reply
(all its processes, user + sys, as loadgen read it at the window's ends).  A variant is a source tree (``--a-tree``/``--b-tree``,
default this checkout: e.g. a ``git worktree`` of another commit) and extra
``duprep serve`` options (``--a-args``/``--b-args``, e.g. ``"--queue-size
16384"``).

Why: on a shared machine absolute rates drift by 10-20 % between minutes, so
two runs taken apart say nothing about a change of a few percent; the ratio
of two loads taken back to back does, and the median of several such pairs
with how many of them agree is what the project's notes report.  CPU per
reply varies less from load to load than throughput (which also depends on
how the scheduler interleaves the processes), so a change of a few percent
in the work per reply shows there first.

Like ``tools/bench`` it runs under an install's queue limits
(benchmarks/sysctl.py; ``--stock-mqueue`` keeps the machine's), and it
prints the queues each variant took.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import sysctl
from benchmarks.loadgen import LoadError, LoadSpec
from benchmarks.peers import duprep_peer
from benchmarks.servers import ServerError

__all__ = ["Variant", "measure", "summary", "main"]

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    """One side of the comparison: a source tree and extra ``duprep serve`` options."""

    name: str
    tree: Path
    args: tuple[str, ...] = ()
    python: str = sys.executable


def measure(v: Variant, spec: LoadSpec, *, workers: int, log_path: Path) -> tuple[dict[str, Any], str]:
    """One fresh gateway of ``v``, one load: loadgen's result and the queues the gateway took."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(v.tree), env.get("PYTHONPATH", "")]))
    return duprep_peer.measure_once(spec, workers=workers, repo=v.tree, env=env, log_path=log_path,
                                    extra=v.args, label=v.name, python=v.python)


def summary(ratios: list[float], what: str = "") -> str:
    """The line the notes quote: median B/A, pairs above 1, range."""
    above = sum(r > 1 for r in ratios)
    return (f"{what}B/A median {statistics.median(ratios):.3f} over {len(ratios)} pairs, {above} above 1 "
            f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


def cpu_per_reply(res: dict[str, Any]) -> float:
    """The gateway's CPU time per reply in µs (every watched process, user + sys), 0.0 if not known."""
    ticks = sum(w["user_ticks"] + w["sys_ticks"] for w in res.get("watched", ()))
    return ticks / res["clk_tck"] / res["replies"] * 1e6 if ticks and res.get("replies") else 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a-tree", type=Path, default=REPO, help="source tree of A (default: this checkout)")
    p.add_argument("--b-tree", type=Path, default=REPO, help="source tree of B (default: this checkout)")
    p.add_argument("--a-args", default="", metavar="OPTIONS",
                   help="extra duprep serve options for A, one shell-quoted string; write --a-args=--opt "
                        "when it starts with a dash and has no space")
    p.add_argument("--b-args", default="", metavar="OPTIONS", help="the same for B")
    p.add_argument("--a-python", default=sys.executable, metavar="PATH",
                   help="the interpreter A's gateway runs on (default: this one; it needs msgspec and "
                        "posix_ipc, e.g. another venv's bin/python)")
    p.add_argument("--b-python", default=sys.executable, metavar="PATH", help="the same for B")
    p.add_argument("--pairs", type=int, default=8, help="interleaved pairs (default 8)")
    duprep_peer.add_load_options(p, duration=2.0, apps=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    a = Variant("A", args.a_tree.resolve(), tuple(shlex.split(args.a_args)), args.a_python)
    b = Variant("B", args.b_tree.resolve(), tuple(shlex.split(args.b_args)), args.b_python)
    bad = [f"no duprep source in {v.tree}" for v in (a, b) if not (v.tree / "duprep" / "__init__.py").is_file()]
    bad += [f"no interpreter at {v.python}" for v in (a, b) if not os.access(v.python, os.X_OK)]
    if bad or args.pairs < 1:
        print(f"bad options: {'; '.join(bad) if bad else f'--pairs {args.pairs}'}", file=sys.stderr)
        return 2
    spec = duprep_peer.load_spec(args)
    print(f"A: {a.tree} {shlex.join(a.args)} on {a.python}\nB: {b.tree} {shlex.join(b.args)} on {b.python}\n"
          f"{args.app} N={args.conns} D={args.depth} P={args.payload}, {args.workers} workers", flush=True)
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    try:
        with sysctl.for_run(args), tempfile.TemporaryDirectory(prefix="duprep-ab-") as tmp:
            for i in range(args.pairs):
                rates, cpus, setups = {}, {}, {}
                for v in ((a, b) if i % 2 == 0 else (b, a)):
                    res, setups[v.name] = measure(v, spec, workers=args.workers,
                                                  log_path=Path(tmp, f"serve-{v.name}.log"))
                    errors = {k: n for k, n in res["errors"].items() if n}
                    if errors or not res["replies_per_s"]:
                        print(f"variant {v.name}: the load failed ({errors or 'no replies'}, error codes "
                              f"{res.get('error_codes') or 'none'}); no ratio from it", file=sys.stderr)
                        return 1
                    rates[v.name] = float(res["replies_per_s"])
                    cpus[v.name] = cpu_per_reply(res)
                if i == 0:
                    print(f"A {setups['A']}\nB {setups['B']}", flush=True)
                ratios.append(rates["B"] / rates["A"])
                line = f"pair {i + 1:>2}  A {rates['A']:>11,.0f}  B {rates['B']:>11,.0f}  B/A {ratios[-1]:.3f}"
                if cpus["A"] and cpus["B"]:
                    cpu_ratios.append(cpus["B"] / cpus["A"])
                    line += (f"   CPU per reply A {cpus['A']:.2f} µs  B {cpus['B']:.2f} µs  "
                             f"B/A {cpu_ratios[-1]:.3f}")
                print(line, flush=True)
    except (ServerError, LoadError) as exc:
        print(f"cannot measure: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every gateway was stopped and the queue limits put back", file=sys.stderr)
        return 130
    print(summary(ratios, "throughput "))
    if cpu_ratios:
        print(summary(cpu_ratios, "CPU per reply "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
