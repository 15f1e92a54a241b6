"""The benchmarks' interleaved target rounds: plan, order, harness phase and report (tiny sizes, C echo only)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import __main__ as cli
from benchmarks import harness, report
from benchmarks.loadgen import LoadError
from benchmarks.peers.registry import PEERS, Launch, Peer
from benchmarks.plan import PLANS, TARGET_CELL, Cell, Plan, custom
from benchmarks.servers import Server, ServerError

from .conftest import ROOT


def test_plans_have_target_rounds_only_with_the_target_cell():
    assert [PLANS[n].target_rounds for n in ("smoke", "quick", "full")] == [0, 3, 5]
    assert TARGET_CELL not in PLANS["smoke"].cells
    assert TARGET_CELL in PLANS["quick"].cells and TARGET_CELL in PLANS["full"].cells
    assert custom(PLANS["quick"], conns=[100]).target_rounds == 3
    assert custom(PLANS["quick"], target_rounds=0).target_rounds == 0


def test_round_order_rotates():
    names = ["cecho", "duprep", "pyzmq", "asyncio"]
    orders = [harness.round_order(names, r) for r in range(5)]
    assert orders[0] == names
    assert orders[1] == ["duprep", "pyzmq", "asyncio", "cecho"]
    assert orders[4] == names
    assert [o[0] for o in orders[:4]] == names      # every peer leads one round
    assert harness.round_order([], 3) == []


def test_negative_target_rounds_is_a_usage_error():
    assert cli.main(["--smoke", "--target-rounds", "-1", "--no-files"]) == 2


def _fake(name: str, start: Any, **kw: Any) -> Peer:
    return Peer(name, f"fake {name}", "loadgen, frame, persistent", "frame", "persistent", start, **kw)


def _cecho() -> Any:
    return next(p for p in PEERS if p.name == "cecho").start


def test_round_phase_runs_interleaved_and_survives_failures(monkeypatch):
    small = Cell("echo", 10, 2, 64)
    monkeypatch.setattr(harness, "TARGET_CELL", small)
    starts: list[Launch] = []

    def start_cecho(launch: Launch) -> Server:
        starts.append(launch)
        return _cecho()(launch)

    def start_broken(launch: Launch) -> Server:
        raise ServerError("does not start")

    calls: list[int] = []
    real_run_load = harness.run_load

    def run_load(binary: Path, spec: Any) -> dict[str, Any]:
        calls.append(spec.port)
        if len(calls) == 5:         # matrix cells of duprep, forking, cecho; round 1: cecho, then duprep fails
            raise LoadError("injected")
        return real_run_load(binary, spec)

    monkeypatch.setattr(harness, "run_load", run_load)
    peers = [_fake("duprep", start_cecho, apps=("echo",)), _fake("pyzmq", start_broken),
             _fake("asyncio", start_cecho, requires=("no_such_module_for_the_test",)),
             _fake("forking", start_cecho), _fake("cecho", start_cecho, apps=("echo",))]
    plan = Plan("test", (small,), memory_conns=(2,), idle_cpu_conns=2, idle_cpu_s=0.1, warmup_s=0.05,
                duration_s=0.1, setup_timeout_s=10.0, target_rounds=2)
    lines: list[str] = []
    results = harness.run(plan, peers, workers=1, repo=Path(ROOT), log=lines.append)

    tr = results["target_rounds"]
    assert tr["peers"] == ["cecho", "duprep", "pyzmq"]        # ROUND_PEERS order; skipped asyncio, not forking
    assert tr["order"] == ["cecho", "duprep"]                 # pyzmq did not start
    assert [[e["peer"] for e in rnd] for rnd in tr["rounds"]] == [["cecho", "duprep"], ["duprep", "cecho"]]
    failed = tr["rounds"][0][1]
    assert (failed["peer"], failed["error"], "result" in failed) == ("duprep", "injected", False)
    assert all("result" in e for rnd in tr["rounds"] for e in rnd if e is not tr["rounds"][0][1])
    assert [e.split(":")[0] for e in tr["errors"]] == ["pyzmq, start", "duprep, round 1"]
    assert sorted(s["peer"] for s in tr["stops"]) == ["cecho", "duprep"]
    assert all(not s["forced"] and not s["leftovers_killed"] for s in tr["stops"])
    for e in (e for rnd in tr["rounds"] for e in rnd if "result" in e):     # CPU per reply: every process
        assert [str(w["pid"]) for w in e["result"]["watched"]] == list(e["roles"])   # of the server, in the window
        assert set(e["roles"].values()) == {"main"} and e["result"]["clk_tck"] > 0
    rounds_launches = [s for s in starts if s.log_path.name.endswith("-rounds.log")]
    assert [(s.app, s.max_conns, s.workers) for s in rounds_launches] == [("echo", 10, 1)] * 2
    assert any(line.startswith("-- target rounds: cecho, duprep, pyzmq; 2 rounds") for line in lines)
    text = report.text_tables(results)
    assert "TARGET ROUNDS" in text and "duprep, round 1: injected" in text and "CPU PER REPLY" in text


def test_round_phase_is_skipped_without_the_target_cell():
    plan = Plan("test", (Cell("echo", 10, 1, 64),), memory_conns=(), idle_cpu_conns=0, idle_cpu_s=0.1,
                warmup_s=0.1, duration_s=0.1, target_rounds=3)
    lines: list[str] = []
    tr = harness._target_rounds(plan, list(PEERS), [], 1, Path(ROOT), Path("/nonexistent"), Path("/nonexistent"),
                                lines.append)
    assert tr["rounds"] == [] and "leave out the target cell" in tr["reason"]
    assert lines == [f"-- target rounds: not run, {tr['reason']}"]


def _result(rate: float, p99_us: float) -> dict[str, Any]:
    return {"replies_per_s": rate, "lat_us": {"p50": p99_us / 2, "p99": p99_us, "p999": p99_us * 2},
            "errors": {}, "loadgen_cpu_pct": 50.0, "mode": "persistent", "connected": 1000, "conns": 1000}


def _results(rounds: bool) -> dict[str, Any]:
    cell = {"app": "echo", "conns": 1000, "depth": 8, "payload": 64, "status": "ok"}
    matrix = {"cecho": (1000.0, 100.0), "duprep": (400.0, 200.0), "pyzmq": (100.0, 900.0)}
    peers = [{"name": n, "title": f"title {n}", "client": "c", "status": "ok", "workers": None, "notes": [],
              "errors": [], "runs": [{**cell, "result": _result(*v)}], "memory": [], "idle_cpu": None, "stops": []}
             for n, v in matrix.items()]
    results: dict[str, Any] = {
        "plan": {"name": "quick", "cells": [], "memory_conns": [], "idle_cpu_s": 1, "idle_cpu_conns": 1,
                 "warmup_s": 0.5, "duration_s": 2.0, "target_rounds": 3},
        "workers": 2, "rlimit_nofile": 1024, "peers": peers,
        "machine": {"commit": "x", "dirty": False, "date": "d", "nproc": 2, "mem_total_bytes": 2**30,
                    "kernel": "k", "machine": "m", "python": "3.11", "packages": {}, "cc": "cc"},
    }
    if rounds:
        per_round = {"cecho": [(1000, 100), (2000, 50), (1500, 80)], "duprep": [(600, 300), (700, 200), (1000, 250)],
                     "pyzmq": [(100, 900), (200, 700), None]}
        order = ["cecho", "duprep", "pyzmq"]
        results["target_rounds"] = {
            "cell": {"app": "echo", "conns": 1000, "depth": 8, "payload": 64}, "rounds_planned": 3,
            "warmup_s": 0.5, "duration_s": 2.0, "peers": order, "order": order, "errors": ["pyzmq, round 3: x"],
            "notes": [], "stops": [],
            "rounds": [[{"peer": n, "result": _result(*per_round[n][r])} if per_round[n][r]
                        else {"peer": n, "error": "x"} for n in harness.round_order(order, r)] for r in range(3)],
        }
    return results


def test_targets_use_the_median_per_round_ratio_and_fall_back_to_the_matrix():
    by = {t["target"].split(" (")[0]: t for t in report.targets(_results(rounds=True))}
    echo = by["throughput duprep / C epoll echo"]
    assert echo["value"] == pytest.approx(600 / 1000)        # ratios 0.6, 0.35, 0.667: paired within each round
    assert echo["per_round"] == pytest.approx([0.35, 1000 / 1500])
    assert "median of 3 per-round ratios" in echo["target"]
    assert by["throughput duprep / pyzmq"]["value"] == pytest.approx((6 + 3.5) / 2)   # pyzmq missed round 3
    assert by["p99 duprep / pyzmq"]["value"] == pytest.approx((300 / 900 + 200 / 700) / 2)
    assert by["throughput duprep / asyncio+uvloop+pool"]["value"] is None   # no asyncio anywhere

    old = {t["target"].split(" (")[0]: t for t in report.targets(_results(rounds=False))}
    assert old["throughput duprep / C epoll echo"]["value"] == pytest.approx(0.4)
    assert old["throughput duprep / C epoll echo"]["per_round"] is None
    assert "interleaved" not in old["throughput duprep / C epoll echo"]["target"]


def test_reports_show_the_rounds_and_render_files_without_them():
    results = _results(rounds=True)
    text = report.text_tables(results)
    assert "TARGET ROUNDS" in text
    assert "1,500 / 0.08" in text                               # cecho's median replies/s / p99 ms
    assert "throughput duprep / cecho per round: 0.600, 0.350, 0.667 (min 0.350, max 0.667)" in text
    md = report.markdown(results, [])
    assert "## Target rounds" in md and "| title duprep | 600 / 0.30 |" in md
    json.dumps(report.targets(results))

    old = _results(rounds=False)
    del old["plan"]["target_rounds"]
    assert "TARGET ROUNDS" not in report.text_tables(old)
    assert "Target rounds" not in report.markdown(old, [])
    smoke = copy.deepcopy(old)
    smoke["target_rounds"] = {"reason": "the plan has no target rounds", "rounds": [], "errors": []}
    assert "not run: the plan has no target rounds" in report.text_tables(smoke)


def test_cpu_per_reply_shows_the_median_round_and_each_process_role():
    results = _results(rounds=True)
    assert "CPU PER REPLY" not in report.text_tables(results)      # files from before the watched processes
    for r, rnd in enumerate(results["target_rounds"]["rounds"]):
        for e in rnd:
            if "result" in e:
                e["result"].update(replies=1000, measured_s=2.0, clk_tck=100, watched=[
                    {"pid": 7, "user_ticks": 10 * (r + 1), "sys_ticks": 5}, {"pid": 8, "user_ticks": 2, "sys_ticks": 0},
                    {"pid": 9, "user_ticks": 2, "sys_ticks": 0}])
                e["roles"] = {"7": "receiver", "8": "worker", "9": "worker"}
                if e["peer"] == "cecho":
                    e["result"]["watched"] = e["result"]["watched"][:1]
                    e["roles"] = {"7": "main"}
    rows = {r[0]: r[1:] for r in report._cpu_rows(results)}
    # one tick over 1000 replies at 100 Hz is 10 µs; the loadgen's 50 % of 2 s over 1000 replies is 1000 µs
    assert rows["title cecho"] == ["250.00", "200.00", "50.00", "1", "1000.00"]     # round 2 of 3: the median
    assert rows["title duprep"] == ["290.00", "240.00", "50.00", "3", "1000.00"]
    assert rows["  duprep receiver"] == ["250.00", "200.00", "50.00", "1", ""]
    assert rows["  duprep worker x2"] == ["40.00", "40.00", "0.00", "2", ""]
    assert rows["title pyzmq"][0] == "190.00"       # two rounds: the lower of the two
    assert list(rows) == ["title cecho", "title duprep", "  duprep receiver", "  duprep worker x2",
                          "title pyzmq", "  pyzmq receiver", "  pyzmq worker x2"]
    assert "CPU PER REPLY" in report.text_tables(results)
    assert "| title duprep | 290.00 |" in report.markdown(results, [])


def test_idlecpu_splits_idle_time_by_what_the_other_cpus_did():
    """benchmarks.idlecpu: each idle period is set against what ran and what waited elsewhere meanwhile;
    two waits that overlap count once in the idle time spent with work waiting."""
    from benchmarks import idlecpu
    text = """\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
    100.001000 [0000]  worker[11]                           0.000      0.000      1.000
    100.002000 [0001]  recv[12]                                                  awakened: w two[14]
    100.003000 [0001]  recv[12]                             0.000      0.000      3.000
    100.003500 [0001]  w two[14]                            0.000      1.000      0.500
    100.004000 [0000]  <idle>                               0.000      0.000      3.000
    100.006000 [0000]  sender[13/13]                        0.000      2.500      2.000
