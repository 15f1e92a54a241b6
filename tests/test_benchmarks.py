"""The benchmark harness runs end to end (tiny sizes); its numbers are not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_benchmark_smoke_run_writes_its_reports(tmp_path):
    from benchmarks import sysctl
    before = sysctl.current()
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path), "--no-plots"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = os.listdir(tmp_path)
    [report] = [f for f in files if f.endswith(".json")]
    assert any(f.endswith(".md") for f in files)
    data = json.loads((tmp_path / report).read_text())
    text = json.dumps(data)
    assert "duprep" in text and "C epoll echo" in text
    assert data["target_rounds"]["rounds"] == [] and data["target_rounds"]["reason"]   # smoke plan: none
    # The queue limits it ran with are recorded (raised to systemd/60-duprep.conf's if root), and put back.
    mq = data["machine"]["mqueue"]
    conf = sysctl.read_conf(Path(ROOT, "systemd", "60-duprep.conf"))
    if os.geteuid() == 0:
        assert all(mq["limits"][k] >= v for k, v in conf.items()), mq
    assert "POSIX queue limits: msg_max" in (tmp_path / [f for f in files if f.endswith(".md")][0]).read_text()
    assert sysctl.current() == before
    [dup] = [p for p in data["peers"] if p["name"] == "duprep"]
    assert any(n.startswith("queues: requests ") for n in dup["notes"]), dup["notes"]   # the geometry it chose


def test_sensitivity_slows_down_exactly_the_stage_it_names(tmp_path):
    """benchmarks.sensitivity must reach each stage's process: a large wait in one stage
    cuts the throughput of a light load, the baseline does not (or the tool measures nothing)."""
    from benchmarks import sensitivity
    from benchmarks.loadgen import LoadSpec

    (tmp_path / "sitecustomize.py").write_text(sensitivity.SITECUSTOMIZE)
    spec = LoadSpec(port=0, conns=4, depth=1, warmup_s=0.3, duration_s=0.7)

    def rate(stage: str) -> float:
        res = sensitivity.measure(stage, 2000.0, spec, workers=1, site_dir=tmp_path,
                                  log_path=tmp_path / f"{stage}.log")
        return float(res["replies_per_s"])

    # 2 ms of waiting per request in one process: at most 500 requests/s get through it
    assert rate("none") > 2000
    for stage in ("receiver", "sender", "workers"):
        assert rate(stage) < 1000, stage


def test_ab_compares_two_variants_in_interleaved_pairs():
    """benchmarks.ab: each variant gets its own options (B's queue depth shows in its queues line), every
    pair gives a ratio, the summary counts them; the machine's queue limits are put back."""
    from benchmarks import sysctl
    before = sysctl.current()
    out = subprocess.run([sys.executable, "-m", "benchmarks.ab", "--pairs", "2", "--conns", "4", "--depth", "1",
                          "--warmup", "0.2", "--duration", "0.3", "--workers", "1", "--b-args", "--queue-depth 4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("B queues: requests 4 x ") for line in lines), out.stdout
    assert not any(line.startswith("A queues: requests 4 x ") for line in lines), out.stdout
    assert sum(line.startswith("pair ") and " B/A " in line for line in lines) == 2
    assert lines[-1].startswith("B/A median ") and "over 2 pairs" in lines[-1]
    assert sysctl.current() == before
    bad = subprocess.run([sys.executable, "-m", "benchmarks.ab", "--b-tree", "/nonexistent"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no duprep source in /nonexistent" in bad.stderr
