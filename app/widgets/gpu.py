"""The GPU tab: one row per device (utilisation, memory, power, clocks, throttling, the node on it).

Why a DataTable here (and not text, as the live rows): a few devices, each updated about once a
second; `update_cell` touches only the cells that changed. The cells are drawn at most twice a
second and only while the tab is open; `GpuTable` keeps Textual's render caches small, which
the soak benchmark showed to matter over hours.
"""

from __future__ import annotations

import math
from typing import Any

from textual.cache import LRUCache
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from looptree.app.messages import RunChanged
from looptree.app.model import RunView
from looptree.app.widgets.base import ThrottledRunWidget

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


class GpuPanel(ThrottledRunWidget, Vertical):
    """Per-device telemetry from gpu_sample events; a clear line when the run has no GPU."""

    PERIOD_S = 0.5  # cells at most twice a second

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

    def concerns(self, frame: RunChanged) -> bool:
        return frame.changes.gpu_changed

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

    def forget(self) -> None:
        self.query_one(DataTable).clear()
        self._cells.clear()
