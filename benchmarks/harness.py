"""Runs the comparison: every peer in turn, the same loads, the same probes.

What: for each peer and app, start the server (in its own process group), run the
plan's throughput cells with the C load generator, then (echo app) probe its
memory with N idle clients and its CPU while idle, stop it, and record all of
it, including why a cell or a peer was skipped or failed, in one plain dict
(:mod:`benchmarks.report` turns it into tables, files and plots).  A peer that
is missing a dependency, fails to start or dies is recorded and the run goes
on; only Ctrl-C/SIGTERM ends it early, and then too every server is stopped.

Then the target rounds: the servers of the target ratios' peers (cecho,
duprep, pyzmq, asyncio) run side by side and each round drives each of them
in turn with the target cell, in an order rotated from round to round.  Why:
the per-peer passes measure two peers' target cell minutes apart, and on a
shared machine the background changes in minutes; loads seconds apart, over
several rounds, give ratios measured under the same conditions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shutil
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import apps, cbuild, procfs
from benchmarks.loadgen import IdleClients, LoadError, LoadSpec, run_load
from benchmarks.peers.registry import Launch, Peer
from benchmarks.plan import TARGET_CELL, Cell, Plan
from benchmarks.servers import Server, ServerError, wait_until

__all__ = ["run", "raise_nofile"]

Log = Callable[[str], None]
SETTLE_TIMEOUT = 20.0       # seconds to wait for a server's process count to come back to baseline
IDLE_SETTLE_S = 1.5         # seconds between the idle clients' set-up and the idle CPU window
ROUND_PEERS = ("cecho", "duprep", "pyzmq", "asyncio")  # the target ratios' peers, in target-round order


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by servers and loadgen)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cap_reason(peer: Peer, cell: Cell) -> str | None:
    if cell.app not in peer.apps:
        return f"{peer.title} serves only {', '.join(peer.apps)}"
    if peer.depths is not None and cell.depth not in peer.depths:
        return f"depth {cell.depth} not applicable ({peer.client})"
    if peer.max_conns is not None and cell.conns > peer.max_conns:
        return f"N capped at {peer.max_conns} for this peer"
    return None


def _server_env(repo: Path) -> dict[str, str]:
    """The environment of a peer server: ours, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH", "")]))
    return env


def _load_spec(peer: Peer, plan: Plan, port: int, cell: Cell) -> LoadSpec:
    """The closed-loop load of ``cell`` for ``peer`` (the same in the matrix and in the target rounds)."""
    return LoadSpec(port=port, conns=cell.conns, depth=cell.depth, payload=cell.payload, mode=peer.mode,
                    proto=peer.proto, app=cell.app, warmup_s=plan.warmup_s, duration_s=plan.duration_s,
                    setup_timeout_s=plan.setup_timeout_s)


def _load_line(res: dict[str, Any]) -> str:
    """One load's numbers as the progress lines show them."""
    lat = res["lat_us"]
    errors = sum(res["errors"].values())
    codes = f" (ERROR codes {res['error_codes']})" if res.get("error_codes") else ""
    return (f"{res['replies_per_s']:>11,.0f}/s  p50 {lat['p50'] / 1e3:8.2f} ms  p99 {lat['p99'] / 1e3:8.2f} ms"
            f"  errors {errors}{codes}  loadgen cpu {res['loadgen_cpu_pct']:.0f}%")


def _settle(server: Server, baseline: int) -> str | None:
    """Wait until the previous load's connections and processes are gone (bounded); a note if they are not."""
    if not server.alive():
        raise ServerError("server died")
    if wait_until(lambda: len(server.pids()) <= baseline and procfs.tcp_held(server.port) == 0,
                  SETTLE_TIMEOUT, interval=0.1):
        return None
    return (f"did not settle within {SETTLE_TIMEOUT:.0f}s: {len(server.pids())} processes "
            f"(baseline {baseline}), {procfs.tcp_held(server.port)} connections still held")


