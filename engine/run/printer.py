"""Headless output: one human line per event (stderr) or one JSON object per event (stdout).

Why its own module: `--no-tui` is how people run looptree under nohup, in CI and in logs, so the
lines must be greppable and stable; the dashboard is not involved.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from looptree.engine.run.report import ci_text, clip_words
from looptree.engine.core.state import RunState


def _short(text: str | None, limit: int = 90) -> str:
    """One line of at most `limit` characters, cut between words (the whole text is in the event log)."""
    return clip_words(text, limit)


def _metrics(values: dict[str, Any], limit: int = 3) -> str:
    parts = []
    for key, value in list(values.items())[:limit]:
        name = key.split("(")[0].strip()
        parts.append(f"{name}={value:.4g}" if isinstance(value, (int, float)) else f"{name}={value}")
    return " ".join(parts)


def format_event(event: dict[str, Any], state: RunState) -> str | None:
    """The line for one event, or None for events too chatty to print (GPU samples)."""
    kind = event.get("type")
    node = event.get("id") or ""
    if kind == "run_started":
        return f"run {event.get('run')} started on {event.get('project')} (base {str(event.get('base_commit'))[:10]})"
    if kind == "engine_attached":
        return (f"resumed by pid {event.get('pid')}: killed {event.get('orphans_killed', 0)} orphan processes, "
                f"removed {event.get('worktrees_removed', 0)} stale worktrees")
    if kind == "ideas_generated":
        ideas = event.get("ideas", [])
        return f"ideas: {len(ideas)}" + "".join(f"\n    {i + 1}. {_short(x, 110)}" for i, x in enumerate(ideas))
    if kind == "phase_started":
        return f"phase {event.get('phase')} started: expanding {', '.join(dict.fromkeys(event.get('parents', [])))}"
    if kind == "phase_finished":
        return f"phase {event.get('phase')} finished: best {event.get('best')}{' (improved)' if event.get('improved') else ''}"
    if kind == "node_created":
        extra = f" idea: {_short(event.get('idea'), 70)}" if event.get("idea") else ""
        extra += f" hint: {_short(event.get('hint'), 70)}" if event.get("hint") else ""
        return f"{node:<10} created ({event.get('kind')}, parent {event.get('parent')}){extra}"
    if kind == "agent_started":
        return f"{node or '-':<10} agent {event.get('role')} asking"
    if kind == "agent_finished":
        usage = event.get("usage", {})
        return f"{node:<10} agent replied ({usage.get('total_tokens', 0)} tokens): {_short(event.get('description'))}"
    if kind == "agent_failed":
        return f"{node or '-':<10} agent failed: {_short(event.get('reason'), 200)}"
    if kind == "tokens_spent":
        cap = state.max_tokens
        return f"{'':<10} tokens {state.tokens_spent:,}" + (f" of {cap:,}" if cap else "")
    if kind == "edits_applied":
        return f"{node:<10} committed {str(event.get('commit'))[:10]} on {event.get('branch')} ({', '.join(event.get('files', [])) or 'no change'})"
    if kind == "edits_rejected":
        return f"{node:<10} edits rejected: {_short(event.get('reason'), 200)}"
    if kind == "stage_started":
        rep = f" #{event['repeat'] + 1}" if event.get("repeat") is not None else ""
        return f"{node:<10} {event.get('stage')}{rep} running"
    if kind == "stage_finished":
        rep = f" #{event['repeat'] + 1}" if event.get("repeat") is not None else ""
        status = "ok" if event.get("ok") else f"FAILED: {_short(event.get('reason'), 160)}"
        return f"{node:<10} {event.get('stage')}{rep} {status} ({event.get('duration_s', 0):.2f} s)"
    if kind == "metric_row":
        return f"{node:<10} row {event.get('iteration')}: {_metrics(event.get('values', {}))}"
    if kind == "node_evaluated":
        base = state.baseline
        ratio = ""
        specs = state.specs or []
        if base and base.ok and specs and base.id != node:
            lead = specs[0]
            a, b = base.metrics.get(lead.column), event.get("metrics", {}).get(lead.column)
            if a and b:
                r = (a / b) if not lead.higher_is_better else (b / a)
                ratio = f"  ({r:.2f}x vs baseline)"
        verdict = event.get("verdict") or {}
        call = (f" — {verdict['label']} than {verdict.get('against')} (ratio {verdict.get('ratio', 0):.3g}, "
                f"{ci_text(verdict)}, n={verdict.get('n_candidate')})"
                if verdict.get("label") else "")
        call = call.replace("no significant change than", "no significant change vs").replace("worse than", "worse than")
        return f"{node:<10} evaluated #{event.get('iteration')}: {_metrics(event.get('metrics', {}))}{ratio}{call}"
    if kind == "node_failed":
        return f"{node:<10} FAILED at {event.get('stage')}: {_short(event.get('reason'), 200)}"
    if kind in ("node_pruned", "node_pinned", "node_unpinned"):
        return f"{node:<10} {kind.split('_')[1]}"
    if kind == "fork_requested":
        return f"{node:<10} fork requested: {_short(event.get('hint'))}"
    if kind == "budget_changed":
        return f"budget now {event.get('max_tokens'):,} tokens"
    if kind == "run_paused":
        return "paused"
    if kind == "run_unpaused":
        return "resumed"
    if kind == "stop_requested":
        return f"stopping: {event.get('reason')}"
    if kind == "gpu_status":
        return (f"GPU: {len(event.get('devices') or [])} device(s) for benchmarks via {event.get('backend')}"
                if event.get("available") else f"no GPU: {event.get('reason')} (benchmarks run on the CPU)")
    if kind == "gpu_sample":
        return None
    if kind == "message":
        return str(event.get("text"))
    if kind == "run_finished":
        best = state.best()
        tail = f"; best {best.id}: {_metrics(best.metrics)}" if best else ""
        return f"run finished: {event.get('reason')} ({state.evaluated} evaluated, {state.tokens_spent:,} tokens){tail}"
    return None


class Printer:
    """An EventLog listener. Lines are prefixed with the time since the run started."""

    def __init__(self, state: RunState, *, json_mode: bool = False, stream: TextIO | None = None) -> None:
        self.state = state
        self.json_mode = json_mode
        self.stream = stream or (sys.stdout if json_mode else sys.stderr)
        self.started = time.time()

    def __call__(self, event: dict[str, Any]) -> None:
        if self.json_mode:
            self.stream.write(json.dumps(event, separators=(",", ":"), default=str) + "\n")
            self.stream.flush()
            return
        line = format_event(event, self.state)
        if line is None:
            return
        started = self.state.started_ts or self.started
        elapsed = max(0.0, event.get("ts", time.time()) - started)
        minutes, seconds = divmod(elapsed, 60)
        self.stream.write(f"[{int(minutes):02d}:{seconds:04.1f}] {line}\n")
        self.stream.flush()
