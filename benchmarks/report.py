"""Turns harness results into the printed table, the Markdown file and the JSON file.

What: :func:`targets` computes the issue's target ratios from one run (never
absolute timings): the median of the ratios measured in each interleaved
target round when the run has them, else from the matrix cell; :func:`text_tables` is what the terminal shows;
:func:`markdown` is ``benchmarks/results/<stamp>.md``; :func:`write_files`
writes both files plus the plots.  Why apart from the harness: results can be
re-rendered from a saved JSON file (``python -m benchmarks --render FILE``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.plan import TARGET_CELL

__all__ = ["targets", "text_tables", "markdown", "write_files", "mqueue_text"]

MiB = 2**20
IDLE_EPSILON_PCT = 0.1      # "0 % idle CPU" at a resolution ticks cannot give: under 1 ms per second


def _peer(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in results["peers"] if p["name"] == name and p["status"] != "skipped"), None)


def _cell_result(peer: dict[str, Any] | None, app: str, n: int, d: int, p: int) -> dict[str, Any] | None:
    if peer is None:
        return None
    for run in peer["runs"]:
        if (run["app"], run["conns"], run["depth"], run["payload"]) == (app, n, d, p) and run.get("result"):
            return run["result"]  # type: ignore[no-any-return]
    return None


def _memory_at(peer: dict[str, Any] | None, n: int) -> dict[str, Any] | None:
    if peer is None:
        return None
    return next((m for m in peer["memory"] if m["conns"] == n and not m.get("after_load")), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _rounds(results: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The interleaved target rounds of the run ([] for runs without them, and for older JSON files)."""
    return (results.get("target_rounds") or {}).get("rounds") or []


