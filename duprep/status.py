"""``duprep status``: the seed's Figure 1, read straight from the shared table."""

from __future__ import annotations

import os
import time
from typing import Any

import posix_ipc

from . import ipcnames
from .errors import ProtocolError
from .lock import gateway_lock_held, rows_held
from .table import FIRST_WORKER_ROW, GatewayState, Table

__all__ = ["snapshot", "unreadable", "render"]

_CHILD_NAMES = {"receiver": "duprep-receiver", "sender": "duprep-sender"}


def _queue(name: str) -> dict[str, int] | None:
    try:
        mq = posix_ipc.MessageQueue(name)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        return None
    try:
        return {"messages": mq.current_messages, "capacity": mq.max_messages, "message_size": mq.max_message_size}
    finally:
        mq.close()


def gateway_alive(instance: str, pid: int) -> bool:
    """Is the gateway of ``instance`` alive?  A gateway killed with SIGKILL leaves its table behind,
    still saying "ready".  The kernel knows: the acceptor holds the instance's gateway lock until it
    dies (lock.gateway_lock_held, right also for a gateway in another pid namespace).  Only if
    /proc/locks cannot be read, look at the process: ``acceptor_alive``."""
    held = gateway_lock_held(instance)
    return acceptor_alive(pid) if held is None else held


def acceptor_alive(pid: int) -> bool:
    """Is ``pid`` a live duprep acceptor?  Its pid may linger as a zombie until its parent reaps it,
    or be reused by an unrelated process, hence the state and name checks."""
    return _running(pid, "duprep-acceptor")


