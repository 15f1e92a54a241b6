"""Draws the result PNGs: throughput and p99 against client count, memory against client count.

What: three figures per run, ``<stamp>-throughput.png``, ``<stamp>-p99.png``
(one panel per app/depth/payload, one line per peer, log axes) and
``<stamp>-memory.png`` (total RSS solid, PSS dashed; hollow markers are
extrapolated).  Why optional: matplotlib is a benchmark-only dependency; when
it is missing the run still writes its tables and says why there are no plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["draw"]


def _panels(results: dict[str, Any]) -> list[tuple[str, int, int]]:
    keys = {(r["app"], r["depth"], r["payload"]) for p in results["peers"] for r in p["runs"] if r.get("result")}
    return sorted(keys, key=lambda k: (k[0] != "echo", k))


def _series(peer: dict[str, Any], key: tuple[str, int, int], metric: str) -> tuple[list[int], list[float]]:
    pts = []
    for r in peer["runs"]:
        res = r.get("result")
        if res and (r["app"], r["depth"], r["payload"]) == key:
            pts.append((r["conns"], res["replies_per_s"] if metric == "rate" else res["lat_us"]["p99"] / 1e3))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def draw(results: dict[str, Any], out_dir: Path, stamp: str) -> tuple[list[Path], str | None]:
    """Write the PNGs; return their paths and, if none could be drawn, why."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install -r benchmarks/requirements.txt)"
    peers = [p for p in results["peers"] if p["status"] != "skipped"]
    # One colour per peer across all figures, whatever subset a panel shows.
    color = {p["name"]: f"C{i % 10}" for i, p in enumerate(results["peers"])}
    panels = _panels(results)
    out: list[Path] = []
    date = results["machine"]["date"]
    for metric, label, fname in (("rate", "replies/s", "throughput"), ("p99", "p99 latency (ms)", "p99")):
        if not panels:
            break
        cols = min(2, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
        for ax, key in zip(axes.flat, panels):
            for peer in peers:
                xs, ys = _series(peer, key, metric)
                if xs:
                    ax.plot(xs, ys, marker="o", label=peer["title"], color=color[peer["name"]])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{key[0]}, D={key[1]}, P={key[2]}")
            ax.set_xlabel("clients (N)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{label} against client count ({results['plan']['name']} run, {date})")
        fig.tight_layout()
        path = out_dir / f"{stamp}-{fname}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    if any(p["memory"] for p in peers):
        fig, ax = plt.subplots(figsize=(8, 5))
        for peer in peers:
            pts = sorted((m["conns"], m["rss_bytes"] / 2**20, m["pss_bytes"] / 2**20, m["extrapolated"])
                         for m in peer["memory"] if not m.get("after_load"))
            if not pts:
                continue
            xs = [max(p[0], 1) for p in pts]
            c = color[peer["name"]]
            ax.plot(xs, [p[1] for p in pts], marker="o", color=c, label=f"{peer['title']} RSS")
            ax.plot(xs, [p[2] for p in pts], linestyle="--", color=c, label=f"{peer['title']} PSS")
            ext = [p for p in pts if p[3]]
            if ext:
                ax.plot([p[0] for p in ext], [p[1] for p in ext], marker="o", linestyle="none",
                        markerfacecolor="white", color=c, markersize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("idle clients (0 plotted at 1; hollow = extrapolated)")
        ax.set_ylabel("MiB, sum over the server's processes")
        ax.set_title(f"memory against client count ({results['plan']['name']} run, {date})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"{stamp}-memory.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out, None if out else "nothing to plot"
