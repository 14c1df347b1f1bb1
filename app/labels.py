"""Tree labels and header text: pure functions from the view to Rich `Text`.

Why pure and keyed: the tree holds thousands of labels and the header changes many times a
second. Each label comes with a small tuple (`label_key`) of everything it shows; the tree
rebuilds a label only when that tuple changes, so a batch of events that touched a node's
tokens but not its status costs nothing on screen. Styles are named colours that survive
256- and 16-colour terminals.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text

from looptree.app.model import RUNNING, RunView, fmt_duration, fmt_num, fmt_tokens, improvement, run_status
from looptree.engine.core.state import NodeState
from looptree.engine.run.report import containment_text

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
GLYPHS: dict[str, tuple[str, str]] = {
    "pending": ("·", "grey50"),
    "generating": ("✎", "cyan"),
    "generated": ("○", "blue"),
    "evaluating": ("◔", "yellow"),
    "done": ("✔", "green"),
    "failed": ("✘", "red"),
}
#: The noise-aware verdict against the reference, after the metric: `7.5↑`, `11.8≈`, `12.5↓`.
VERDICT_MARKS = {"better": ("↑", "green"), "no significant change": ("≈", "grey50"), "worse": ("↓", "red")}
STATE_STYLES = {"running": "bold green", "paused": "bold yellow", "finished": "bold cyan",
                "stopping": "bold yellow", "stalled": "bold red", "waiting": "grey50"}


def label_key(view: RunView, node: NodeState, frame: int | None) -> tuple[Any, ...]:
    spec = view.leading()
    value = node.metrics.get(spec.column) if spec is not None else None
    running = node.status in RUNNING and not view.state.finished
    verdict = node.verdict.get("label") if node.verdict else None
    return (bool(view.state.finished), node.status, node.stage if running else None, value, node.pruned, node.pinned,
            node.id == view.best_id, node.failure_stage, frame if running else None, node.kind, verdict,
            node.suspect)


def node_label(view: RunView, node: NodeState, frame: int | None) -> Text:
    """`✔ 5.3.1  7.5 ms ★` — glyph, ID, leading metric, marks. `frame` animates running nodes."""
    glyph, colour = GLYPHS.get(node.status, ("?", "white"))
    interrupted = node.status in RUNNING and bool(view.state.finished)  # the run ended around it
    if interrupted:
        glyph, colour = "◌", "grey50"
    elif node.suspect:  # evaluated, but its metrics look forged: never credited
        glyph, colour = "⚠", "bold red"
    elif node.status in RUNNING and frame is not None:
        glyph = SPINNER[frame % len(SPINNER)]
    is_best = node.id == view.best_id
    text = Text()
    text.append(glyph, style=colour)
    text.append(" ")
    text.append(node.id, style="bold yellow" if is_best else ("grey50" if node.pruned else ""))
    spec = view.leading()
    if node.ok and spec is not None and spec.column in node.metrics:
        text.append("  ")
        text.append(fmt_num(node.metrics[spec.column]), style="bold" if is_best else "")
        verdict = node.verdict.get("label") if node.verdict else None
        if node.suspect:
            text.append(" suspect", style="bold red")
        elif verdict in VERDICT_MARKS:
            mark, style = VERDICT_MARKS[verdict]
            text.append(mark, style=style)
    elif node.status == "failed":
        text.append(f"  {node.failure_stage or 'failed'}", style="red")
    elif interrupted:
        text.append("  interrupted", style="grey50")
    elif node.status in RUNNING:
        text.append(f"  {node.stage or node.status}", style="grey50")
    if node.kind in ("fix", "fork"):
        text.append(f" [{node.kind}]", style="grey50")
    if is_best:
        text.append(" ★ best", style="bold yellow")
    if node.pinned:
        text.append(" ⚑", style="magenta")
    if node.pruned:
        text.append(" ✂", style="grey50")
        text.stylize("strike", 2, 2 + len(node.id))
    return text


def header_text(view: RunView, *, now: float, engine_alive: bool | None, replay: str | None = None,
                width: int = 160) -> Text:
    """Two lines: run, project, state, elapsed / node counts, best vs baseline, tokens.

    Below 120 columns the words shrink (`6✔ 2✘ 2⟳`) so the best node's ratio still fits at 80.
    """
    compact = width < 120
    state = view.state
    status, kind = run_status(state, engine_alive=engine_alive)
    line = Text()
    line.append(" looptree ", style="bold reverse")
    if state.run is None:
        line.append("  start of the log" if replay else "  waiting for the run to start…", style="grey50")
        if replay:
            line.append(f" · {replay}", style="bold magenta")
        return line
    project = (state.project or "?").rstrip("/").rsplit("/", 1)[-1]
    line.append(f" run {state.run}", style="bold")
    line.append(f" · {project} · ")
    line.append(status, style=STATE_STYLES.get(kind, ""))
    end = state.finished_ts if state.finished and state.finished_ts else now
    elapsed = end - state.started_ts if state.started_ts is not None else None
    line.append(f" · {fmt_duration(elapsed)}")
    if containment_text(state):  # the reason is in `looptree tree` and the event log
        line.append(" · not sandboxed", style="bold red")
    if replay:
        line.append(f" · {replay}", style="bold magenta")
    line.append("\n")
    counts = view.counts
    running = sum(counts.get(s, 0) for s in RUNNING)
    failed = counts.get("failed", 0)
    if compact:
        line.append(f" {len(state.nodes)} nodes ")
        line.append(f"{counts.get('done', 0)}✔", style="green")
        line.append(" ")
        line.append(f"{failed}✘", style="red" if failed else "")
        line.append(f" {running}◌" if state.finished else f" {running}⟳")
    else:
        line.append(f" nodes {len(state.nodes)}: ")
        line.append(f"{counts.get('done', 0)} done", style="green")
        line.append(" · ")
        line.append(f"{failed} failed", style="red" if failed else "")
        line.append(f" · {running} interrupted" if state.finished else f" · {running} running")
    best = view.best
    spec = view.leading()
    if best is not None and spec is not None and spec.column in best.metrics:
        value = best.metrics[spec.column]
        line.append(" · best ")
        line.append(best.id, style="bold yellow")
        line.append(f" {spec.name} {fmt_num(value)}")
        base = state.baseline
        ratio = improvement(value, base.metrics.get(spec.column) if base else None, spec.higher_is_better)
        if ratio is not None:
            line.append(f" ({ratio:.2f}×{'' if compact else ' vs baseline'})", style="bold green" if ratio > 1 else "")
    if state.max_tokens and not compact:
        share = state.tokens_spent / state.max_tokens
        line.append(f" · tokens {fmt_tokens(state.tokens_spent)}/{fmt_tokens(state.max_tokens)}",
                    style="bold red" if share >= 0.9 else "")
    return line


def gauge(label: str, used: float, cap: float | None, width: int, detail: str) -> Text:
    """`tokens  ▕█████░░░░░▏ 51%  1.02M / 2.00M` (no bar when there is no cap)."""
    text = Text()
    text.append(f"{label:<13}")
    if cap:
        share = max(0.0, used / cap)
        filled = min(width, round(width * min(share, 1.0)))
        colour = "red" if share >= 0.9 else ("yellow" if share >= 0.7 else "green")
        text.append("▕")
        text.append("█" * filled, style=colour)
        text.append("░" * (width - filled), style="grey35")
        text.append("▏")
        text.append(f" {share * 100:3.0f}% ", style=colour)
    text.append(detail)
    return text


def budget_text(view: RunView, *, now: float, width: int = 24) -> Text:
    state = view.state
    budget = state.config.get("budget", {}) if isinstance(state.config, dict) else {}
    cost_cap = budget.get("max_cost_usd") or None
    rpm_cap = budget.get("requests_per_minute") or None
    rpm = view.requests_per_minute(now)
    lines = [
        gauge("tokens", state.tokens_spent, state.max_tokens, width,
              f"{fmt_tokens(state.tokens_spent)} / {fmt_tokens(state.max_tokens) if state.max_tokens else 'no cap'}"
              f"  (prompt {fmt_tokens(state.prompt_tokens)}, completion {fmt_tokens(state.completion_tokens)})"),
        gauge("cost", state.cost_usd, cost_cap, width,
              f"${state.cost_usd:.4f}" + (f" / ${cost_cap:.2f}" if cost_cap else " (no cap)")),
        gauge("requests/min", rpm, rpm_cap, width, f"{rpm}" + (f" / {rpm_cap}" if rpm_cap else "")),
    ]
    out = Text("\n").join(lines)
    out.append(f"\nLLM calls     {state.llm_calls}")
    out.append("   keys: + / - change the token cap by 10%", style="grey50")
    return out