def _running(pid: int, name: str | None = None) -> bool:
    """Is ``pid`` a live process of this pid namespace (not a zombie), named ``name`` if given?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        if name is not None:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != name:
                    return False
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def rows_alive(instance: str, procs: list[dict[str, Any]], gateway_up: bool, acceptor_pid: int) -> dict[int, bool]:
    """Which process rows belong to a live process, ``{row: alive}``.  A row keeps its values after its
    process exits, so the table alone cannot tell.

    * a worker row: its row lock is held (``lock.rows_held``; right in any pid namespace, also for an
      external worker);
    * the acceptor's row: the gateway lock is held (``gateway_alive``);
    * the receiver's and sender's rows (they take no lock): dead with their gateway; otherwise their
      pid is looked at if the acceptor is visible in our pid namespace, else they count as alive
      (their acceptor supervises them).
    If the lock file cannot be opened (another user's), a worker row's pid is looked at instead.
    """
    workers = [p["row"] for p in procs if p["row"] >= FIRST_WORKER_ROW]
    held = rows_held(instance, workers) if workers else {}
    same_ns = gateway_up and acceptor_alive(acceptor_pid)
    alive: dict[int, bool] = {}
    for p in procs:
        row = p["row"]
        if row >= FIRST_WORKER_ROW:
            alive[row] = held[row] if held is not None else _running(p["pid"])
        elif p["role"] == "acceptor":
            alive[row] = gateway_up
        else:
            alive[row] = gateway_up and (not same_ns or _running(p["pid"], _CHILD_NAMES.get(p["role"])))
    return alive


def unreadable(instance: str, error: ProtocolError) -> dict[str, Any]:
    """What status says about a table it cannot read: another duprep's layout, or cut short by a crash."""
    why = str(error)
    if gateway_lock_held(instance):
        why += " (a gateway of this instance is running: stop it first)"
    return {"instance": instance, "state": "unreadable",
            "error": f"instance {instance!r}: unreadable: {why}; 'duprep cleanup --instance {instance}' removes "
                     f"it if no gateway runs"}


def snapshot(instance: str) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data; raises FileNotFoundError if not running, and
    ProtocolError if the table cannot be read (:func:`unreadable` says what to do).

    If the table is there but its acceptor is dead, ``state`` is "crashed"
    and ``error`` says what to do.
    """
    table = Table.attach(ipcnames.table_name(instance))
    try:
        h = table.header()
        state = GatewayState.names.get(h["state"], str(h["state"]))
        error = None
        up = gateway_alive(instance, h["acceptor_pid"])
        if not up:
            if not os.path.exists(ipcnames.fs_paths(instance)["table"]):
                raise FileNotFoundError(ipcnames.table_name(instance))     # it stopped as we looked
            state = "crashed"
            error = (f"the gateway of instance {instance!r} is not running: its acceptor (pid "
                     f"{h['acceptor_pid']}) died without cleaning up, e.g. killed with SIGKILL; what is shown "
                     f"is left from that run. Start the gateway again (it removes the leftovers first), "
                     f"or remove them with 'duprep cleanup --instance {instance}'")
        now_mono, now = time.monotonic(), time.time()
        procs: list[dict[str, Any]] = []
        for p in table.procs():
            if p.pid == 0:
                continue
            procs.append({"role": p.role, "row": p.row, "pid": p.pid, "started": p.started,
                          "heartbeat_age": round(now_mono - p.heartbeat, 3), "counters": p.counters})
        alive = rows_alive(instance, procs, up, h["acceptor_pid"])
        for row in procs:
            row["alive"] = alive[row["row"]]
        conns: list[dict[str, Any]] = []
        for s in table.slots():
            conns.append({
                "sid": s.sid, "generation": s.generation, "state": s.state, "name": s.name,
                "ready": s.ready, "addr": s.addr, "port": s.port, "connected_at": s.connected_at,
                "last_activity": max(s.last_in, s.last_out, s.connected_at),
                "frames_in": s.frames_in, "bytes_in": s.bytes_in, "frames_out": s.frames_out,
                "bytes_out": s.bytes_out, "dropped": s.dropped, "queued_bytes": s.queued})
        totals = {k: sum(c[k] for c in conns) for k in ("frames_in", "bytes_in", "frames_out", "bytes_out", "dropped")}
        totals["connections"] = len(conns)
        for row in procs:
            counters = row["counters"]
            if row["role"] == "sender":
                totals["dropped_stale"] = counters.get("dropped_stale", 0)
                totals["slow_disconnects"] = counters.get("slow_disconnects", 0)
            if row["role"] in ("receiver", "worker"):    # violations found by the receiver, and by workers
                totals["protocol_errors"] = (totals.get("protocol_errors", 0) + counters.get("protocol_errors", 0)
                                             + counters.get("bad_frames", 0))
        snap = {
            "instance": instance, "time": now, "state": state,
            "host": h["host"], "port": h["port"], "epoch": h["epoch"], "started": h["started"],
            "uptime": round(now - h["started"], 3), "acceptor_pid": h["acceptor_pid"],
            "max_clients": h["nslots"], "max_per_ip": h["max_per_ip"], "max_frame": h["max_frame"],
            "accepted": h["accepted"], "refused": h["refused"],
            "heartbeat": h["heartbeat"], "hang_timeout": h["hang_timeout"],
            "queues": {"requests": _queue(ipcnames.request_queue(instance)),
                       "replies": _queue(ipcnames.reply_queue(instance))},
            "processes": procs, "connections": conns, "totals": totals,
        }
        if error:
            snap["error"] = error
        return snap
    finally:
        table.close()


def _span(d: float) -> str:
    return f"{d:.1f}s" if d < 120 else f"{d / 60:.0f}m" if d < 7200 else f"{d / 3600:.0f}h"


def _ago(t: float, now: float) -> str:
    return _span(now - t) if t else "-"


def render(snap: dict[str, Any], *, limit: int = 50) -> str:
    """Human-readable text: header, processes, queues, connections (the first ``limit``), totals.

    Ages ("up", SINCE, IDLE) are as of the snapshot, however late it is rendered.
    """
    now = snap.get("time") or time.time()
    crashed = snap["state"] == "crashed"
    out = [f"instance {snap['instance']}: {snap['state']} on {snap['host']}:{snap['port']}, "
           + (f"acceptor pid {snap['acceptor_pid']} gone, started {_ago(snap['started'], now)} ago"
              if crashed else f"up {_ago(snap['started'], now)}")
           + f", {snap['totals']['connections']}/{snap['max_clients']} clients, "
           f"accepted {snap['accepted']}, refused {snap['refused']}"]
    qs = snap["queues"]
    out.append("queues: " + ", ".join(
        f"{k} {v['messages']}/{v['capacity']} x {v['message_size']} B" if v else f"{k} missing"
        for k, v in qs.items()))
    out.append(f"{'ROLE':<9}{'PID':>8}{'BEAT':>7}  {'STATE':<8}COUNTERS")
    for p in snap["processes"]:          # a row keeps its last values after its process exited
        counters = " ".join(f"{k}={v}" for k, v in p["counters"].items() if v)
        live = "alive" if p.get("alive", True) else "exited"
        out.append(f"{p['role']:<9}{p['pid']:>8}{_span(p['heartbeat_age']):>7}  {live:<8}{counters}".rstrip())
    out.append(f"{'SID':>5} {'GEN':>10} {'NAME':<14}{'ADDRESS':<22}{'SINCE':>7}{'IDLE':>7}"
               f"{'IN':>8}{'IN-B':>10}{'OUT':>8}{'OUT-B':>10}{'DROP':>6}")
    for c in snap["connections"][:limit]:
        addr = f"{c['addr']}:{c['port']}" if c["port"] else c["addr"]
        out.append(f"{c['sid']:>5} {c['generation']:>10} {(c['name'] or '-')[:13]:<14}{addr[:21]:<22}"
                   f"{_ago(c['connected_at'], now):>7}{_ago(c['last_activity'], now):>7}"
                   f"{c['frames_in']:>8}{c['bytes_in']:>10}{c['frames_out']:>8}{c['bytes_out']:>10}{c['dropped']:>6}")
    if len(snap["connections"]) > limit:
        out.append(f"  ... {len(snap['connections']) - limit} more (use --json for all)")
    t = snap["totals"]
    out.append("totals: " + ", ".join(f"{k}={v}" for k, v in t.items()))
    return "\n".join(out)
