"""Which servers the benchmark compares, and how the harness drives each.

What: one :class:`Peer` record per server: how it is started, which client
talks to it (loadgen's protocol and mode), which part of the matrix it can
take (caps, with the reason printed in the results), and which Python modules
it needs (a missing one makes the harness skip the peer, say so and go on).
Why a table: the harness loops over peers without knowing any of them.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import cbuild
from benchmarks.peers import duprep_peer
from benchmarks.servers import Server, start_announcing

__all__ = ["Launch", "Peer", "PEERS", "peer_names"]


@dataclass(frozen=True)
class Launch:
    """What a launcher gets: the app, worker count and where to put files."""

    app: str
    workers: int
    max_conns: int
    repo: Path
    rundir: Path
    env: dict[str, str]
    log_path: Path
    python: str = sys.executable


@dataclass(frozen=True)
class Peer:
    """One compared server."""

    name: str                           # command-line name
    title: str                          # label in tables and plots
    client: str                         # how the load reaches it (shown in the table)
    proto: str                          # loadgen --proto
    mode: str                           # loadgen --mode for throughput cells
    start: Callable[[Launch], Server]
    apps: tuple[str, ...] = ("echo", "kv")
    requires: tuple[str, ...] = ()      # importable modules it needs
    uses_workers: bool = False
    max_conns: int | None = None        # largest N in throughput cells (None: no cap)
    depths: tuple[int, ...] | None = None   # depths it can take (None: any)
    memory_measured_max: int | None = None  # in quick/smoke plans: measured up to here, extrapolated above
    idle_clients: bool = True           # False: cannot hold idle clients (measured with none)
    notes: tuple[str, ...] = field(default=())

    def missing(self) -> list[str]:
        """Names of required modules that are not importable."""
        out = []
        for mod in self.requires:
            try:
                if importlib.util.find_spec(mod) is None:
                    out.append(mod)
            except (ImportError, ValueError):
                out.append(mod)
        return out


def _python_peer(module: str, *, workers: bool) -> Callable[[Launch], Server]:
    def start(ctx: Launch) -> Server:
        cmd = [ctx.python, "-m", f"benchmarks.peers.{module}", "--app", ctx.app]
        if workers:
            cmd += ["--workers", str(ctx.workers), "--rundir", str(ctx.rundir)]
        return start_announcing(cmd, env=ctx.env, cwd=ctx.repo, log_path=ctx.log_path)
    return start


def _start_cecho(ctx: Launch) -> Server:
    binary = cbuild.build("cecho")
    return start_announcing([str(binary), "--host", "127.0.0.1", "--port", "0"], env=ctx.env, cwd=ctx.repo,
                            log_path=ctx.log_path)


def _start_duprep(ctx: Launch) -> Server:
    return duprep_peer.launch(app=ctx.app, workers=ctx.workers, max_conns=ctx.max_conns, repo=ctx.repo,
                              env=ctx.env, log_path=ctx.log_path, python=ctx.python)


PEERS: tuple[Peer, ...] = (
    Peer("cecho", "C epoll echo", "loadgen, frame, persistent", "frame", "persistent", _start_cecho,
         apps=("echo",),
         notes=("reference line: one C process, one epoll loop, no business work (echo only)",)),
    Peer("forking", "fork per connection", "loadgen, frame, persistent", "frame", "persistent",
         _python_peer("forking", workers=False), requires=("msgspec",), max_conns=1000,
         memory_measured_max=1000,
         notes=("a Python process per connection: N=5000 is not driven for throughput; the memory probe "
                "holds 5000 real clients in the full plan, and in quick/smoke plans is extrapolated above "
                "1000 (parent + N x mean child; the two agreed within 2 % when checked)",)),
    Peer("iterative", "iterative (connect/request/close)", "loadgen, frame, connect-per-request", "frame",
         "connect", _python_peer("iterative", workers=False), requires=("msgspec",), max_conns=1000,
         depths=(1,), idle_clients=False,
         notes=("one connection at a time: driven with N concurrent connect-request-close loops (depth 1, "
                "latency includes connect); N=5000 would overflow the listen backlog and is not driven",
                "memory is measured with no clients: it cannot hold idle connections")),
    Peer("asyncio", "asyncio+uvloop+pool", "loadgen, frame, persistent", "frame", "persistent",
         _python_peer("asyncio_pool", workers=True), requires=("msgspec", "uvloop"), uses_workers=True,
         notes=("one run_in_executor call per request: arguments and result are pickled over the pool's "
                "pipes, as the stdlib does it",)),
    Peer("pyzmq", "pyzmq ROUTER/DEALER", "loadgen, ZMTP 3.0 DEALER, persistent", "zmtp", "persistent",
         _python_peer("zmq_broker", workers=True), requires=("msgspec", "zmq"), uses_workers=True,
         notes=("clients speak ZMTP 3.0 (DEALER) instead of the length-prefixed framing; message bodies are "
                "the same msgpack REQUEST/REPLY arrays; no HELLO/WELCOME",)),
    Peer("duprep", "duprep", "loadgen, frame, persistent", "frame", "persistent", _start_duprep,
         requires=("duprep", "duprep.cli", "posix_ipc", "msgspec"), uses_workers=True),
)


def peer_names() -> list[str]:
    return [p.name for p in PEERS]
