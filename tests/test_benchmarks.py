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
    conf = sysctl.read_conf(sysctl.INSTALL_CONF)
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
                          "--warmup", "0.2", "--duration", "0.3", "--workers", "1", "--b-args", "--queue-depth 4",
                          "--b-python", sys.executable],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[1] == f"B: {Path(ROOT).resolve()} --queue-depth 4 on {sys.executable}", out.stdout
    assert any(line.startswith("B queues: requests 4 x ") for line in lines), out.stdout
    assert not any(line.startswith("A queues: requests 4 x ") for line in lines), out.stdout
    assert sum(line.startswith("pair ") and " B/A " in line for line in lines) == 2
    summary = [line for line in lines if " B/A median " in line]
    assert summary[0].startswith("throughput B/A median ") and "over 2 pairs" in summary[0], out.stdout
    # CPU per reply only for pairs where both loads lasted a clock tick of the gateway's CPU time
    assert summary[1:] == [] or summary[1].startswith("CPU per reply B/A median "), out.stdout
    assert sysctl.current() == before
    bad = subprocess.run([sys.executable, "-m", "benchmarks.ab", "--b-tree", "/nonexistent"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no duprep source in /nonexistent" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "benchmarks.ab", "--a-python", "/nonexistent/python"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no interpreter at /nonexistent/python" in bad.stderr
    # A load with errors gives no ratio: B's frames are too large for its queues, so it closes every connection.
    failed = subprocess.run([sys.executable, "-m", "benchmarks.ab", "--pairs", "1", "--conns", "2", "--depth", "1",
                             "--payload", "2000", "--warmup", "0.2", "--duration", "0.3", "--workers", "1",
                             "--b-args", "--queue-size 1024"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "variant B: the load failed" in failed.stderr, failed.stdout + failed.stderr
    assert "B/A" not in failed.stdout and sysctl.current() == before


def test_ab_stopped_by_sigterm_stops_its_gateway_and_puts_the_limits_back():
    import signal
    import time
    from benchmarks import procfs, sysctl
    before = sysctl.current()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ab", "--pairs", "3", "--conns", "4", "--depth", "1",
                             "--warmup", "0.2", "--duration", "30", "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def cmdline(pid: int) -> bytes:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    return f.read()
            except OSError:
                return b""

        def up(procs: list[procfs.ProcInfo]) -> bool:      # receiver, sender and worker all started
            lines = [cmdline(p.pid) for p in procs]
            return all(any(w in c for c in lines) for w in (b"gateway.receiver", b"gateway.sender", b"worker"))

        deadline = time.monotonic() + 60
        gateway = procfs.descendants(proc.pid)
        while not up(gateway) and time.monotonic() < deadline:
            time.sleep(0.05)
            gateway = procfs.descendants(proc.pid)
        assert up(gateway), gateway
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err, out + err
    assert sysctl.current() == before
    assert all(procfs.start_time(p.pid) != p.start for p in gateway)     # every gateway process is gone
