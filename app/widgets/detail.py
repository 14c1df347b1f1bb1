"""The selected node: what it is, how it measured, why it failed, its diff and its logs.

Why three Statics in one scroll view: the info block changes with every event on the node,
the diff only when another node is selected, and the log tails about once a second while the
node runs. Each part is redrawn only when its own content changed (`_shown` keys), so a busy
benchmark does not re-highlight a 300-line diff ten times a second.

The App says which node is selected (`show_node`, one frame after the tree's cursor moved); the
panel then follows that node on every frame that touched it. A diff not yet in the cache is
loaded by a worker (`git diff`, or the node's saved diff.patch) while "loading diff…" shows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.text import Text
from textual import work
from textual.containers import VerticalScroll
from textual.widgets import Static

from looptree.app.files import LOG_NAMES, DiffCache, parent_commit, tail_lines
from looptree.app.labels import GLYPHS
from looptree.app.messages import RunChanged
from looptree.app.model import RunView, fmt_num, fmt_tokens, improvement
from looptree.app.widgets.base import RunWidget
from looptree.engine.core.state import NodeState

LOG_LINES = 10
MAX_DIFF_LINES = 400


def info_text(view: RunView, node: NodeState) -> Text:
    glyph, colour = GLYPHS.get(node.status, ("?", ""))
    text = Text()
    text.append(f"{node.id} ", style="bold")
    text.append(f"{glyph} {node.status}", style=colour)
    if node.stage and node.status != "done":
        text.append(f" ({node.stage})", style=colour)
    parent = f" · parent {node.parent}" if node.parent else ""
    text.append(f" · {node.kind} · phase {node.phase}{parent}", style="grey50")
    marks = [m for m, on in (("★ best", node.id == view.best_id), ("⚑ pinned", node.pinned), ("✂ pruned", node.pruned)) if on]
    if marks:
        text.append("  " + "  ".join(marks), style="bold yellow")
    if node.idea:
        text.append(f"\nidea: {node.idea}", style="italic")
    if node.hint:
        text.append(f"\nhint: {node.hint}", style="italic")
    if node.fix_of:
        text.append(f"\nfix of {node.fix_of}", style="italic")
    if node.description and node.description != "baseline":
        text.append(f"\n{node.description.strip()}")
    if node.status == "failed":
        text.append(f"\nfailed at {node.failure_stage or '?'}: ", style="bold red")
        text.append(node.failure_reason or "(no reason recorded)", style="red")
    if node.metrics:
        text.append("\n")
        text.append_text(metrics_text(view, node))
    if node.verdict:
        text.append("\nverdict: ", style="bold")
        text.append(verdict_line(node.verdict))
    facts = []
    if node.tokens:
        facts.append(f"{fmt_tokens(node.tokens)} tokens")
    if node.cost_usd:
        facts.append(f"${node.cost_usd:.4f}")
    if node.model:
        facts.append(node.model)
    if node.files:
        facts.append("files " + ", ".join(node.files[:4]) + (" …" if len(node.files) > 4 else ""))
    if node.commit:
        facts.append(f"commit {node.commit[:10]}")
    if node.device is not None:
        facts.append(f"GPU {node.device}")
    if facts:
        text.append("\n" + " · ".join(facts), style="grey50")
    return text


def metrics_text(view: RunView, node: NodeState) -> Text:
    """One line per metric: value, spread over repeats, and the ratio to the baseline."""
    specs = view.state.specs or []
    columns = [s.column for s in specs if s.column in node.metrics] or list(node.metrics)
    by_column = {s.column: s for s in specs}
    base = view.state.baseline
    width = max((len(by_column[c].name if c in by_column else c) for c in columns), default=0)
    text = Text()
    for i, column in enumerate(columns):
        spec = by_column.get(column)
        name = spec.name if spec else column
        value = node.metrics[column]
        if i:
            text.append("\n")
        text.append(f"{name:<{width}}  ", style="bold" if i == 0 else "")
        text.append(f"{fmt_num(value):>8}", style="bold" if i == 0 else "")
        if spec is not None:
            text.append(" ↓" if not spec.higher_is_better else " ↑", style="grey50")
        if spec is not None and base is not None and base.id != node.id:
            ratio = improvement(value, base.metrics.get(column), spec.higher_is_better)
            if ratio is not None:
                text.append(f"  {ratio:.2f}× vs base", style="green" if ratio > 1 else ("red" if ratio < 1 else ""))
        spread = node.spread.get(column) or {}
        if spread:
            parts = []
            if "n" in spread:
                parts.append(f"n={int(spread['n'])}")
            if "min" in spread and "max" in spread:
                parts.append(f"range {fmt_num(spread['min'])}–{fmt_num(spread['max'])}")
            if "q1" in spread and "q3" in spread:
                parts.append(f"IQR {fmt_num(spread['q1'])}–{fmt_num(spread['q3'])}")
            if "stdev" in spread:
                parts.append(f"sd {fmt_num(spread['stdev'])}")
            text.append("\n  " + " · ".join(parts), style="grey50")
    return text


def verdict_line(verdict: dict[str, Any]) -> str:
    """`better vs 5.3: ratio 0.833 · 90.4% CI [0.810, 0.850] · p=0.004 · n=6/6 · A/A noise ±1.0%`."""
    def num(key: str) -> float | None:
        value = verdict.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    head = str(verdict.get("label", "?"))
    if verdict.get("against"):
        head += f" vs {verdict['against']}"
    parts = []
    ratio, low, high, p = num("ratio"), num("ci_low"), num("ci_high"), num("p_value")
    if ratio is not None:
        parts.append(f"ratio {ratio:.3f}")
    if low is not None and high is not None:
        level = num("ci_level")
        parts.append(f"{level * 100:.3g}% CI [{low:.3f}, {high:.3f}]" if level is not None else f"CI [{low:.3f}, {high:.3f}]")
    if p is not None:
        parts.append(f"p={p:.3g}")
    if num("n_parent") is not None and num("n_candidate") is not None:
        parts.append(f"n={int(verdict['n_parent'])}/{int(verdict['n_candidate'])}")
    margin = num("min_effect")
    if margin:
        parts.append(f"margin {margin * 100:.1f}%")
    aa = num("aa_noise")
    if aa is not None:
        parts.append(f"A/A noise ±{aa * 100:.1f}%")
    return head + (": " + " · ".join(parts) if parts else "")


def diff_renderable(text: str) -> RenderableType:
    if text.startswith("! "):
        return Text(text[2:], style="grey50")
    lines = text.splitlines()
    note = None
    if len(lines) > MAX_DIFF_LINES:
        note = Text(f"… {len(lines) - MAX_DIFF_LINES} more lines (looptree show RUN_DIR ID for all)", style="grey50")
        text = "\n".join(lines[:MAX_DIFF_LINES])
    syntax = Syntax(text, "diff", theme="ansi_dark", word_wrap=False, background_color="default")
    return Group(syntax, note) if note else syntax


def logs_renderable(folder: Path) -> tuple[tuple[Any, ...], RenderableType]:
    """(cache key, renderable) of the tails of build/check/bench logs in a node's folder."""
    parts: list[RenderableType] = []
    key: list[Any] = []
    for name in LOG_NAMES:
        lines = tail_lines(folder / name, LOG_LINES)
        key.append(tuple(lines) if lines is not None else None)
        if lines is None:
            continue
        parts.append(Text(f"── {name} (last {LOG_LINES} lines)", style="bold grey50"))
        parts.append(Text("\n".join(lines) if lines else "(empty)", no_wrap=True, overflow="ellipsis"))
    if not parts:
        parts.append(Text(f"no logs yet in {folder.name}/", style="grey50"))
    return tuple(key), Group(*parts)


