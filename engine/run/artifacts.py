"""The files a run leaves for people beside its event log: metrics.csv and each node's folder.

Why apart from the log: `events.jsonl` is the truth and is written synchronously, before any
action (the event-sourcing rule). These files are views of it for humans and tools (a prompt,
a reply, a diff, an analysis, the metrics table), so they are written without blocking the
event loop (aiofiles) and can always be rebuilt from the log (`rewrite_metrics_csv`).
"""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import aiofiles
import aiofiles.os

from looptree.engine.core.state import NodeState, RunState

METRICS_CSV = "metrics.csv"
#: The per-node log each failure stage points at (what a fix agent is shown the end of).
STAGE_LOGS = {"build": "build.log", "check": "check.log", "bench": "bench.log", "timeout": "bench.log",
              "metrics": "bench.log"}


def csv_text(rows: list[list[str]]) -> str:
    """Rows as CSV text (RFC 4180 quoting, `\\n` line ends, as the contract's metrics.csv)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerows(rows)
    return out.getvalue()


class RunArtifacts:
    def __init__(self, run_dir: Path, state: RunState) -> None:
        self.run_dir = run_dir
        self.state = state
        # Nodes finish concurrently: one writer at a time keeps one header and rows in iteration order.
        self._csv_lock = asyncio.Lock()

    @property
    def metrics_csv(self) -> Path:
        return self.run_dir / METRICS_CSV

    async def write(self, path: Path, text: str) -> None:
        async with aiofiles.open(path, "w") as fh:
            await fh.write(text)

    async def append_metrics_row(self, node_id: str) -> None:
        """The node's row of metrics.csv (the header first when the file is new)."""
        async with self._csv_lock:
            await self._append_rows([node_id])

    async def rewrite_metrics_csv(self) -> None:
        """After a crash the CSV may miss its last row: rebuild it from the log, which is the truth."""
        async with self._csv_lock:
            await aiofiles.os.makedirs(self.run_dir, exist_ok=True)
            path = self.metrics_csv
            if await aiofiles.os.path.exists(path):
                await aiofiles.os.remove(path)
            done = sorted((n for n in self.state.nodes.values() if n.ok), key=lambda n: n.iteration or 0)
            await self._append_rows([n.id for n in done])

    async def _append_rows(self, node_ids: list[str]) -> None:
        if not node_ids:
            return
        specs = self.state.specs or []
        path = self.metrics_csv
        new = not await aiofiles.os.path.exists(path) or (await aiofiles.os.stat(path)).st_size == 0
        rows = [["iteration", "node", *[s.column for s in specs]]] if new else []
        for node_id in node_ids:
            node = self.state.nodes[node_id]
            rows.append([str(node.iteration), node.id,
                         *[repr(node.metrics[s.column]) if s.column in node.metrics else "" for s in specs]])
        async with aiofiles.open(path, "a") as fh:
            await fh.write(csv_text(rows))

    async def read_log_tail(self, ndir: Path, stage: str | None, limit: int = 6000) -> str:
        """The end of the log the failed stage wrote (what a fix agent is shown)."""
        name = STAGE_LOGS.get(stage or "")
        if name is None:
            return ""
        path = ndir / name
        if stage == "timeout":  # a timeout names the stage that ran last: the newest log there is
            for candidate in ("bench.log", "check.log", "build.log"):
                if await aiofiles.os.path.exists(ndir / candidate):
                    path = ndir / candidate
                    break
        try:
            size = (await aiofiles.os.stat(path)).st_size
            async with aiofiles.open(path, "rb") as fh:
                await fh.seek(max(0, size - limit))
                data = await fh.read(limit)
        except OSError:
            return ""
        return data.decode(errors="replace")


def analysis_text(state: RunState, node_id: str) -> str:
    """A short, factual comparison against the parent and the baseline (the node's analysis.md)."""
    node = state.nodes[node_id]
    parent = state.nodes.get(node.parent or "")
    base = state.baseline
    lines = [f"# {node.id}: {node.description or node.kind}", ""]
    for spec in state.specs or []:
        value = node.metrics.get(spec.column)
        if value is None:
            continue
        parts = [f"{spec.column}: {value:.6g}"]
        for label, other in (("parent", parent), ("baseline", base)):
            if other is not None and other.ok and other is not node and other.metrics.get(spec.column):
                parts.append(_ratio_text(value, other, spec.column, spec.higher_is_better, label))
        spread = node.spread.get(spec.column, {})
        if spread:
            parts.append(f"n={int(spread.get('n', 0))}, min {spread.get('min', 0):.6g}, max {spread.get('max', 0):.6g}")
        lines.append("- " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _ratio_text(value: float, other: NodeState, column: str, higher_is_better: bool, label: str) -> str:
    ref = other.metrics[column]
    ratio = (ref / value if not higher_is_better else value / ref) if value else float("inf")
    word = "better" if ratio > 1 else "worse" if ratio < 1 else "same"
    return f"{ratio:.3g}x {word} than {label} {other.id}"