def _round_series(results: dict[str, Any], name: str, metric: str) -> list[float | None]:
    """``name``'s replies/s (``metric`` "rate") or p99 in µs ("p99") in each target round; None: no result."""
    out: list[float | None] = []
    for rnd in _rounds(results):
        res = next((e.get("result") for e in rnd if e["peer"] == name), None)
        out.append(None if not res else res["replies_per_s"] if metric == "rate" else res["lat_us"]["p99"])
    return out


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _per_round(results: dict[str, Any], a: str, b: str, metric: str) -> list[float]:
    """The ratio ``a`` / ``b`` of ``metric`` in each round where both have a result."""
    return [x / y for x, y in zip(_round_series(results, a, metric), _round_series(results, b, metric))
            if x is not None and y]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as ratios measured in this run; ``met`` is None when not measurable."""
    c = TARGET_CELL
    where = f"{c.app}, N={c.conns}, D={c.depth}, P={c.payload}"
    cell = {name: _cell_result(_peer(results, name), c.app, c.conns, c.depth, c.payload)
            for name in ("duprep", "pyzmq", "asyncio", "cecho")}
    matrix = {"rate": {k: (v["replies_per_s"] if v else None) for k, v in cell.items()},
              "p99": {k: (v["lat_us"]["p99"] if v else None) for k, v in cell.items()}}
    out = []

    def add(what: str, value: float | None, goal: str, ok: bool | None, unit: str = "x",
            per_round: list[float] | None = None) -> None:
        out.append({"target": what, "value": value, "unit": unit, "goal": goal,
                    "met": None if value is None else ok, "per_round": per_round})

    def pair(metric: str, label: str, other: str, title: str, goal: str, ok: Callable[[float], bool]) -> None:
        """duprep / ``other``: the median of the ratios measured round by round (each pair seconds apart, so
        drift of the machine between rounds cancels) if both have round results, else the matrix cell."""
        per_round = _per_round(results, "duprep", other, metric)
        if per_round:
            r = _median(per_round)  # type: ignore[arg-type]
            how = f"; median of {len(per_round)} per-round ratios, interleaved rounds"
            spread: list[float] | None = [min(per_round), max(per_round)]
        else:
            r, how, spread = _ratio(matrix[metric]["duprep"], matrix[metric][other]), "", None
        add(f"{label} duprep / {title} ({where}{how})", r, goal, r is not None and ok(r), per_round=spread)

    pair("rate", "throughput", "pyzmq", "pyzmq", "> 1", lambda r: r > 1)
    pair("rate", "throughput", "asyncio", "asyncio+uvloop+pool", "> 1", lambda r: r > 1)
    pair("p99", "p99", "pyzmq", "pyzmq", "< 1", lambda r: r < 1)
    pair("p99", "p99", "asyncio", "asyncio+uvloop+pool", "< 1", lambda r: r < 1)
    pair("rate", "throughput", "cecho", "C epoll echo", ">= 0.5", lambda r: r >= 0.5)
    dm, fm = _memory_at(_peer(results, "duprep"), 5000), _memory_at(_peer(results, "forking"), 5000)
    r = _ratio(dm["rss_bytes"] if dm else None, fm["rss_bytes"] if fm else None)
    note = " (fork RSS extrapolated)" if fm and fm.get("extrapolated") else ""
    add(f"total RSS duprep / fork-per-connection, 5000 idle clients{note}", r, "<= 0.1", r is not None and r <= 0.1)
    r = _ratio(dm["pss_bytes"] if dm else None, fm["pss_bytes"] if fm else None)
    add(f"total PSS duprep / fork-per-connection, 5000 idle clients{note}", r, "(informational)", None)
    dp = _peer(results, "duprep")
    idle = dp["idle_cpu"] if dp else None
    if idle:
        resolution = 100.0 / idle["clk_tck"] / idle["window_s"]
        add(f"duprep idle CPU with {idle['conns']} idle clients over {idle['window_s']:g}s, utime+stime "
            f"(one tick = {resolution:.2f}%)", idle["cpu_pct"], "0 %", idle["ticks"] == 0, unit="%")
        precise = idle.get("cpu_pct_schedstat")
        add("duprep idle CPU, same window, exact runtime from /proc/PID/schedstat", precise,
            f"< {IDLE_EPSILON_PCT} %", precise is not None and precise < IDLE_EPSILON_PCT, unit="%")
    else:
        add("duprep idle CPU", None, "0 %", None, unit="%")
    return out


def mqueue_text(mq: dict[str, Any]) -> str:
    """One line: the fs.mqueue limits a run had, and whether it raised them (benchmarks/sysctl.py)."""
    limits = mq["limits"]
    text = f"msg_max {limits['fs.mqueue.msg_max']}, msgsize_max {limits['fs.mqueue.msgsize_max']}"
    said = [f"raised {', '.join(k.rsplit('.', 1)[1] for k in mq['raised'])} for the run to "
            "systemd/60-duprep.conf's, as an install does; restored after"] if mq["raised"] else []
    said += mq.get("notes", [])
    return text + (f" ({'; '.join(said)})" if said else "")


def _fmt(v: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def _throughput_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    order = {p["name"]: i for i, p in enumerate(results["peers"])}
    runs = [(r, p) for p in results["peers"] for r in p["runs"]]
    runs.sort(key=lambda rp: (rp[0]["app"] != "echo", rp[0]["app"], rp[0]["conns"], rp[0]["depth"],
                              rp[0]["payload"], order[rp[1]["name"]]))
    for run, peer in runs:
        head = [run["app"], str(run["conns"]), str(run["depth"]), str(run["payload"]), peer["title"]]
        res = run.get("result")
        if run["status"] != "ok" or not res:
            rows.append(head + ["-"] * 6 + [f"{run['status']}: {run.get('reason', '')}"])
            continue
        lat = res["lat_us"]
        errors = sum(res["errors"].values())
        rows.append(head + [f"{res['replies_per_s']:,.0f}", f"{lat['p50'] / 1e3:.2f}", f"{lat['p99'] / 1e3:.2f}",
                            f"{lat['p999'] / 1e3:.2f}", str(errors), f"{res['loadgen_cpu_pct']:.0f}", _run_note(res)])
    return rows


THROUGHPUT_HEAD = ["app", "N", "D", "P", "peer", "replies/s", "p50 ms", "p99 ms", "p99.9 ms", "errors",
                   "loadgen CPU %", "note"]


def _run_note(res: dict[str, Any]) -> str:
    """Non-zero error kinds, connections that never came up, a server that answered nothing."""
    parts = [f"{k} {v}" for k, v in res["errors"].items() if v]
    if res.get("error_codes"):
        parts.append("ERROR codes " + ", ".join(f"{_code_name(int(c))} x{n}" for c, n in res["error_codes"].items()))
    if res["mode"] == "persistent" and res["connected"] < res["conns"]:
        parts.append(f"{res['connected']}/{res['conns']} connected")
    if not res.get("replies", 1) and res.get("outstanding"):
        parts.append(f"STALLED: no reply in the window, {res['outstanding']} requests outstanding")
    return ", ".join(parts)
MEMORY_HEAD = ["peer", "idle clients", "processes", "total RSS MiB", "total PSS MiB", "set-up s", "note"]


# duprep's ErrorCode names (duprep/frame.py), for the notes.
_CODES = {1: "BAD_FRAME", 2: "FRAME_TOO_LARGE", 3: "BAD_HELLO", 4: "BAD_VERSION", 5: "NAME_TAKEN",
          6: "SERVER_FULL", 7: "TOO_MANY_FROM_IP", 8: "UNKNOWN_TARGET", 9: "HANDSHAKE_TIMEOUT",
          10: "SHUTTING_DOWN", 11: "APP_ERROR", 12: "SLOW_CONSUMER"}


def _code_name(code: int) -> str:
    return _CODES.get(code, str(code))


def _memory_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for peer in results["peers"]:
        for m in peer["memory"]:
            t = "~" if m["extrapolated"] else ""
            note = f"extrapolated from {m['extrapolated_from']} clients" if m["extrapolated"] else ""
            if not m["extrapolated"] and m["conns"] and m["connected"] < m["conns"]:
                note = f"only {m['connected']} connected"
                if m.get("error_codes"):
                    note += " (ERROR " + ", ".join(f"{_code_name(int(c))} x{n}"
                                                   for c, n in m["error_codes"].items()) + ")"
            if m.get("after_load"):
                note = "after the throughput cells, no clients"
            clients = "after load" if m.get("after_load") else str(m["conns"])
            rows.append([peer["title"], clients, f"{t}{m['processes']}", f"{t}{m['rss_bytes'] / MiB:,.1f}",
                         f"{t}{m['pss_bytes'] / MiB:,.1f}", _fmt(m.get("setup_s")), note])
    return rows


def _idle_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for peer in results["peers"]:
        idle = peer.get("idle_cpu")
        if idle:
            exact = idle.get("cpu_pct_schedstat")
            rows.append([peer["title"], str(idle["conns"]), f"{idle['window_s']:g}", str(idle["ticks"]),
                         f"{idle['cpu_pct']:.2f}", _fmt(exact, ".3f")])
    return rows


IDLE_HEAD = ["peer", "idle clients", "window s", "CPU ticks", "CPU % (ticks)", "CPU % (schedstat)"]


def _target_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in targets(results):
        val = _fmt(t["value"], ".3f", t["unit"] if t["unit"] != "x" else "")
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        spread = t.get("per_round")
        rows.append([t["target"], val, f"{spread[0]:.3f}..{spread[1]:.3f}" if spread else "", t["goal"], met])
    return rows


TARGET_HEAD = ["target (ratio in this run)", "value", "per round min..max", "goal", "met"]


def _round_head(results: dict[str, Any]) -> list[str]:
    return ["peer", *[f"round {i + 1}" for i in range(len(_rounds(results)))], "median"]


def _round_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per round peer: replies/s / p99 ms in each round, then the medians."""
    titles = {p["name"]: p["title"] for p in results["peers"]}
    rows = []
    for name in (results.get("target_rounds") or {}).get("order", []):
        cells = []
        for rnd in _rounds(results):
            entry = next((e for e in rnd if e["peer"] == name), {})
            res = entry.get("result")
            cells.append(f"{res['replies_per_s']:,.0f} / {res['lat_us']['p99'] / 1e3:.2f}" if res
                         else "error" if entry.get("error") else "-")
        rate, p99 = _median(_round_series(results, name, "rate")), _median(_round_series(results, name, "p99"))
        median = f"{rate:,.0f} / {p99 / 1e3:.2f}" if rate is not None and p99 is not None else "n/a"
        rows.append([titles.get(name, name), *cells, median])
    return rows


