"""`looptree pareto`: cost against quality over runs, arms or experiments, and its front.

Why a front and not a single score: "best speed-up per dollar" hides the configuration that
costs twice as much for a little more, which is sometimes the right buy. The front is every
point that no other point beats on both axes (cheaper *and* at least as good); the table marks
it, the terminal plot shows it, `--plot FILE.png|svg` draws it with matplotlib.

A point is a run, or a group of runs: each arm of an experiment (labelled `control` / `test`,
prefixed by the experiment's folder when several are shown), or with `--group config` every
set of runs sharing a config hash. A group's cost is the mean per run; its quality is the
geometric-mean credited speed-up or the success rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from looptree.engine.errors import LooptreeError
from looptree.engine.experiments.catalog import runs_table

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
QUALITIES = {"speedup": "best credited speed-up (geomean)", "success": "success rate"}
COSTS = {"tokens": "tokens per run", "dollars": "dollars per run", "gpu_hours": "GPU-hours per run"}
_COST_COLUMN = {"tokens": "tokens", "dollars": "cost_usd", "gpu_hours": "gpu_hours"}


def points(paths: Iterable[str], *, group: str = "auto", quality: str = "speedup", cost: str = "tokens") -> list[dict[str, Any]]:
    if quality not in QUALITIES:
        raise LooptreeError(f"--quality {quality!r}: use {' or '.join(QUALITIES)}")
    if cost not in COSTS:
        raise LooptreeError(f"--cost {cost!r}: use {', '.join(COSTS)}")
    rows = runs_table(paths)
    if not rows:
        raise LooptreeError("no runs under the given paths")
    experiments = sorted({r["experiment"] for r in rows if r.get("experiment")})

    def key(row: dict[str, Any]) -> str:
        if group == "run" or (group == "auto" and not row.get("experiment")):
            return f"{Path(row['project'] or '?').name}#{row['run']}"
        if group == "config":
            return f"config {row['agent_config_hash']}"
        arm = row.get("arm") or "?"
        return arm if len(experiments) <= 1 else f"{Path(row['experiment']).name}:{arm}"

    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    out = []
    for label, members in groups.items():
        ratios = [r["best_ratio"] for r in members if r.get("best_ratio")]
        speedup = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else None
        success = sum(bool(r.get("success")) for r in members) / len(members)
        column = _COST_COLUMN[cost]
        totals = {name: sum(float(r.get(col) or 0) for r in members) for name, col in _COST_COLUMN.items()}
        out.append({"label": label, "runs": len(members), "speedup": speedup, "success_rate": success,
                    "quality": speedup if quality == "speedup" else success,
                    "cost": sum(float(r.get(column) or 0) for r in members) / len(members),
                    "totals": totals, "on_front": False})
    mark_front(out)
    return sorted(out, key=lambda p: (p["cost"], -(p["quality"] or 0)))


def mark_front(pts: list[dict[str, Any]]) -> None:
    """A point is on the front when no other point is at most as costly and strictly better, or
    strictly cheaper and at least as good."""
    for p in pts:
        if p["quality"] is None:
            continue
        p["on_front"] = not any(
            q is not p and q["quality"] is not None
            and ((q["cost"] <= p["cost"] and q["quality"] > p["quality"]) or (q["cost"] < p["cost"] and q["quality"] >= p["quality"]))
            for q in pts)


def render_table(pts: list[dict[str, Any]], quality: str, cost: str) -> str:
    header = ["", "label", "runs", COSTS[cost], "speed-up", "success"]
    lines = [header]
    for p in pts:
        lines.append(["*" if p["on_front"] else " ", p["label"], str(p["runs"]), f"{p['cost']:.6g}",
                      f"{p['speedup']:.3g}x" if p["speedup"] else "-", f"{100 * p['success_rate']:.0f}%"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    body = "".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() + "\n" for line in lines)
    return body + f"* on the front (quality: {QUALITIES[quality]}; cost: {COSTS[cost]})\n"


def render_plot(pts: list[dict[str, Any]], quality: str, cost: str, width: int = 72, height: int = 18) -> str:
    """A plain-text scatter (plotext, colours off): each point labelled, the front joined."""
    import plotext as plt

    usable = [p for p in pts if p["quality"] is not None]
    if not usable:
        return "(nothing to plot: no point has a quality)\n"
    plt.clear_figure()
    plt.theme("clear")
    plt.plotsize(width, height)
    for p in usable:
        plt.scatter([p["cost"]], [p["quality"]], label=p["label"], marker="o" if p["on_front"] else "x")
    front = sorted((p for p in usable if p["on_front"]), key=lambda p: p["cost"])
    if len(front) > 1:
        plt.plot([p["cost"] for p in front], [p["quality"] for p in front], marker="dot")
    plt.xlabel(COSTS[cost])
    plt.ylabel(QUALITIES[quality])
    plt.title("cost against quality (o: on the front)")
    text = _ANSI.sub("", plt.build())
    plt.clear_figure()
    return text.rstrip() + "\n"


def save_plot(pts: list[dict[str, Any]], path: Path, quality: str, cost: str) -> None:
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise LooptreeError(f"--plot {path}: the file must end in .png or .svg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as mpl

    usable = [p for p in pts if p["quality"] is not None]
    fig, ax = mpl.subplots(figsize=(7, 4.5))
    try:
        for p in usable:
            ax.scatter([p["cost"]], [p["quality"]], marker="o" if p["on_front"] else "x", s=50)
            ax.annotate(p["label"], (p["cost"], p["quality"]), textcoords="offset points", xytext=(6, 4))
        front = sorted((p for p in usable if p["on_front"]), key=lambda p: p["cost"])
        if len(front) > 1:
            ax.plot([p["cost"] for p in front], [p["quality"] for p in front], linestyle="--", linewidth=1)
        ax.set_xlabel(COSTS[cost])
        ax.set_ylabel(QUALITIES[quality])
        ax.set_title("cost against quality (o: on the front)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format=suffix[1:])
    finally:
        mpl.close(fig)