class _PeerRun:
    """Everything measured for one peer."""

    def __init__(self, peer: Peer, plan: Plan, workers: int, repo: Path, rundir: Path,
                 loadgen: Path, log: Log) -> None:
        self.peer, self.plan, self.workers = peer, plan, workers
        self.repo, self.rundir, self.loadgen, self.log = repo, rundir, loadgen, log
        self.rec: dict[str, Any] = {
            "name": peer.name, "title": peer.title, "client": peer.client, "status": "ok",
            "workers": workers if peer.uses_workers else None, "notes": list(peer.notes),
            "errors": [], "runs": [], "memory": [], "idle_cpu": None, "stops": [],
        }

    def execute(self) -> dict[str, Any]:
        missing = self.peer.missing()
        if missing:
            self.rec["status"] = "skipped"
            self.rec["reason"] = (f"missing Python module(s) {', '.join(missing)} "
                                  "(pip install -r benchmarks/requirements.txt)")
            self.log(f"-- {self.peer.name}: SKIPPED, {self.rec['reason']}")
            return self.rec
        memory_app = "echo" if "echo" in self.plan.apps else self.plan.apps[0]
        for app in self.plan.apps:
            cells = [c for c in self.plan.cells if c.app == app]
            runnable = []
            for cell in cells:
                reason = _cap_reason(self.peer, cell)
                if reason:
                    self.rec["runs"].append({**dataclasses.asdict(cell), "status": "skipped", "reason": reason})
                else:
                    runnable.append(cell)
            probe = app == memory_app and app in self.peer.apps
            if runnable or probe:
                self._with_server(app, runnable, probe)
        if self.rec["errors"] and self.rec["status"] == "ok":
            self.rec["status"] = "failed"
        return self.rec

    def _with_server(self, app: str, cells: list[Cell], probe: bool) -> None:
        env = _server_env(self.repo)
        if app == "kv":
            db = self.rundir / f"{self.peer.name}-kv.sqlite"
            apps.prepare_kv_db(str(db))
            env[apps.KV_DB_ENV] = str(db)
        max_conns = max([c.conns for c in cells] + list(self.plan.memory_conns if probe else []) + [1])
        launch = Launch(app=app, workers=self.workers, max_conns=max_conns, repo=self.repo,
                        rundir=self.rundir, env=env, log_path=self.rundir / f"{self.peer.name}-{app}.log")
        server: Server | None = None
        try:
            server = self.peer.start(launch)
            baseline = len(server.pids())
            self.log(f"-- {self.peer.name} [{app}] up on port {server.port}, {baseline} process(es)"
                     + (f"; {server.setup}" if server.setup else ""))
            if server.setup and server.setup not in self.rec["notes"]:
                self.rec["notes"].append(server.setup)
            if probe:               # on the fresh server, so that earlier load does not count
                self._probes(server, baseline)
            for cell in cells:
                self._settle(server, baseline)
                self._cell(server, cell)
            if probe and cells:     # what the load left behind (buffers, caches, leaks)
                self._settle(server, baseline)
                self._sample(server, 0, None, cpu=False, after_load=True)
        except (ServerError, LoadError, cbuild.BuildError, OSError) as exc:
            self.rec["errors"].append(f"{app}: {exc}")
            self.log(f"-- {self.peer.name} [{app}]: FAILED: {exc}")
        except Exception as exc:  # a harness bug: record it with its traceback, go on with the next peer
            text = "".join(traceback.format_exception(exc))
            self.rec["errors"].append(f"{app}: internal error: {text}")
            self.log(f"-- {self.peer.name} [{app}]: INTERNAL ERROR:\n{text}")
        finally:
            if server is not None:
                report = server.stop()
                self.rec["stops"].append({"app": app, **dataclasses.asdict(report)})
                for note in report.notes:
                    self.log(f"-- {self.peer.name} [{app}] stop: {note}")

    def _settle(self, server: Server, baseline: int) -> None:
        """Wait until the previous load's connections and processes are gone (bounded)."""
        note = _settle(server, baseline)
        if note:
            self.rec["notes"].append(note)
            self.log(f"   {note}")

    def _cell(self, server: Server, cell: Cell) -> None:
        spec = _load_spec(self.peer, self.plan, server.port, cell)
        entry: dict[str, Any] = {**dataclasses.asdict(cell), "status": "ok", "mode": spec.mode, "proto": spec.proto}
        try:
            res = run_load(self.loadgen, spec)
        except LoadError as exc:
            entry.update(status="failed", reason=str(exc))
            self.rec["runs"].append(entry)
            self.rec["errors"].append(f"{cell}: {exc}")
            self.log(f"   {cell.app:4} N={cell.conns:<5} D={cell.depth} P={cell.payload:<5} FAILED {exc}")
            return
        entry["result"] = res
        self.rec["runs"].append(entry)
        self.log(f"   {cell.app:4} N={cell.conns:<5} D={cell.depth} P={cell.payload:<5}{_load_line(res)}")
        if not server.alive():
            raise ServerError(f"server died during {cell}")

    def _probes(self, server: Server, baseline: int) -> None:
        plan, peer = self.plan, self.peer
        if not peer.idle_clients:
            self._settle(server, baseline)
            self._sample(server, 0, None, cpu=True)
            return
        limit = peer.memory_measured_max if plan.memory_extrapolate else None
        measured = [n for n in plan.memory_conns if limit is None or n <= limit]
        if not measured and limit is not None:
            measured = [limit]
        cpu_n = plan.idle_cpu_conns if plan.idle_cpu_conns in measured else max(measured)
        for n in measured:
            self._settle(server, baseline)
            spec = LoadSpec(port=server.port, conns=n, mode="idle", proto=peer.proto, app="echo",
                            setup_timeout_s=plan.setup_timeout_s)
            with IdleClients(self.loadgen, spec) as idle:
                self._sample(server, n, idle, cpu=(n == cpu_n))
            if not server.alive():
                raise ServerError(f"server died with {n} idle clients")
        for n in plan.memory_conns:
            if n not in measured:
                self._extrapolate(n)

    def _sample(self, server: Server, n: int, idle: IdleClients | None, *, cpu: bool,
                after_load: bool = False) -> None:
        pids = server.pids()
        rss, pss = procfs.memory(pids)
        leader_rss, leader_pss = procfs.memory([server.pid])
        ready = idle.ready if idle else {}
        rec = {"conns": n, "connected": ready.get("connected", 0), "setup_s": ready.get("setup_s"),
               "processes": len(pids), "rss_bytes": rss, "pss_bytes": pss, "leader_rss_bytes": leader_rss,
               "leader_pss_bytes": leader_pss, "extrapolated": False, "after_load": after_load,
               "errors": sum(ready.get("errors", {}).values()) if ready else 0,
               "error_codes": ready.get("error_codes", {})}
        self.rec["memory"].append(rec)
        what = ("after the load, no clients" if after_load
                else f"with {n:>5} idle clients ({rec['connected']} connected)")
        msg = (f"   memory {what}: {len(pids):>5} processes, "
               f"RSS {rss / 2**20:8.1f} MiB, PSS {pss / 2**20:8.1f} MiB")
        if rec["errors"]:
            msg += f", errors {rec['errors']} (ERROR codes {rec['error_codes']})"
        if cpu:
            # Idle means the steady state: let what the clients' set-up left to do (deferred
            # bookkeeping such as duprep's counters, published up to 1 s late) finish first.
            if idle:
                idle.alive_after(IDLE_SETTLE_S)
            else:
                wait_until(lambda: not server.alive(), IDLE_SETTLE_S)
            before, before_ns = procfs.cpu_ticks(pids), procfs.cpu_ns(pids)
            window = self.plan.idle_cpu_s
            ok = idle.alive_after(window) if idle else not wait_until(lambda: not server.alive(), window)
            after, after_ns = procfs.cpu_ticks(pids), procfs.cpu_ns(pids)
            ticks = sum(after[p] - before[p] for p in after if p in before)
            ns = sum(after_ns[p] - before_ns[p] for p in after_ns if p in before_ns)
            pct = 100.0 * ticks / procfs.CLK_TCK / window
            pct_ns = 100.0 * ns / 1e9 / window
            self.rec["idle_cpu"] = {"conns": n, "window_s": window, "ticks": ticks, "clk_tck": procfs.CLK_TCK,
                                    "cpu_pct": pct, "cpu_ns": ns, "cpu_pct_schedstat": pct_ns, "valid": ok}
            msg += f", idle CPU {pct:.2f}% (ticks), {pct_ns:.3f}% (schedstat) over {window:g}s"
        self.log(msg)

    def _extrapolate(self, n: int) -> None:
        base = max((m for m in self.rec["memory"]
                    if not m["extrapolated"] and not m["after_load"] and m["processes"] > 1),
                   key=lambda m: m["conns"], default=None)
        if base is None:
            return
        children = base["processes"] - 1
        est = {k: base[f"leader_{k}"] + n * (base[k] - base[f"leader_{k}"]) / children
               for k in ("rss_bytes", "pss_bytes")}
        rec = {"conns": n, "connected": 0, "setup_s": None, "processes": n + 1, **est,
               "leader_rss_bytes": base["leader_rss_bytes"], "leader_pss_bytes": base["leader_pss_bytes"],
               "extrapolated": True, "extrapolated_from": base["conns"], "after_load": False, "errors": 0,
               "error_codes": {}}
        self.rec["memory"].append(rec)
        self.log(f"   memory with {n:>5} idle clients: ~{n + 1} processes, RSS ~{est['rss_bytes'] / 2**20:8.1f} MiB, "
                 f"PSS ~{est['pss_bytes'] / 2**20:8.1f} MiB (extrapolated from {base['conns']})")