"""
    slices = idlecpu.parse_timehist(text)
    assert [s.name for s in slices] == ["worker", "recv", "w two", "<idle>", "sender"]
    rep = idlecpu.analyse(slices)
    ms = lambda c: {k: round(v * 1e3, 3) for k, v in c.items() if v}   # noqa: E731
    assert round(rep.idle * 1e3, 3) == 3.0 and rep.cpus == {0}
    assert ms(rep.running_elsewhere) == {"recv": 2.0, "w two": 0.5}
    assert ms(rep.waiting_elsewhere) == {"sender": 2.5, "w two": 1.0}
    assert round(rep.idle_with_waiting * 1e3, 3) == 2.5


# --- the run's queue limits (benchmarks/sysctl.py), on stand-in files: pure logic ----------------------------

class _Knob:
    """A stand-in for one /proc/sys file: reads its value, and a write can be made to fail."""

    def __init__(self, value: int, *, writable: bool = True) -> None:
        self.value, self.writable = value, writable

    def read_text(self) -> str:
        return str(self.value)

    def write_text(self, text: str) -> None:
        if not self.writable:
            raise PermissionError("read-only file system")
        self.value = int(text)


def _knobs(monkeypatch: pytest.MonkeyPatch, **writable: bool) -> dict[str, _Knob]:
    from benchmarks import sysctl
    knobs = {"fs.mqueue.msg_max": _Knob(10, writable=writable.get("msg_max", True)),
             "fs.mqueue.msgsize_max": _Knob(8192, writable=writable.get("msgsize_max", True))}
    monkeypatch.setattr(sysctl, "_path", knobs.__getitem__)
    monkeypatch.setattr(sysctl.os, "geteuid", lambda: 0)
    return knobs


def test_run_limits_are_raised_and_put_back_also_when_the_run_is_interrupted(monkeypatch):
    from benchmarks import sysctl
    knobs = _knobs(monkeypatch)
    conf = sysctl.INSTALL_CONF
    with pytest.raises(KeyboardInterrupt):
        with sysctl.production_limits(conf) as mq:
            assert (knobs["fs.mqueue.msg_max"].value, knobs["fs.mqueue.msgsize_max"].value) == (64, 65536)
            assert mq["limits"] == {"fs.mqueue.msg_max": 64, "fs.mqueue.msgsize_max": 65536} and not mq["notes"]
            assert "raised msg_max, msgsize_max for the run" in report.mqueue_text(mq)
            raise KeyboardInterrupt
    assert (knobs["fs.mqueue.msg_max"].value, knobs["fs.mqueue.msgsize_max"].value) == (10, 8192)


def test_a_limit_that_cannot_be_raised_is_kept_and_said_so(monkeypatch):
    from benchmarks import sysctl
    knobs = _knobs(monkeypatch, msgsize_max=False)
    with sysctl.production_limits() as mq:
        assert mq["limits"] == {"fs.mqueue.msg_max": 64, "fs.mqueue.msgsize_max": 8192}
        text = report.mqueue_text(mq)
        assert "raised msg_max for the run" in text and "could not raise fs.mqueue.msgsize_max" in text
    assert knobs["fs.mqueue.msg_max"].value == 10
    with sysctl.production_limits(enabled=False) as mq:
        assert mq["limits"]["fs.mqueue.msg_max"] == 10 and mq["notes"] == ["kept as they were: --stock-mqueue"]
