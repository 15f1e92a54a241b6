"""Which duprep process limits throughput: slow one stage down and watch.

What: ``python -m benchmarks.sensitivity`` runs duprep at one load (default
the target cell: echo, N=1000, D=8, P=64) once per stage and round: with no
change (the baseline), and with a fixed busy wait of ``--delay-us`` per
request added to the receiver, to the sender, or to the workers.  Rounds
interleave the stages (rotated each round) and the report gives each stage's
median throughput relative to the baseline's.

Why: the gateway is a pipeline of processes sharing the CPUs, and batch sizes
adapt to whoever is slow, so a stage's CPU time per request does not say how
much it limits throughput.  Adding the same cost to each stage in turn does
(causal profiling by slow-down): the stage whose slow-down costs the most is
where a speed-up pays the most.

How: a ``sitecustomize`` module in a temporary directory on PYTHONPATH wraps
one function of ``duprep.frame`` in every process of the instance, before
the process imports anything else: ``BatchPacker.add`` for Chunks (only the
receiver adds those), ``decode_replies`` (only the sender calls it) and
``decode_chunks`` (only workers call it); the wait is proportional to the
requests or replies the call handles.  duprep itself is not changed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import sysctl
from benchmarks.loadgen import LoadSpec
from benchmarks.peers import duprep_peer

__all__ = ["STAGES", "SITECUSTOMIZE", "measure", "main"]

STAGES = ("none", "receiver", "sender", "workers")
STAGE_ENV, DELAY_ENV = "DUPREP_SLOWDOWN_STAGE", "DUPREP_SLOWDOWN_US"
REPO = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = '''\
"""benchmarks.sensitivity: slow one duprep stage down (this file exists only during a run)."""
import os as _os

_stage = _os.environ.get("DUPREP_SLOWDOWN_STAGE", "none")
_us = float(_os.environ.get("DUPREP_SLOWDOWN_US", "0") or 0)
if _stage != "none" and _us > 0:
    import time as _time
    from duprep import frame as _frame

    def _wait(requests):
        end = _time.perf_counter() + _us * 1e-6 * requests
        while _time.perf_counter() < end:
            pass

    if _stage == "receiver":
        _add = _frame.BatchPacker.add

        def add(self, item, size=-1, count=0):
            if type(item) is _frame.Chunk:
                _wait(_frame._count(item.frames))
            return _add(self, item, size, count)
        _frame.BatchPacker.add = add
    elif _stage == "sender":
        _decode_replies = _frame.decode_replies

        def decode_replies(message):
            items = _decode_replies(message)
            _wait(sum(i.frames for i in items if type(i) is _frame.Deliver))
            return items
        _frame.decode_replies = decode_replies
    elif _stage == "workers":
        _decode_chunks = _frame.decode_chunks

        def decode_chunks(message):
            out = _decode_chunks(message)
            _wait(sum(len(r) if type(r) is list else len(r.requests) for _, r in out))
            return out
        _frame.decode_chunks = decode_chunks
    else:
        raise SystemExit(f"DUPREP_SLOWDOWN_STAGE={_stage!r}: not one of receiver, sender, workers")
'''


def measure(stage: str, delay_us: float, spec: LoadSpec, *, workers: int, site_dir: Path,
            log_path: Path) -> dict[str, Any]:
    """One duprep instance with ``stage`` slowed down, one load; loadgen's result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_dir), str(REPO), env.get("PYTHONPATH", "")]))
    env[STAGE_ENV], env[DELAY_ENV] = stage, str(delay_us)
    return duprep_peer.measure_once(spec, workers=workers, repo=REPO, env=env, log_path=log_path, label=stage)[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay-us", type=float, default=0.3, help="busy wait added per request (default 0.3)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--stages", default=",".join(STAGES[1:]), help="comma list of receiver,sender,workers")
    duprep_peer.add_load_options(p, duration=3.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stages = ["none"] + [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad or args.rounds < 1 or args.delay_us <= 0:
        print(f"bad options: stages {bad or 'ok'}, rounds {args.rounds}, delay {args.delay_us}", file=sys.stderr)
        return 2
    spec = duprep_peer.load_spec(args)
    rates: dict[str, list[float]] = {s: [] for s in stages}
    with sysctl.for_run(args), tempfile.TemporaryDirectory(prefix="duprep-sensitivity-") as tmp:
        site = Path(tmp)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        for r in range(args.rounds):
            order = stages[r % len(stages):] + stages[:r % len(stages)]
            for stage in order:
                res = measure(stage, args.delay_us, spec, workers=args.workers, site_dir=site,
                              log_path=site / "serve.log")
                rates[stage].append(float(res["replies_per_s"]))
                print(f"round {r + 1} {stage:<8} {res['replies_per_s']:>12,.0f} replies/s", flush=True)
    base = statistics.median(rates["none"])
    print(f"\necho N={args.conns} D={args.depth} P={args.payload}, {args.workers} workers, "
          f"+{args.delay_us:g} us per request in one stage; median of {args.rounds} interleaved rounds")
    print(f"{'stage':<10} {'replies/s':>12} {'vs none':>8}")
    for stage in stages:
        med = statistics.median(rates[stage])
        print(f"{stage:<10} {med:>12,.0f} {med / base:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