def round_order(names: list[str], r: int) -> list[str]:
    """The order of round ``r`` (from 0): ``names`` rotated to start at r mod k.

    Why: so that no peer always runs right after the same other peer, or always first after start-up.
    """
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def round_peers(plan: Plan, peers: list[Peer], recs: list[dict[str, Any]]) -> list[Peer]:
    """The peers of the target rounds: those of ROUND_PEERS that were selected, not skipped, and take TARGET_CELL."""
    skipped = {r["name"] for r in recs if r["status"] == "skipped"}
    by_name = {p.name: p for p in peers}
    return [by_name[n] for n in ROUND_PEERS
            if n in by_name and n not in skipped and _cap_reason(by_name[n], TARGET_CELL) is None]


class _TargetRounds:
    """The interleaved target rounds: every round peer's server up at once, each driven in turn, R times."""

    def __init__(self, peers: list[Peer], plan: Plan, workers: int, repo: Path, rundir: Path,
                 loadgen: Path, log: Log) -> None:
        self.peers, self.plan, self.workers = peers, plan, workers
        self.repo, self.rundir, self.loadgen, self.log = repo, rundir, loadgen, log
        self.servers: dict[str, tuple[Server, int]] = {}    # name -> (server, process count at start)
        self.broken: dict[str, str] = {}                    # name -> why it is no longer driven
        self.rec: dict[str, Any] = {
            "cell": dataclasses.asdict(TARGET_CELL), "rounds_planned": plan.target_rounds,
            "warmup_s": plan.warmup_s, "duration_s": plan.duration_s, "workers": workers,
            "peers": [p.name for p in peers], "order": [], "rounds": [], "errors": [], "notes": [], "stops": [],
        }

    def execute(self) -> dict[str, Any]:
        c, n = TARGET_CELL, self.plan.target_rounds
        self.log(f"-- target rounds: {', '.join(p.name for p in self.peers)}; {n} rounds of "
                 f"{c.app} N={c.conns} D={c.depth} P={c.payload}, {self.plan.warmup_s:g} s + "
                 f"{self.plan.duration_s:g} s per load, order rotated each round")
        with contextlib.ExitStack() as stack:    # stops every started server, also on errors and Ctrl-C
            for peer in self.peers:
                self._start(peer, stack)
            up = [p for p in self.peers if p.name in self.servers]
            self.rec["order"] = [p.name for p in up]
            if len(up) < 2:
                self.rec["reason"] = "fewer than two servers came up"
                self.log(f"-- target rounds: not run, {self.rec['reason']}")
                return self.rec
            by_name = {p.name: p for p in up}
            for r in range(n):
                names = round_order(self.rec["order"], r)
                self.log(f"   round {r + 1}/{n}: {', '.join(names)}")
                self.rec["rounds"].append([self._drive(by_name[name], r) for name in names])
        return self.rec

    def _start(self, peer: Peer, stack: contextlib.ExitStack) -> None:
        """Start ``peer``'s echo server as the per-peer pass does; a failure is recorded, the others go on."""
        launch = Launch(app=TARGET_CELL.app, workers=self.workers, max_conns=TARGET_CELL.conns, repo=self.repo,
                        rundir=self.rundir, env=_server_env(self.repo),
                        log_path=self.rundir / f"{peer.name}-rounds.log")
        try:
            server = peer.start(launch)
        except Exception as exc:  # any failure to start (or a harness bug) is recorded; the others still run
            self._error(peer.name, "start", exc)
            return
        stack.callback(self._stop, peer.name, server)
        baseline = len(server.pids())
        self.servers[peer.name] = (server, baseline)
        self.log(f"-- {peer.name} [rounds] up on port {server.port}, {baseline} process(es)"
                 + (f"; {server.setup}" if server.setup else ""))

    def _drive(self, peer: Peer, r: int) -> dict[str, Any]:
        """One load of round ``r`` on ``peer``; its loadgen result, or the error."""
        entry: dict[str, Any] = {"peer": peer.name}
        if peer.name in self.broken:
            entry["error"] = f"not driven: {self.broken[peer.name]}"
            return entry
        server, baseline = self.servers[peer.name]
        where = f"round {r + 1} {peer.name:<8}"
        try:
            note = _settle(server, baseline)
            if note:
                self.rec["notes"].append(f"{peer.name}, round {r + 1}: {note}")
                self.log(f"   {note}")
            pids = server.pids()       # a fixed set while driven (no peer of the rounds forks per client)
            entry["roles"] = {str(pid): procfs.role(pid, server.pid) for pid in pids}
            spec = dataclasses.replace(_load_spec(peer, self.plan, server.port, TARGET_CELL), watch=tuple(pids))
            entry["result"] = run_load(self.loadgen, spec)
            self.log(f"   {where}{_load_line(entry['result'])}")
            if not server.alive():
                raise ServerError("server died during the load")
        except LoadError as exc:            # the server may still be fine: drive it again next round
            entry["error"] = self._error(peer.name, f"round {r + 1}", exc)
        except Exception as exc:            # the server died, or a harness bug: stop driving this peer
            entry["error"] = self.broken[peer.name] = self._error(peer.name, f"round {r + 1}", exc)
        return entry

    def _error(self, name: str, when: str, exc: Exception) -> str:
        """Record and log a failure of ``name``; return its text."""
        known = (ServerError, LoadError, cbuild.BuildError, OSError)
        text = str(exc) if isinstance(exc, known) else "internal error: " + "".join(traceback.format_exception(exc))
        self.rec["errors"].append(f"{name}, {when}: {text}")
        self.log(f"-- {name} [rounds] {when}: FAILED: {text}")
        return text

    def _stop(self, name: str, server: Server) -> None:
        report = server.stop()
        self.rec["stops"].append({"peer": name, **dataclasses.asdict(report)})
        for note in report.notes:
            self.log(f"-- {name} [rounds] stop: {note}")


