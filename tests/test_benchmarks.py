"""The benchmark harness runs end to end (tiny sizes); its numbers are not judged here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_benchmark_smoke_run_writes_its_reports(tmp_path):
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
