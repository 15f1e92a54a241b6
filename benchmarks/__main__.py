"""``python -m benchmarks`` (or ``tools/bench``): run the peer comparison of issue #4.

Modes: default full matrix (within 20 minutes on 2 cores), ``--quick`` (under
three minutes), ``--smoke`` / ``--quick --tiny`` (under 30 s, for tests).  After
the per-peer passes, quick and full runs drive the target cell in interleaved
rounds (``--target-rounds R``, 0 for none).  Prints one report and writes
``<out>/<date>-<time>-<mode>.md``, ``.json`` and PNG plots (default
``benchmarks/results/``).

Exit status: 0 when every peer that was not skipped ran cleanly, 1 when a peer
or a target round failed (the files are still written), 2 when the harness
itself cannot run (no C compiler, bad options), 130 on Ctrl-C/SIGTERM (every
server stopped).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from benchmarks import cbuild, harness, machine, report, sysctl
from benchmarks.peers.registry import PEERS, peer_names
from benchmarks.plan import PLANS, custom, default_workers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="reduced matrix, about two minutes (plus about 40 s of target rounds)")
    mode.add_argument("--smoke", action="store_true", help="tiny matrix, under 30 seconds")
    mode.add_argument("--full", action="store_true", help="the whole matrix (default)")
    p.add_argument("--tiny", action="store_true", help="with --quick: same as --smoke")
    p.add_argument("--peers", type=_names, help=f"comma list, in this order (default all: {','.join(peer_names())})")
    p.add_argument("--apps", type=_names, help="comma list of echo,kv (default: the mode's)")
    p.add_argument("--conns", type=_ints, help="comma list of N, replaces the mode's")
    p.add_argument("--depths", type=_ints, help="comma list of D, replaces the mode's")
    p.add_argument("--payloads", type=_ints, help="comma list of P bytes, replaces the mode's")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per cell")
    p.add_argument("--duration", type=float, help="seconds of measurement per cell")
    p.add_argument("--target-rounds", type=int, metavar="R",
                   help="interleaved rounds of the target cell after the per-peer passes "
                        "(default: the mode's, smoke 0, quick 3, full 5; 0: none)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="business worker processes for asyncio, pyzmq and duprep (default: nproc - 1, at "
                        "least 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the result files")
    sysctl.add_option(p)
    p.add_argument("--no-files", action="store_true", help="print the report only")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs")
    p.add_argument("--render", type=Path, metavar="JSON", help="re-print the report of a saved JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        print(report.text_tables(json.loads(args.render.read_text())))
        return 0
    name = "smoke" if args.smoke or (args.quick and args.tiny) else "quick" if args.quick else "full"
    plan = PLANS[name]
    if args.target_rounds is not None and args.target_rounds < 0:
        print("--target-rounds must be 0 or more", file=sys.stderr)
        return 2
    if any(x is not None for x in (args.apps, args.conns, args.depths, args.payloads, args.warmup, args.duration,
                                   args.target_rounds)):
        bad = [a for a in args.apps or [] if a not in ("echo", "kv")]
        if bad:
            print(f"unknown app(s): {', '.join(bad)}", file=sys.stderr)
            return 2
        plan = custom(plan, apps=args.apps, conns=args.conns, depths=args.depths, payloads=args.payloads,
                      warmup_s=args.warmup, duration_s=args.duration, target_rounds=args.target_rounds)
    by_name = {p.name: p for p in PEERS}
    unknown = [n for n in args.peers or [] if n not in by_name]
    if unknown:
        print(f"unknown peer(s): {', '.join(unknown)}; known: {', '.join(by_name)}", file=sys.stderr)
        return 2
    peers = [by_name[n] for n in args.peers] if args.peers else list(PEERS)

    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()
    if load_start[0] > (os.cpu_count() or 1):
        print(f"warning: load average {load_start[0]:.1f} on {os.cpu_count()} cores before the run; "
              "other work will skew the numbers (it is recorded in the results)", flush=True)
    print(f"duprep benchmarks: {name} plan, {len(plan.cells)} cells, peers {', '.join(p.name for p in peers)}, "
          f"{args.workers} workers", flush=True)
    try:
        with sysctl.for_run(args) as mq:
            results = harness.run(plan, peers, workers=args.workers, repo=REPO,
                                  log=lambda line: print(line, flush=True))
    except cbuild.BuildError as exc:
        print(f"cannot build the C load generator: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: every server was stopped; no result files written", file=sys.stderr)
        return 130
    results["machine"] = machine.describe(REPO)
    results["machine"]["mqueue"] = mq
    results["machine"]["loadavg_start"] = [round(x, 2) for x in load_start]
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 1)
    print()
    print(report.text_tables(results))
    if not args.no_files:
        stamp = f"{started:%Y-%m-%d-%H%M%S}-{name}"
        paths = report.write_files(results, args.out, stamp, plots=not args.no_plots)
        print("\nwrote " + ", ".join(str(p) for p in paths))
    print(f"elapsed {results['elapsed_s']:.0f} s")
    failed = any(p["status"] == "failed" for p in results["peers"]) or results["target_rounds"]["errors"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
