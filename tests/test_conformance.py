"""A client written in C from docs/protocol.md alone, run against real gateways.

``tests/conformance/client.c`` knows the gateway only through protocol.md (and the docstring of
``duprep.apps.conformance``, which protocol.md 1.14 repeats): its checks are what a client author
in another language can rely on.  This module builds it, starts gateways with the suite's fixtures,
runs it, and fails with its whole output when a check fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from typing import Iterator

import pytest

from duprep.launch import GatewayProcess
from duprep.status import snapshot

from .conftest import wait_until

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "conformance", "client.c")
APP = "duprep.apps.conformance:handle"
HANDSHAKE_S = 2          # --handshake-timeout of the main gateway: check 11l waits for it twice (in parallel)
WORKERS = 2
N_CHECKS = 82         # lines the full run prints (a check that silently stopped running fails the test)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The client, built with every warning an error."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) on PATH")
    exe = str(tmp_path_factory.mktemp("conformance") / "client")
    build = subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o", exe, SOURCE],
                           capture_output=True, text=True, timeout=120)
    if build.returncode != 0:
        pytest.fail(f"client.c does not build (exit {build.returncode}):\n{build.stdout}{build.stderr}", pytrace=False)
    return exe


def serving(instance: str, workers: int) -> dict:
    """Wait until the gateway is ready and its workers have their rows (README: status --json)."""
    def ready() -> dict | None:
        snap = snapshot(instance)
        rows = [p for p in snap.get("processes", []) if p.get("role") == "worker" and p.get("alive")]
        return snap if snap.get("state") == "ready" and len(rows) >= workers else None
    snap = wait_until(ready, timeout=30, what=f"gateway {instance} and its {workers} worker(s)")
    assert isinstance(snap, dict)
    return snap


def run_client(exe: str, *args: object, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run the client to the end (killed if it outlives ``timeout``); stderr (notes) merged into stdout."""
    try:
        return subprocess.run([exe, "127.0.0.1", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:    # subprocess.run has killed it
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"client still running after {timeout} s, killed; its output:\n{out}", pytrace=False)


def results(output: str) -> dict[str, str]:
    """{check name: PASS|FAIL|KNOWN} from the client's output lines."""
    out = {}
    for line in output.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASS", "FAIL", "KNOWN") and "\t" in rest:
            out[rest.split("\t", 1)[0].strip()] = word
    return out


@pytest.fixture
def main_gateway(gateway, instance) -> Iterator[tuple[GatewayProcess, int]]:
    """The gateway of the checks: the conformance app, 2 workers; yields (gateway, max_frame)."""
    gw = gateway("--handshake-timeout", str(HANDSHAKE_S), workers=WORKERS, app=APP)
    snap = serving(instance, WORKERS)
    assert snap["port"] == gw.port
    yield gw, snap["max_frame"]


def test_client_checks(client, main_gateway):
    gw, max_frame = main_gateway
    run = run_client(client, gw.port, max_frame, HANDSHAKE_S, "checks")
    assert run.returncode == 0, f"client exit {run.returncode}; its output:\n{run.stdout}"
    found = results(run.stdout)
    assert len(found) == N_CHECKS and "22 no body above max_frame+260" in found, run.stdout
    assert set(found.values()) == {"PASS"}, run.stdout
    code = gw.stop(timeout=30)
    assert code == 0, f"gateway exit code {code} after SIGTERM"


def test_refusals(client, gateway, instance):
    """11s-11v: SERVER_FULL, TOO_MANY_FROM_IP, which wins, and the place freed after a close."""
    gw = gateway("--max-clients", "2", "--max-per-ip", "1", workers=1, app=APP)
    serving(instance, 1)
    run = run_client(client, gw.port, 0, 0, "refusal", timeout=60)
    assert run.returncode == 0, f"client exit {run.returncode}; its output:\n{run.stdout}"
    assert list(results(run.stdout).values()) == ["PASS"] * 4, run.stdout
    code = gw.stop(timeout=30)
    assert code == 0, f"gateway exit code {code} after SIGTERM"


def test_graceful_stop_says_shutting_down(client, gateway, instance):
    """12: a connection open across a graceful stop gets ERROR SHUTTING_DOWN, then EOF; the gateway exits 0.
    1c: the (sid, generation) of its WELCOME is the connection duprep status shows."""
    gw = gateway(workers=1, app=APP)
    snap = serving(instance, 1)
    proc = subprocess.Popen([client, "127.0.0.1", str(gw.port), str(snap["max_frame"]), "0", "watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready = wait_until(lambda: [l for l in lines if l.startswith("READY ")] or proc.poll() is not None,
                           timeout=15, what="the watching client to connect")
        assert isinstance(ready, list), f"client exited {proc.returncode} before READY:\n{''.join(lines)}"
        _, sid, gen = ready[0].split()
        conns = wait_until(lambda: [c for c in snapshot(instance)["connections"]
                                    if c["sid"] == int(sid) and c["generation"] == int(gen)],
                           timeout=5, what=f"connection sid {sid} generation {gen} in duprep status")
        assert conns[0]["name"] == "spec-watcher" and conns[0]["ready"], conns  # type: ignore[index]

        code = gw.stop(timeout=30)
        assert code == 0, f"gateway exit code {code} after SIGTERM"
        assert proc.wait(timeout=20) == 0, "".join(lines)
        reader.join(timeout=5)
        assert any(l.startswith("PASS 12 SHUTTING_DOWN at stop") for l in lines), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