def _target_rounds(plan: Plan, peers: list[Peer], recs: list[dict[str, Any]], workers: int, repo: Path,
                   rundir: Path, loadgen: Path, log: Log) -> dict[str, Any]:
    """Run the target rounds if the plan asks for them and has the target cell; else say why not."""
    chosen = round_peers(plan, peers, recs)
    reason = None
    if plan.target_rounds <= 0:
        reason = "the plan has no target rounds (--target-rounds R)"
    elif TARGET_CELL not in plan.cells:
        c = TARGET_CELL
        reason = f"the plan's cells leave out the target cell ({c.app}, N={c.conns}, D={c.depth}, P={c.payload})"
    elif len(chosen) < 2:
        reason = (f"needs at least two of {', '.join(ROUND_PEERS)} selected and not skipped "
                  f"(have: {', '.join(p.name for p in chosen) or 'none'})")
    if reason is None:
        return _TargetRounds(chosen, plan, workers, repo, rundir, loadgen, log).execute()
    if plan.target_rounds > 0:
        log(f"-- target rounds: not run, {reason}")
    return {"cell": dataclasses.asdict(TARGET_CELL), "rounds_planned": plan.target_rounds, "reason": reason,
            "peers": [p.name for p in chosen], "order": [], "rounds": [], "errors": [], "notes": [], "stops": []}


def run(plan: Plan, peers: list[Peer], *, workers: int, repo: Path, log: Log = print) -> dict[str, Any]:
    """Measure ``peers`` under ``plan``; return the results (see report.py for their shape)."""
    nofile = raise_nofile()
    loadgen = cbuild.build("loadgen")
    results: dict[str, Any] = {"plan": dataclasses.asdict(plan), "workers": workers, "rlimit_nofile": nofile,
                               "peers": []}
    rundir = Path(tempfile.mkdtemp(prefix="duprep-bench-"))
    try:
        for peer in peers:
            results["peers"].append(_PeerRun(peer, plan, workers, repo, rundir, loadgen, log).execute())
        results["target_rounds"] = _target_rounds(plan, peers, results["peers"], workers, repo, rundir,
                                                  loadgen, log)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)
    return results
