"""The dashboard's view of a run: the engine's fold plus what changed since the screen last looked.

Why a wrapper around `RunState` and not widgets reading it directly: at 200 events/s on a
10,000-node tree the screen cannot afford to look at every node on every frame. `RunView.apply`
folds each event (O(1)) and records *which* nodes changed, which were created, whether the
GPU or live rows moved, and keeps O(1) running totals (status counts, running set, best node)
that `RunState` would otherwise recompute by scanning every node. The App drains those changes
at most ~10 times a second (`take_changes`) into one `RunChanged` frame, and each widget redraws
only what the batch touched. No Textual import here, so all of this is tested without a terminal.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from looptree.engine.core.metrics import MetricSpec
from looptree.engine.core.schema import describe
from looptree.engine.core.state import NodeState, RunState

#: Statuses in which something is happening to a node (an agent writes it, or it is evaluated).
RUNNING = frozenset({"generating", "generated", "evaluating"})
#: Event types too frequent to be worth a line in the event log.
QUIET_EVENTS = frozenset({"metric_row", "gpu_sample", "tokens_spent"})


@dataclass
class Changes:
    """What the screen must redraw after a batch of events (see `RunView.take_changes`); the batch
    a `RunChanged` frame carries to the widgets."""

    new_nodes: list[str] = field(default_factory=list)
    dirty_nodes: set[str] = field(default_factory=set)
    rows_node: str | None = None
    rows_changed: bool = False
    gpu_changed: bool = False
    series_changed: bool = False
    log_lines: list[tuple[str, str]] = field(default_factory=list)  # (text, style)
    events: int = 0

    @property
    def any(self) -> bool:
        return bool(self.events or self.new_nodes or self.dirty_nodes)


class RunView:
    """`RunState` plus change tracking and O(1) aggregates for a viewer."""

    def __init__(self, *, log_limit: int = 300, series_limit: int = 20_000) -> None:
        self.state = RunState()
        self.counts: dict[str, int] = {}
        self.running: set[str] = set()
        self.device_node: dict[Any, str] = {}
        self.best_id: str | None = None
        self._best_key: tuple[float, ...] | None = None
        self._specs_seen: list[MetricSpec] | None = None
        # (x, node id) per node_evaluated, in order: the plot's data.
        self.series: deque[tuple[int, str]] = deque(maxlen=series_limit)
        self.llm_call_ts: deque[float] = deque(maxlen=10_000)
        self.events_applied = 0
        self._changes = Changes()
        self._log: deque[tuple[str, str]] = deque(maxlen=log_limit)

    # -- folding -------------------------------------------------------------------------
    def apply_all(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            self.apply(event)

    def apply(self, event: dict[str, Any]) -> None:
        state = self.state
        kind = event.get("type", "")
        node_id = event.get("id")
        node = state.nodes.get(node_id) if isinstance(node_id, str) else None
        before = node.status if node is not None else None
        try:
            state.apply(event)
        except (KeyError, TypeError, ValueError):
            # A viewer must survive a malformed or out-of-order event (e.g. a truncated log
            # replayed from the middle); the engine is the one that enforces the sequence.
            return
        self.events_applied += 1
        changes = self._changes
        changes.events += 1
        if kind == "node_created" and node is None and isinstance(node_id, str) and node_id in state.nodes:
            node = state.nodes[node_id]
            changes.new_nodes.append(node_id)
            self._count(None, node.status)
        if node is not None:
            changes.dirty_nodes.add(node.id)
            if before is not None and before != node.status:
                self._count(before, node.status)
            self._track_running(node)
        if kind == "node_pruned" and isinstance(node_id, str):
            changes.dirty_nodes.update(state.subtree(node_id))
        elif kind == "metric_row" and node is not None:
            changes.rows_node = node.id
            changes.rows_changed = True
        elif kind == "gpu_sample":
            changes.gpu_changed = True
        elif kind == "tokens_spent":
            self.llm_call_ts.append(float(event.get("ts", 0.0)))
        elif kind == "stage_started" and node is not None and event.get("device") is not None:
            self.device_node[event["device"]] = node.id
            changes.gpu_changed = True
        if kind in ("node_evaluated", "node_failed") and node is not None:
            self._on_result(node, event)
        if kind not in QUIET_EVENTS:
            line = format_event(event, state.started_ts, state)
            if line is not None:
                self._log.append(line)

    def _count(self, old: str | None, new: str) -> None:
        if old is not None:
            self.counts[old] = self.counts.get(old, 1) - 1
        self.counts[new] = self.counts.get(new, 0) + 1

    def _track_running(self, node: NodeState) -> None:
        if node.status in RUNNING:
            self.running.add(node.id)
        else:
            self.running.discard(node.id)
        if node.terminal:
            for device, holder in list(self.device_node.items()):
                if holder == node.id:
                    del self.device_node[device]
                    self._changes.gpu_changed = True

    def _on_result(self, node: NodeState, event: dict[str, Any]) -> None:
        """Keep the best node up to date without sorting every node on every evaluation."""
        state = self.state
        if event.get("type") == "node_evaluated":
            x = event.get("iteration")
            self.series.append((int(x) if isinstance(x, (int, float)) else state.evaluated, node.id))
            self._changes.series_changed = True
        specs_changed = state.specs is not self._specs_seen
        if specs_changed or node.id == self.best_id:
            self._specs_seen = state.specs
            self._recompute_best()
            return
        if node.credible and node.metrics:  # a suspect node is never best
            key = rank_key(state, node)
            if self._best_key is None or key > self._best_key:
                self._set_best(node.id, key)

    def _recompute_best(self) -> None:
        best = self.state.best()
        key = rank_key(self.state, best) if best is not None else None
        self._set_best(best.id if best is not None else None, key)

    def _set_best(self, node_id: str | None, key: tuple[float, ...] | None) -> None:
        if node_id != self.best_id:
            for old in (self.best_id, node_id):
                if old is not None:
                    self._changes.dirty_nodes.add(old)
            self._changes.series_changed = True
        self.best_id = node_id
        self._best_key = key

    def take_changes(self) -> Changes:
        """Hand the accumulated changes to the screen and start a new batch."""
        changes, self._changes = self._changes, Changes()
        changes.log_lines = list(self._log)
        self._log.clear()
        return changes

    # -- queries -------------------------------------------------------------------------
    @property
    def best(self) -> NodeState | None:
        return self.state.nodes.get(self.best_id) if self.best_id else None

    def leading(self) -> MetricSpec | None:
        specs = self.state.specs
        return specs[0] if specs else None

    def requests_per_minute(self, now: float) -> int:
        """LLM calls in the 60 s before `now` (event time in replay, wall time live)."""
        calls = self.llm_call_ts
        count = 0
        for ts in reversed(calls):  # newest first; stop at the first call older than a minute
            if ts < now - 60.0:
                break
            if ts <= now:
                count += 1
        return count

    def plot_points(self, limit: int = 300) -> tuple[list[int], list[float], list[float]]:
        """(x, value, best-so-far) of the leading metric, thinned to at most `limit` points.

        The best-so-far line is computed over every evaluation before thinning, so a short
        spike of improvement is never lost from it.
        """
        spec = self.leading()
        if spec is None:
            return [], [], []
        xs: list[int] = []
        ys: list[float] = []
        for x, node_id in self.series:
            node = self.state.nodes.get(node_id)
            value = node.metrics.get(spec.column) if node is not None else None
            if value is not None and math.isfinite(value):
                xs.append(x)
                ys.append(float(value))
        best: list[float] = []
        current: float | None = None
        for y in ys:
            if current is None or (y > current if spec.higher_is_better else y < current):
                current = y
            best.append(current)
        if len(xs) > limit:
            step = math.ceil(len(xs) / limit)
            keep = list(range(0, len(xs), step))
            if keep[-1] != len(xs) - 1:
                keep.append(len(xs) - 1)
            xs = [xs[i] for i in keep]
            ys = [ys[i] for i in keep]
            best = [best[i] for i in keep]
        return xs, ys, best


def rank_key(state: RunState, node: NodeState) -> tuple[Any, ...]:
    """The key `RunState.ranked` sorts by (larger is better), for one node: the engine's own rule,
    so the view's best node can be kept up to date in O(1) per evaluation and never disagree."""
    return state.rank_key(node)