class DetailPanel(RunWidget, VerticalScroll):
    """Info, diff and log tails of one node; each part redrawn only when it changed."""

    LOGS_PERIOD_S = 1.0  # the log tails of a node are re-read at most once a second

    def __init__(self, run_dir: Path, *, diffs: DiffCache | None = None, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self.run_dir = run_dir
        self.diffs = diffs or DiffCache()
        self.node_id: str | None = None  # the node on screen
        self.selected: str | None = None  # the node the App asked for
        self._view: RunView | None = None
        self._shown: dict[str, Any] = {}
        self._logs_at = 0.0
        self.can_focus = True

    def compose(self):  # type: ignore[override]
        yield Static("select a node in the tree", id="detail-info")
        yield Static("", id="detail-diff")
        yield Static("", id="detail-logs")

    # -- following the selected node ---------------------------------------------------------
    def draw(self, frame: RunChanged) -> None:
        self._view = frame.view
        if self.selected is not None and (self.selected in frame.changes.dirty_nodes or frame.force):
            self.render_node()

    def show_node(self, view: RunView, node_id: str | None) -> None:
        """Show `node_id` now (the App's selection), its log tails read afresh."""
        self._view = view
        self.selected = node_id
        self._logs_at = 0.0
        self.render_node()

    def render_node(self) -> None:
        view = self._view
        node = view.state.nodes.get(self.selected or "") if view is not None else None
        if view is None or node is None:
            return
        self.show_info(node.id, info_text(view, node))
        self._render_diff(view, node)
        now = time.monotonic()
        if self.node_id != node.id or now - self._logs_at >= self.LOGS_PERIOD_S or self._logs_at == 0.0:
            self._logs_at = now
            key, renderable = logs_renderable(self.run_dir / "nodes" / node.id)
            self.show_logs(key, renderable)

    def _render_diff(self, view: RunView, node: NodeState) -> None:
        state = view.state
        old = parent_commit(state, node)
        if node.parent is None:
            self.show_diff(("none", node.id), Text("baseline: the project as it was when the run started", style="grey50"))
            return
        if not node.commit or not old:
            why = f"failed at {node.failure_stage}" if node.status == "failed" else "no commit yet"
            self.show_diff(("none", node.id, why), Text(f"no diff: {why}", style="grey50"))
            return
        project = state.project or ""
        key = (project, old, node.commit)
        text = self.diffs.cached(project, old, node.commit)
        if text is not None:
            self.show_diff(key, diff_renderable(text))
            return
        self.show_diff(("loading",) + key, Text("loading diff…", style="grey50"))
        self._load_diff(node.id, project, old, node.commit, self.run_dir / "nodes" / node.id / "diff.patch")

    @work(group="diff", exclusive=True, exit_on_error=False)
    async def _load_diff(self, node_id: str, project: str, old: str, new: str, fallback: Path) -> None:
        text = await self.diffs.get(project, old, new, fallback)
        if self.selected == node_id:
            self.show_diff((project, old, new), diff_renderable(text))

    # -- the three parts -----------------------------------------------------------------------
    def show_info(self, node_id: str | None, text: Text) -> None:
        if node_id != self.node_id:
            self.node_id = node_id
            self._shown.clear()
            self.scroll_home(animate=False)
        key = (node_id, text.plain, tuple(text.spans))
        if self._shown.get("info") != key:
            self._shown["info"] = key
            self.query_one("#detail-info", Static).update(text)

    def show_diff(self, key: Any, renderable: RenderableType) -> None:
        if self._shown.get("diff") != key:
            self._shown["diff"] = key
            self.query_one("#detail-diff", Static).update(renderable)

    def show_logs(self, key: Any, renderable: RenderableType) -> None:
        if self._shown.get("logs") != key:
            self._shown["logs"] = key
            self.query_one("#detail-logs", Static).update(renderable)
