"""``duprep demo``: the main job on an embedded default.

Starts a gateway with the sample record app, runs N simulated clients doing
random get/put/delete/list requests for S seconds, prints throughput, latency
percentiles and the connection table, stops the gateway and checks that no
process or IPC object is left.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time

from . import ipcnames
from .client import Client
from .errors import DuprepError
from .launch import start_gateway
from .status import render, snapshot

__all__ = ["run_demo"]


def _client_loop(port: int, name: str, stop: threading.Event, lat: list[float], errors: list[str],
                 started: threading.Barrier) -> None:
    rng = random.Random(name)
    try:
        with Client("127.0.0.1", port, name=name, timeout=10) as c:
            started.wait()
            while not stop.is_set():
                key = f"k{rng.randrange(200)}"
                op = rng.choice(("get", "get", "put", "put", "delete", "list"))
                cmd = {"op": op, "key": key, "value": f"{name}:{rng.random():.6f}", "prefix": key[:2], "limit": 5}
                t0 = time.perf_counter()
                reply = json.loads(c.request(json.dumps(cmd).encode()))
                lat.append(time.perf_counter() - t0)
                if op != "get" and not reply.get("ok"):
                    errors.append(f"{name}: {reply}")
    except (DuprepError, OSError, threading.BrokenBarrierError) as e:
        errors.append(f"{name}: {type(e).__name__}: {e}")
        try:
            started.abort()
        except Exception:
            pass


def _pct(sorted_lat: list[float], p: float) -> float:
    if not sorted_lat:
        return 0.0
    return sorted_lat[min(len(sorted_lat) - 1, int(p / 100 * len(sorted_lat)))] * 1000


def run_demo(*, clients: int = 20, seconds: float = 5.0, workers: int = 2) -> int:
    instance = f"demo-{os.getpid()}"
    tmp = tempfile.mkdtemp(prefix="duprep-demo-")
    env = dict(os.environ, DUPREP_RECORDS_DB=os.path.join(tmp, "records.sqlite"))
    print(f"starting gateway {instance} with the sample record app and {workers} workers ...", flush=True)
    gw = start_gateway(instance, args=["--workers", str(workers), "--max-clients", str(max(64, clients * 2))],
                       env=env)
    code = 1
    try:
        print(f"gateway ready on 127.0.0.1:{gw.port}; {clients} clients for {seconds:g} s", flush=True)
        stop = threading.Event()
        lats: list[list[float]] = [[] for _ in range(clients)]
        errors: list[str] = []
        barrier = threading.Barrier(clients + 1)
        threads = [threading.Thread(target=_client_loop, args=(gw.port, f"client{i}", stop, lats[i], errors, barrier))
                   for i in range(clients)]
        for t in threads:
            t.start()
        barrier.wait(timeout=30)
        t0 = time.perf_counter()
        snap = None
        half = t0 + seconds / 2
        while not stop.wait(max(0.0, min(half, t0 + seconds) - time.perf_counter())):
            if snap is None:
                snap = snapshot(instance)
            if time.perf_counter() >= t0 + seconds:
                stop.set()
        elapsed = time.perf_counter() - t0
        for t in threads:
            t.join(timeout=30)
        all_lat = sorted(x for lat in lats for x in lat)
        n = len(all_lat)
        if snap is not None:
            print("\nconnection table at half time:")
            print(render(snap, limit=25))
        print(f"\n{n} requests in {elapsed:.2f} s: {n / elapsed:,.0f} requests/s")
        print(f"latency ms: p50 {_pct(all_lat, 50):.2f}  p90 {_pct(all_lat, 90):.2f}  "
              f"p99 {_pct(all_lat, 99):.2f}  max {all_lat[-1] * 1000 if all_lat else 0:.2f}")
        print(f"errors: {len(errors)}")
        for e in errors[:10]:
            print("  " + e)
        code = 0 if not errors and n else 1
    finally:
        exit_code = gw.stop()
        print(f"gateway stopped (exit code {exit_code})")
        leftovers = [name for key, name in ipcnames.all_names(instance).items()
                     if os.path.exists(ipcnames.fs_paths(instance)[key])]
        from .queues import unlink
        for key in ("requests", "replies"):
            if unlink(ipcnames.all_names(instance)[key]):
                leftovers.append(ipcnames.all_names(instance)[key])
        print("IPC objects left behind: " + (", ".join(sorted(set(leftovers))) or "none"))
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
        if exit_code != 0 or leftovers:
            code = 1
    sys.stdout.flush()
    return code