# -- formatting (pure; shared by the widgets and the tests) ----------------------------------
def fmt_num(value: float | None, digits: int = 4) -> str:
    """Short, stable number text: 4 significant digits, thousands as k/M for big counts."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "NA"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.{max(1, digits - 2)}f}M".replace(".0M", "M") if magnitude < 1e9 else f"{value:.3g}"
    return f"{value:.{digits}g}"


def fmt_tokens(value: float | None) -> str:
    if value is None:
        return "NA"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return str(int(value))


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0 or not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours >= 24:
        days, hours = divmod(hours, 24)
        return f"{days}d{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours:02d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def improvement(value: float | None, baseline: float | None, higher_is_better: bool) -> float | None:
    """How many times better than the baseline (>1 is better), whichever way the metric points."""
    if value is None or baseline is None or not math.isfinite(value) or not math.isfinite(baseline):
        return None
    if higher_is_better:
        return value / baseline if baseline else None
    return baseline / value if value else None


def run_status(state: RunState, *, engine_alive: bool | None) -> tuple[str, str]:
    """(text, style class) of the run's state for the header: running, paused, finished: reason…"""
    if state.finished:
        return f"finished: {state.finished}", "finished"
    if state.run is None:
        return "waiting for events", "waiting"
    if state.stop_requested:
        return f"stopping ({state.stop_requested})", "stopping"
    if state.paused:
        return ("paused · no engine attached", "stalled") if engine_alive is False else ("paused", "paused")
    if engine_alive is False:
        return "no engine (crashed or stopped?)", "stalled"
    return "running", "running"


def format_event(event: dict[str, Any], t0: float | None, state: RunState | None = None) -> tuple[str, str] | None:
    """One line (and a style name) for the event log: the same words as the headless printer
    (`schema.describe`), stamped with the time since the run started; None for GPU samples."""
    line = describe(event, state)
    if line is None:
        return None
    ts = event.get("ts")
    stamp = "+" + fmt_duration((ts - t0) if isinstance(ts, (int, float)) and t0 is not None else None)
    text = line.text.split("\n", 1)[0]  # the log is one row per event (the ideas list is in the tree)
    return (f"{stamp} {line.node} {text}" if line.node not in (None, "") else f"{stamp} {text}"), line.style


def now_or_frozen(frozen: float | None) -> float:
    """Wall time, or the frozen instant that snapshot tests use so nothing on screen moves."""
    return frozen if frozen is not None else time.time()
