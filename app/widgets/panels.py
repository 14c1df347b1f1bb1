"""The secondary panels: live metric rows, the leading-metric plot, GPUs, and the event log.

Why each one keeps its own small cache of what it shows: DataTable re-measures columns and the
plot re-renders every point on any change, so each panel compares the new content with what
is on screen and touches only what differs (rows appended, cells updated, plot at most once a
second and only while its tab is visible).
"""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.cache import LRUCache
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from looptree.app.model import RunView, fmt_num
from looptree.engine.core.metrics import MetricSpec, aggregate

SLOTS = 40  # newest rows kept on screen (more than any panel shows)


class LiveRows(Vertical):
    """Metric rows of the node being benchmarked, newest first, as the bench writes them.

    Why pre-formatted text and not a DataTable: rows arrive many times a second and every new
    one shifts the rest; a DataTable then re-renders every visible cell (~60 per frame, the
    single biggest cost in the 10k-node benchmark) and, if it grows, relayouts the screen. A
    fixed-height Static with aligned columns costs one Text render, and only while its tab is
    visible (the App skips it otherwise).
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.node_id: str | None = None
        self._shown: list[list[str]] = []
        self._key: Any = None

    def compose(self):  # type: ignore[override]
        yield Static("no benchmark has reported rows yet", id="rows-title")
        yield Static("", id="rows-table")

    def sync(self, view: RunView, node_id: str | None) -> None:
        """Show the newest rows of `node_id` (redrawn only if they changed)."""
        node = view.state.nodes.get(node_id or "")
        if node is None:
            return
        specs = view.state.specs or []
        columns = [s.column for s in specs] or sorted({k for r in node.rows for k in r if k not in ("repeat", "iteration")})
        key = (node_id, len(node.rows), node.rows[-1] if node.rows else None, node.status, tuple(columns))
        if key == self._key:
            return
        self._key = key
        self.node_id = node_id
        names = {s.column: s.name for s in specs}
        widths = [4, 6] + [max(10, min(18, len(names.get(c, c)))) for c in columns]
        header = ["rep", "iter"] + [names.get(c, c) for c in columns]
        rows = [[str(int(row.get("repeat", 0)) + 1), str(row.get("iteration", ""))] + [fmt_num(row.get(c)) for c in columns]
                for row in node.rows[-SLOTS:][::-1]]
        self._shown = rows
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(_line(header, widths), style="bold")
        for row in rows:
            text.append("\n" + _line(row, widths))
        self.query_one("#rows-table", Static).update(text, layout=False)
        self.query_one("#rows-title", Static).update(self._title(view, node_id, columns), layout=False)

    def reset(self) -> None:
        self.node_id, self._key, self._shown = None, None, []

    def shown_rows(self) -> list[list[str]]:
        """The rows on screen, newest first."""
        return [list(cells) for cells in self._shown]

    def _title(self, view: RunView, node_id: str | None, columns: list[str]) -> Text:
        node = view.state.nodes[node_id or ""]
        text = Text()
        text.append(f"{node.id}", style="bold")
        live = node.status == "evaluating" and node.stage == "bench"
        text.append(" benchmarking" if live else f" {node.status}", style="yellow" if live else "grey50")
        repeats = {r.get("repeat", 0) for r in node.rows}
        text.append(f" · {len(node.rows)} rows · {len(repeats)} repeat{'s' if len(repeats) != 1 else ''}")
        if columns:
            value, _final = node_median(node, columns[0])
            if value is not None:
                spec = view.state.specs[0] if view.state.specs else None
                name = spec.name if spec is not None else columns[0]
                text.append(f" · {name} median {fmt_num(value)}", style="bold")
        return text


def node_median(node: Any, column: str) -> tuple[float | None, bool]:
    """The node's figure for `column`, the one the tree shows; `True` when it is the final one.

    Evaluated: the figure of its `node_evaluated` event (the engine's `metrics.aggregate`, the
    median of each repeat's median). While a benchmark runs: the same `aggregate` over the rows
    seen so far, grouped by repeat, so the live figure converges on the one the tree will show
    instead of being a different statistic (the median over all rows pooled).
    """
    if node.status != "evaluating" and column in node.metrics:
        return node.metrics[column], True
    by_repeat: dict[Any, list[dict[str, float]]] = {}
    for row in node.rows:
        value = row.get(column)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            by_repeat.setdefault(row.get("repeat", 0), []).append({column: float(value)})
    if not by_repeat:
        return (node.metrics[column], True) if column in node.metrics else (None, False)
    result = aggregate(list(by_repeat.values()), [MetricSpec(column, column, False)])
    return result.values[column], False


class MetricPlot(PlotextPlot):
    """The leading metric per evaluation, with the best-so-far line."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self._key: Any = None

    def sync(self, view: RunView) -> bool:
        """Redraw if the data changed; the caller limits this to ≤1 Hz and to a visible tab."""
        xs, ys, best = view.plot_points()
        spec = view.leading()
        key = (len(view.series), xs[-1:] if xs else None, best[-1:] if best else None, spec)
        if key == self._key:
            return False
        self._key = key
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        if spec is None or not xs:
            plt.title("no evaluated node yet")
        else:
            plt.title(f"{spec.name} ({'higher' if spec.higher_is_better else 'lower'} is better)")
            plt.xlabel("evaluation")
            plt.scatter(xs, ys, color="cyan", label="node")
            step_x, step_y = step_line(xs, best)
            plt.plot(step_x, step_y, color="green", label="best so far")
            low, high = min(ys + best), max(ys + best)
            if math.isfinite(low) and math.isfinite(high) and high > low:
                pad = (high - low) * 0.05
                plt.ylim(low - pad, high + pad)
        self.refresh()
        return True


def step_line(xs: list[int], ys: list[float]) -> tuple[list[float], list[float]]:
    """A staircase through (x, y): the best-so-far holds its value until the next improvement."""
    out_x: list[float] = []
    out_y: list[float] = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if i and ys[i - 1] != y:
            out_x.append(x)
            out_y.append(ys[i - 1])
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def _line(cells: list[str], widths: list[int]) -> str:
    return " ".join(f"{cell:>{width}}" if i > 1 else f"{cell:<{width}}" for i, (cell, width) in enumerate(zip(cells, widths)))


GPU_COLUMNS = (("gpu", "GPU", 16), ("util", "util%", 6), ("mem", "memory MiB", 15), ("power", "power W", 8),
               ("temp", "temp °C", 8), ("sm", "SM MHz", 7), ("memclk", "mem MHz", 8),
               ("throttle", "throttle", 14), ("node", "node", 12))


def _na(value: Any, fmt: str = "{:.0f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "NA"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def gpu_cells(device: Any, fields: dict[str, Any], node_id: str | None) -> dict[str, str]:
    throttle = fields.get("throttle")
    mem_used, mem_total = fields.get("mem_used"), fields.get("mem_total")
    host = fields.get("host")  # a Ray run's GPUs: sampled on the workers, named "host:index"
    name = str(device) if not host or str(device).startswith(f"{host}:") else f"{host}:{device}"
    return {
        "gpu": name,
        "util": _na(fields.get("util")),
        "mem": f"{_na(mem_used)}/{_na(mem_total)}",
        "power": _na(fields.get("power_w")),
        "temp": _na(fields.get("temp_c")),
        "sm": _na(fields.get("sm_clock")),
        "memclk": _na(fields.get("mem_clock")),
        "throttle": "NA" if throttle is None else (",".join(throttle) if throttle else "none"),
        "node": fields.get("node") or node_id or "idle",  # the engine names it; else the last bench stage on it
    }


class GpuTable(DataTable):  # type: ignore[type-arg]
    """A DataTable whose render caches hold what a small, often-updated table needs, not 10,000 cells.

    Why: every `update_cell` bumps the table's update count, which is part of each render cache
    key, so each GPU sample leaves a screenful of dead entries behind; Textual's caches (10,000
    cells, 1,000 rows and lines) evict them only when full, which at two updates a second takes
    hours and tens of MiB (benchmarks/soak_bench.py). A few devices need a few hundred entries.
    """

    CACHE_SIZE = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("_row_render_cache", "_cell_render_cache", "_row_renderable_cache", "_line_cache"):
            if isinstance(getattr(self, name, None), LRUCache):
                setattr(self, name, LRUCache(self.CACHE_SIZE))


class GpuPanel(Vertical):
    """Per-device telemetry from gpu_sample events; a clear line when the run has no GPU."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self._cells: dict[str, dict[str, str]] = {}

    def compose(self):  # type: ignore[override]
        yield Static("No GPU: this run has reported no GPU telemetry (gpu.devices = \"none\", no NVIDIA "
                     "driver, or a CPU-only benchmark). `looptree gpus` shows what NVML sees.", id="gpu-none")
        table = GpuTable(id="gpu-table", cursor_type="none", show_cursor=False)
        yield table

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label, width in GPU_COLUMNS:
            table.add_column(label, width=width, key=key)
        table.display = False

    def sync(self, view: RunView) -> None:
        gpus = view.state.gpu
        table = self.query_one(DataTable)
        has = bool(gpus)
        none = self.query_one("#gpu-none", Static)
        none.display = not has
        reason = getattr(view.state, "gpu_reason", None)
        if not has and getattr(view.state, "gpu_available", None) is False and reason:
            none.update(f"No GPU: {reason}. Benchmarks run on the CPU; `looptree gpus` shows what NVML sees.")
        table.display = has
        for device in sorted(gpus, key=lambda d: (str(type(d)), d)):
            key = f"gpu{device}"
            cells = gpu_cells(device, gpus[device], view.device_node.get(device))
            old = self._cells.get(key)
            if old is None:
                table.add_row(*(cells[c] for c, _, _ in GPU_COLUMNS), key=key)
            else:
                for column, value in cells.items():
                    if old.get(column) != value:
                        table.update_cell(key, column, value)
            self._cells[key] = cells

    def reset(self) -> None:
        self.query_one(DataTable).clear()
        self._cells.clear()