def _round_lines(results: dict[str, Any]) -> list[str]:
    """What the rounds table does not show: why there are none, the per-round ratios, errors, notes."""
    tr = results.get("target_rounds") or {}
    if not _rounds(results):
        return [f"not run: {tr.get('reason') or 'no round completed'}"] + [f"error: {e}" for e in tr.get("errors", [])]
    c = tr["cell"]
    lines = [f"{c['app']}, N={c['conns']}, D={c['depth']}, P={c['payload']}; each cell is replies/s / p99 ms; "
             f"warm-up {tr['warmup_s']:g} s + {tr['duration_s']:g} s per load; every server up at once, each "
             f"round drives them in turn, starting one further along the order {', '.join(tr['order'])}"]
    for other in ("cecho", "pyzmq", "asyncio"):
        per_round = _per_round(results, "duprep", other, "rate")
        if per_round:
            lines.append(f"throughput duprep / {other} per round: {', '.join(f'{r:.3f}' for r in per_round)} "
                         f"(min {min(per_round):.3f}, max {max(per_round):.3f})")
    lines += [f"error: {e}" for e in tr["errors"]] + [f"note: {n}" for n in tr["notes"]]
    lines += [f"stop ({s['peer']}): {n}" for s in tr["stops"] for n in s["notes"]]
    return lines


