"""What a benchmark run measures: the matrix, the windows, the probes and the target rounds.

What: a :class:`Plan` per mode (``smoke`` < 30 s, ``quick`` about two
minutes, ``full`` within 20 minutes on 2 cores) and :func:`custom` to
override its axes from the command line.  Why a separate module: the modes
are the contract with the issue and with tests; the harness only executes.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

__all__ = ["Cell", "Plan", "PLANS", "TARGET_CELL", "custom", "default_workers"]


def default_workers() -> int:
    """Business workers per pooled peer (asyncio's pool, pyzmq's workers, duprep's): one per core but
    one, at least one.  The load generator runs on the same cores, and every peer has front-end
    processes of its own (duprep's receiver and sender, the asyncio loop, the zmq proxy); on 2 cores
    one worker ran duprep a median 3 % faster than two at the target cell (benchmarks/README.md says
    what it does to the other peers)."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True, order=True)
class Cell:
    """One load point: app, N connections, depth D, payload P bytes."""

    app: str
    conns: int
    depth: int
    payload: int


@dataclass(frozen=True)
class Plan:
    name: str
    cells: tuple[Cell, ...]
    memory_conns: tuple[int, ...]       # idle-client counts for the memory probe (echo app)
    idle_cpu_conns: int                 # idle clients while idle CPU is measured
    idle_cpu_s: float
    warmup_s: float
    duration_s: float
    setup_timeout_s: float = 60.0
    memory_extrapolate: bool = True     # let peers with a probe cap (fork) extrapolate above it
    target_rounds: int = 0              # interleaved rounds of TARGET_CELL after the per-peer passes (0: none)

    @property
    def apps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.app for c in self.cells))


# The cell the targets are stated for.
TARGET_CELL = Cell("echo", 1000, 8, 64)


def _grid(app: str, conns: tuple[int, ...], depths: tuple[int, ...], payloads: tuple[int, ...]) -> tuple[Cell, ...]:
    return tuple(Cell(app, n, d, p) for n, d, p in itertools.product(conns, depths, payloads))


PLANS: dict[str, Plan] = {
    "smoke": Plan("smoke", _grid("echo", (10,), (1, 4), (64,)) + _grid("kv", (10,), (4,), (64,)),
                  memory_conns=(10,), idle_cpu_conns=10, idle_cpu_s=0.5, warmup_s=0.2, duration_s=0.5,
                  setup_timeout_s=20.0, target_rounds=0),
    "quick": Plan("quick", _grid("echo", (100, 1000), (1, 8), (64,)) + _grid("kv", (100,), (8,), (64,)),
                  memory_conns=(1000, 5000), idle_cpu_conns=1000, idle_cpu_s=2.0, warmup_s=0.5,
                  duration_s=2.0, target_rounds=3),
    "full": Plan("full", _grid("echo", (10, 100, 1000, 5000), (1, 8), (64, 1024))
                 + _grid("kv", (10, 100, 1000), (1, 8), (64,)),
                 memory_conns=(10, 100, 1000, 5000), idle_cpu_conns=1000, idle_cpu_s=3.0, warmup_s=1.0,
                 duration_s=3.0, setup_timeout_s=120.0, memory_extrapolate=False, target_rounds=5),
}


def custom(base: Plan, *, apps: list[str] | None = None, conns: list[int] | None = None,
           depths: list[int] | None = None, payloads: list[int] | None = None,
           warmup_s: float | None = None, duration_s: float | None = None,
           target_rounds: int | None = None) -> Plan:
    """``base`` with some axes replaced (an axis given replaces it for every app).

    The target rounds only run when the cells still include TARGET_CELL.
    """
    cells: list[Cell] = []
    for app in apps or list(base.apps):
        own = [c for c in base.cells if c.app == app] or [c for c in base.cells if c.app == "echo"]
        n_axis = tuple(conns) if conns else tuple(dict.fromkeys(c.conns for c in own))
        d_axis = tuple(depths) if depths else tuple(dict.fromkeys(c.depth for c in own))
        p_axis = tuple(payloads) if payloads else tuple(dict.fromkeys(c.payload for c in own))
        cells += _grid(app, n_axis, d_axis, p_axis)
    changes: dict[str, object] = {"cells": tuple(cells)}
    if warmup_s is not None:
        changes["warmup_s"] = warmup_s
    if duration_s is not None:
        changes["duration_s"] = duration_s
    if target_rounds is not None:
        changes["target_rounds"] = target_rounds
    return replace(base, **changes)  # type: ignore[arg-type]
