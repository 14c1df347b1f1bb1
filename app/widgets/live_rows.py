"""The Live tab: the metric rows of the node being benchmarked, newest first, as the bench writes them.

Why it keeps a key of what it shows: rows arrive many times a second; the text is rebuilt only when
the node, its row count, its newest row, its status or the columns changed, and only while the tab
is open.
"""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import Static

from looptree.app.messages import RunChanged
from looptree.app.model import RunView, fmt_num
from looptree.app.widgets.base import RunWidget
from looptree.engine.core.metrics import MetricSpec, aggregate

SLOTS = 40  # newest rows kept on screen (more than any panel shows)


class LiveRows(RunWidget, Vertical):
    """Metric rows of the node being benchmarked, newest first, as the bench writes them.

    Why pre-formatted text and not a DataTable: rows arrive many times a second and every new
    one shifts the rest; a DataTable then re-renders every visible cell (~60 per frame, the
    single biggest cost in the 10k-node benchmark) and, if it grows, relayouts the screen. A
    fixed-height Static with aligned columns costs one Text render, and only while its tab is
    visible.

    Which node: the one whose rows arrived last (`Changes.rows_node`); it is redrawn when rows
    arrive, when that node changes (its title's status and median) and when the tab is opened.
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.node_id: str | None = None
        self._shown: list[list[str]] = []
        self._key: Any = None
        self._view: RunView | None = None
        self._target: str | None = None  # the node whose rows arrived last

    def compose(self):  # type: ignore[override]
        yield Static("no benchmark has reported rows yet", id="rows-title")
        yield Static("", id="rows-table")

    def draw(self, frame: RunChanged) -> None:
        view, changes = frame.view, frame.changes
        self._view = view
        if frame.reset:  # a backwards seek: start from the last node that has rows in the new fold
            self.reset()
            self._target = next((n for n in reversed(view.state.order) if view.state.nodes[n].rows), None)
        if changes.rows_node is not None:
            self._target = changes.rows_node
        if changes.rows_changed or frame.force or self._target in changes.dirty_nodes:
            self._sync()  # also when its node finishes: the title's status and median change

    def on_tab_shown(self) -> None:
        self._sync()

    def _sync(self) -> None:
        if self._target is not None and self._view is not None and self.shown:
            self.sync(self._view, self._target)

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


def _line(cells: list[str], widths: list[int]) -> str:
    return " ".join(f"{cell:>{width}}" if i > 1 else f"{cell:<{width}}" for i, (cell, width) in enumerate(zip(cells, widths)))