def _cpu_per_reply(entry: dict[str, Any]) -> dict[str, Any] | None:
    """One round load's CPU per reply in µs: the server's (user, sys, by role) and the load generator's.

    None for a load without a result or without the watched processes (files older than this table).
    """
    res = entry.get("result")
    if not res or "watched" not in res or not res["replies"]:
        return None
    per = 1e6 / res["clk_tck"] / res["replies"]
    roles = entry.get("roles", {})
    by_role: dict[str, list[float]] = {}          # role -> [user, sys, processes]
    for w in res["watched"]:
        r = by_role.setdefault(roles.get(str(w["pid"]), "?"), [0.0, 0.0, 0])
        r[0] += w["user_ticks"] * per
        r[1] += w["sys_ticks"] * per
        r[2] += 1
    user, sys_ = sum(r[0] for r in by_role.values()), sum(r[1] for r in by_role.values())
    return {"user": user, "sys": sys_, "total": user + sys_, "processes": len(res["watched"]), "by_role": by_role,
            "loadgen": res["loadgen_cpu_pct"] / 100 * res["measured_s"] * 1e6 / res["replies"]}


CPU_HEAD = ["peer", "server CPU per reply (µs)", "user", "sys", "processes", "loadgen CPU per reply (µs)"]


def _cpu_rows(results: dict[str, Any]) -> list[list[str]]:
    """Per round peer, the round with the median server CPU per reply; duprep's also by role."""
    titles = {p["name"]: p["title"] for p in results["peers"]}
    rows = []
    for name in (results.get("target_rounds") or {}).get("order", []):
        got = [c for rnd in _rounds(results) for e in rnd if e["peer"] == name
               for c in [_cpu_per_reply(e)] if c is not None]
        if not got:
            continue
        mid = sorted(got, key=lambda c: c["total"])[(len(got) - 1) // 2]
        rows.append([titles.get(name, name), f"{mid['total']:.2f}", f"{mid['user']:.2f}", f"{mid['sys']:.2f}",
                     str(mid["processes"]), f"{mid['loadgen']:.2f}"])
        if len(mid["by_role"]) > 1:
            for role, (user, sys_, n) in sorted(mid["by_role"].items(), key=lambda kv: -kv[1][0] - kv[1][1]):
                rows.append([f"  {name} {role}" + (f" x{n}" if n > 1 else ""), f"{user + sys_:.2f}",
                             f"{user:.2f}", f"{sys_:.2f}", str(n), ""])
    return rows


CPU_NOTE = ("CPU PER REPLY: the CPU time (utime/stime, /proc/PID/stat) of each server's processes during the "
            "measurement window, read by the load generator at the window's two ends, divided by the replies in "
            "the window; for each peer the round with the median total. The server and the generator share the "
            "cores, so a peer's rate is about the CPU there is over the sum of the two; when every program's "
            "cost rises together from one round to the next, the machine itself ran slower.")


def _round_section(results: dict[str, Any], table: Callable[[list[str], list[list[str]]], str],
                   bullet: str = "") -> list[str]:
    """The TARGET ROUNDS section (text or Markdown); nothing for result files older than the rounds."""
    if results.get("target_rounds") is None:
        return []
    lines = [f"{bullet}{line}" for line in _round_lines(results)]
    if not _rounds(results):
        return lines
    cpu = _cpu_rows(results)
    return ([table(_round_head(results), _round_rows(results)), ""] + lines
            + (["", CPU_NOTE, "", table(CPU_HEAD, cpu)] if cpu else []))


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _peer_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for p in results["peers"]:
        status = p["status"] + (f" ({p['reason']})" if p.get("reason") else "")
        workers = f", {p['workers']} workers" if p.get("workers") else ""
        lines.append(f"{p['title']}: {status}; client: {p['client']}{workers}")
        lines += [f"    note: {n}" for n in p["notes"]]
        lines += [f"    error: {e}" for e in p["errors"]]
        for s in p["stops"]:
            lines += [f"    stop ({s['app']}): {n}" for n in s["notes"]]
    return lines


def text_tables(results: dict[str, Any]) -> str:
    """The terminal report."""
    parts = ["PEERS", *_peer_lines(results), "", "THROUGHPUT AND LATENCY (closed loop)",
             _text_table(THROUGHPUT_HEAD, _throughput_rows(results)), "", "MEMORY (idle clients)",
             _text_table(MEMORY_HEAD, _memory_rows(results)), "", "IDLE CPU",
             _text_table(IDLE_HEAD, _idle_rows(results)), ""]
    rounds = _round_section(results, _text_table)
    if rounds:
        parts += ["TARGET ROUNDS (interleaved, order rotated each round)", *rounds, ""]
    parts += ["TARGETS", _text_table(TARGET_HEAD, _target_rows(results))]
    return "\n".join(parts)


def markdown(results: dict[str, Any], plots: list[Path]) -> str:
    """The results file: machine, plan, peers, tables, targets, plots."""
    m, plan = results["machine"], results["plan"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    lines = [
        f"# duprep benchmark comparison, {plan['name']} run, {m['date']}", "",
        "Produced by `python -m benchmarks` (benchmarks/README.md explains the peers, the load and how to "
        "read this).  Ratios between peers in this run are what counts; absolute numbers depend on the "
        "machine and on what else ran on it.", "",
        "## Machine", "",
        f"- commit: `{m['commit']}`{' (with uncommitted changes)' if m['dirty'] else ''}",
        f"- date (UTC): {m['date']}",
        f"- nproc {m['nproc']}, memory {m['mem_total_bytes'] / 2**30:.1f} GiB, {m['kernel']} ({m['machine']})",
        f"- Python {m['python']} ({m.get('python_build', 'build not recorded')}); {pk}",
        f"- cc: {m['cc']}; RLIMIT_NOFILE {results['rlimit_nofile']}",
        f"- POSIX queue limits: {mqueue_text(m['mqueue']) if 'mqueue' in m else 'not recorded'}",
        f"- load average (1/5/15 min) before the run {m.get('loadavg_start')}, after {m.get('loadavg_end')}; "
        f"run took {results.get('elapsed_s', 0):.0f} s",
        "",
        "## Plan", "",
        f"- mode `{plan['name']}`: warm-up {plan['warmup_s']:g} s, measurement window {plan['duration_s']:g} s "
        f"per cell; {len(plan['cells'])} cells; business workers per pooled peer: {results['workers']}",
        f"- memory probe with idle clients: {', '.join(map(str, plan['memory_conns']))}; idle CPU over "
        f"{plan['idle_cpu_s']:g} s with {plan['idle_cpu_conns']} idle clients",
        "- load: C closed-loop generator (N connections x D outstanding requests, payload P bytes); "
        "latency = request written to reply read, in the generator",
        *([f"- target rounds: {plan['target_rounds']} (see Target rounds)"] if "target_rounds" in plan else []),
        "",
        "## Peers", "",
        *[f"- {line.strip()}" if not line.startswith("    ") else f"  - {line.strip()}"
          for line in _peer_lines(results)],
        "",
        "## Targets", "",
        _md_table(TARGET_HEAD, _target_rows(results)), "",
        *_md_rounds(results),
        "## Throughput and latency", "",
        _md_table(THROUGHPUT_HEAD, _throughput_rows(results)), "",
        "## Memory with idle clients", "",
        "Sum over the server's leader and all its descendants (/proc/PID/smaps_rollup); RSS counts shared pages "
        "once per process, PSS divides them. `~` marks extrapolated values. Probes run on a freshly started "
        "server; the row marked 'after the throughput cells' shows what the load left behind.", "",
        _md_table(MEMORY_HEAD, _memory_rows(results)), "",
        "## Idle CPU", "",
        "CPU time of all the server's processes while the idle clients stay connected, as % of one core: "
        "utime+stime from /proc/PID/stat (whole clock ticks, sampled) and the scheduler's exact runtime from "
        "/proc/PID/schedstat.", "",
        _md_table(IDLE_HEAD, _idle_rows(results)), "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def _md_rounds(results: dict[str, Any]) -> list[str]:
    section = _round_section(results, _md_table, bullet="- ")
    if not section:
        return []
    return ["## Target rounds", "",
            "The target cell again, after the per-peer passes: the servers of the target ratios' peers run side "
            "by side and each round drives each of them in turn, seconds apart, in an order rotated from round "
            "to round; the targets above are the medians of the ratios measured round by round (the machine's "
            "background load changes from minute to minute, which the per-peer passes, minutes apart, cannot "
            "cancel).",
            "", *section, ""]


def write_files(results: dict[str, Any], out_dir: Path, stamp: str, *, plots: bool = True) -> list[Path]:
    """Write <stamp>.json, <stamp>.md and the PNG plots into ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {**results, "targets": targets(results)}
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    pngs: list[Path] = []
    if plots:
        from benchmarks import plots as plotting
        pngs, why = plotting.draw(results, out_dir, stamp)
        if why:
            results["plots_skipped"] = why
            json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = out_dir / f"{stamp}.md"
    md_path.write_text(markdown(results, pngs))
    return [md_path, json_path, *pngs]
