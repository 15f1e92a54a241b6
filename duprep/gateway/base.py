"""What the receiver and the sender share: attach, one loop, a control channel, a table row.

Both are started by the acceptor as ``python -m duprep.gateway.<role>
--config JSON --ctl-fd N``; both ignore TERM/INT/HUP (the acceptor drives
them through the control channel) and leave when the acceptor goes.
"""

from __future__ import annotations

import argparse
from typing import Any
import logging
import signal
import socket

from .. import fdpass, ipcnames
from ..config import GatewayConfig
from ..fdpass import Op
from ..table import ProcRow, Table
from .child import EXIT_CRASH, EXIT_OK, run_child
from .control import Control
from .loop import EventLoop, Timer

__all__ = ["GatewayChild", "child_main", "STATS_INTERVAL"]

STATS_INTERVAL = 1.0     # seconds: counters reach the table at most this late

log = logging.getLogger("duprep")


class GatewayChild:
    """Base of Receiver and Sender; subclasses set ROW and ROLE and implement the hooks."""

    ROW: int
    ROLE: int

    def __init__(self, cfg: GatewayConfig, ctl: socket.socket) -> None:
        self.cfg = cfg
        self.ctl = ctl
        self.table = Table.attach(ipcnames.table_name(cfg.instance))
        previous = list(self.table.proc_part(self.ROW).read_own()[7:])     # we are its writer now
        self.row = ProcRow(self.table, self.ROW, self.ROLE)
        self.row.counters[:] = previous        # a restarted child continues its predecessor's counts
        self.c = self.row.counters
        self.loop = EventLoop()
        self.exit_code = EXIT_OK
        self.control: Control
        self.stats_timer: Timer | None = None
        self.dirty_conns: set[Any] = set()     # connections whose counters are not in the table yet
        self.conns: dict[int, Any] = {}        # by sid: the subclass's per-connection state

    def serve(self) -> int:
        self.control = Control(self.ctl, self.loop, self.on_record, self.on_acceptor_gone)
        self.loop.before_sleep(self.flush)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal(sig, lambda s: None)
        self.setup()
        self.beat()
        self.control.send(Op.READY)
        self.loop.run()
        return self.exit_code

    def beat(self) -> None:
        self.row.beat()
        self.loop.call_later(self.cfg.heartbeat, self.beat)

    # --- statistics: published lazily, at most STATS_INTERVAL late, never while idle ---------

    def touch(self, conn: Any = None) -> None:
        """Counters changed (of ``conn``, or of the process): publish them within STATS_INTERVAL."""
        if conn is not None:
            self.dirty_conns.add(conn)
        if self.stats_timer is None:
            self.stats_timer = self.loop.call_later(STATS_INTERVAL, self.publish_stats)

    def publish_stats(self) -> None:
        self.stats_timer = None
        dirty, self.dirty_conns = self.dirty_conns, set()
        for conn in dirty:
            if self.conns.get(conn.sid) is conn:
                self.publish(conn)
        self.row.beat()

    def on_record(self, rec: fdpass.Record) -> None:
        if rec.op == Op.CONN:
            self.add(rec.sid, rec.generation, rec.fd)
        elif rec.op == Op.STOP:
            self.stop()

    def on_acceptor_gone(self) -> None:
        log.error("the acceptor went away; exiting")
        self.exit_code = EXIT_CRASH
        self.loop.stop()

    # --- hooks ------------------------------------------------------------------
    def setup(self) -> None:
        """Register what else the loop watches."""

    def flush(self) -> None:
        """Before every sleep."""

    def add(self, sid: int, gen: int, fd: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def publish(self, conn: Any) -> None:
        """Write one connection's counters to its part of the table."""
        raise NotImplementedError


def child_main(role: str, cls: type[GatewayChild], argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"duprep-{role}")
    p.add_argument("--config", required=True)
    p.add_argument("--ctl-fd", type=int, required=True)
    args = p.parse_args(argv)
    cfg = GatewayConfig.decode(args.config)
    run_child(role, cfg.instance, lambda: cls(cfg, socket.socket(fileno=args.ctl_fd)).serve)
