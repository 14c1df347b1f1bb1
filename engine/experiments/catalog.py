"""The runs catalog: one summary row per run, one export row per node, read from event logs.

Why from the event logs: `events.jsonl` is the single source of truth of every run (CONTRACT),
so the catalog folds it with `RunState` exactly as `tree` and the dashboard do, and needs no
database. PATH arguments may be run directories, projects (all their runs), experiment
directories (`looptree ab --out DIR`: the runs of both arms, labelled) or any folder above them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looptree.engine.core.events import read_events
from looptree.engine.core.state import NodeState, RunState
from looptree.engine.errors import LooptreeError

EXPERIMENT_LOG = "events.jsonl"  # an experiment directory's own log starts with experiment_started
SKIP_DIRS = {".git", "worktrees", "nodes", "llm", "node_modules", "__pycache__"}


@dataclass
class RunRef:
    """A run directory, with its experiment and arm when it belongs to one."""

    run_dir: Path
    experiment: str | None = None
    arm: str | None = None
    task: str | None = None
    success_rule: str = "verdict"  # "verdict" or "kernelbench"


def first_event(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            line = fh.readline()
        return json.loads(line) if line.strip() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def experiment_runs(exp_dir: Path) -> list[RunRef]:
    """The runs an experiment directory's log names, each with its arm (latest record wins)."""
    refs: dict[tuple[str, str], RunRef] = {}
    rule = "verdict"
    for event in read_events(exp_dir / EXPERIMENT_LOG):
        if event.get("type") == "experiment_started":
            rule = "kernelbench" if event.get("suite_kind") == "kernelbench" else "verdict"
        if event.get("type") == "arm_started" and event.get("run_dir"):
            refs[(event["task"], event["arm"])] = RunRef(Path(event["run_dir"]), str(exp_dir), event["arm"],
                                                         event["task"], rule)
    return [r for r in refs.values() if (r.run_dir / "events.jsonl").exists()]


def find_runs(paths: Iterable[str]) -> list[RunRef]:
    """Every run under the given paths, each once, in a stable order."""
    out: list[RunRef] = []
    seen: set[Path] = set()

    def add(ref: RunRef) -> None:
        key = ref.run_dir.resolve()
        if key not in seen:
            seen.add(key)
            out.append(ref)

    for text in paths:
        root = Path(text).expanduser().resolve()
        if not root.exists():
            raise LooptreeError(f"{text}: no such file or directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            if "events.jsonl" not in filenames:
                continue
            first = first_event(Path(dirpath) / "events.jsonl") or {}
            if first.get("type") == "run_started":
                add(RunRef(Path(dirpath)))
                dirnames[:] = []
            elif first.get("type") == "experiment_started":
                for ref in experiment_runs(Path(dirpath)):
                    add(ref)
    return out


# --------------------------------------------------------------------------- one run


def leading_speedup(state: RunState, node: NodeState) -> float | None:
    """The credited leading-metric ratio of `node` against the baseline, > 1 = better."""
    base = state.baseline
    if base is None or not base.ok or not state.specs:
        return None
    spec = state.specs[0]
    source = state.credited(node)
    b, c = base.metrics.get(spec.column), source.metrics.get(spec.column)
    if b is None or c is None or not (math.isfinite(b) and math.isfinite(c)) or b <= 0 or c <= 0:
        return None
    return c / b if spec.higher_is_better else b / c


def credited_better(state: RunState, node: NodeState) -> bool:
    """Credited with numbers that a noise-aware verdict called better (or, without verdicts, strictly better)."""
    source = state.credited(node)
    if source.kind == "baseline" or getattr(source, "suspect", None):
        return False  # suspect: metrics the bench did not write are never credited
    if source.verdict:
        return source.verdict.get("label") == "better"
    ratio = leading_speedup(state, node)
    return ratio is not None and ratio > 1


def gpu_hours(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds each node's stages held a GPU, per node, in hours (a stage with a device counts)."""
    device_of: dict[tuple[Any, ...], Any] = {}
    hours: dict[str, float] = {}
    for e in events:
        key = (e.get("id"), e.get("stage"), e.get("repeat"), e.get("side"))
        if e.get("type") == "stage_started":
            device_of[key] = e.get("device")
        elif e.get("type") == "stage_finished":
            device = device_of.pop(key, None)
            if device not in (None, "", "none", "cpu"):
                hours[e.get("id") or ""] = hours.get(e.get("id") or "", 0.0) + float(e.get("duration_s") or 0) / 3600
    return hours


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


TASK_TABLES = ("project", "build", "check", "bench")


def agent_config_hash(config: dict[str, Any]) -> str:
    """The configuration under comparison: everything but the task's own tables (what an A/B overlay may change)."""
    return config_hash({k: v for k, v in config.items() if k not in TASK_TABLES})


def summarize_run(ref: RunRef, events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One row of the runs table (also what `looptree ab` records per task and arm)."""
    events = events if events is not None else read_events(ref.run_dir / "events.jsonl")
    state = RunState.from_events(events)
    started = next((e for e in events if e.get("type") == "run_started"), {})
    components = started.get("prompt_components") or {}
    base = state.baseline
    ranked = state.ranked()
    best = ranked[0] if ranked else None
    ratio = leading_speedup(state, best) if best is not None else None
    success = bool(best is not None and credited_better(state, best))
    if ref.success_rule == "kernelbench":
        success, ratio = _kernelbench_result(state)
    hours = gpu_hours(events)
    agent = state.config.get("agent", {})
    status = state.finished or ("running" if _lock_held(ref.run_dir) else "interrupted")
    row: dict[str, Any] = {
        "experiment": ref.experiment, "arm": ref.arm, "task": ref.task,
        "project": state.project, "run": state.run, "run_dir": str(ref.run_dir),
        "config_hash": config_hash(state.config), "agent_config_hash": agent_config_hash(state.config), "model": agent.get("model"), "provider": agent.get("provider"),
        **{f"prompt_{name}": components.get(name) for name in ("system", "ideas", "optimize", "improve", "fix")},
        "status": status, "baseline_ok": bool(base is not None and base.ok),
        "nodes": len(state.nodes), "evaluated": sum(1 for n in state.nodes.values() if n.ok),
        "failed": sum(1 for n in state.nodes.values() if n.status == "failed"),
        "tokens": state.tokens_spent, "cost_usd": round(state.cost_usd, 6), "llm_calls": state.llm_calls,
        "gpu_hours": round(sum(hours.values()), 6),
        "wall_s": round((state.finished_ts or state.last_ts or 0) - (state.started_ts or 0), 3) if state.started_ts else None,
        "best_node": best.id if best is not None else None,
        "best_ratio": round(ratio, 6) if ratio is not None else None,
        "success": success,
        "metric": state.specs[0].column if state.specs else None,
    }
    return row


def _kernelbench_result(state: RunState) -> tuple[bool, float | None]:
    """KernelBench runs: the summary's credited result (correct and faster than eager)."""
    from looptree.gpu.kernelbench.cli import TaskResult, result_from_state

    result = result_from_state(TaskResult(task="", number=0, project=""), state, state.finished or "")
    speedup = result.speedup_vs_eager
    ok = bool(result.correct and not result.error and speedup is not None and speedup > 1)
    return ok, speedup if result.correct else (1.0 if not result.error else None)


def _lock_held(run_dir: Path) -> bool:
    from looptree.engine.core.events import RunLock

    try:
        return RunLock.is_held(run_dir)
    except Exception:  # noqa: BLE001 - a viewer never fails on a lock it cannot read
        return False


# --------------------------------------------------------------------------- tables


def runs_table(paths: Iterable[str]) -> list[dict[str, Any]]:
    return [summarize_run(ref) for ref in find_runs(paths)]


def node_rows(ref: RunRef) -> list[dict[str, Any]]:
    """One export row per node: every metric, the verdict, tokens, cost and GPU-hours."""
    events = read_events(ref.run_dir / "events.jsonl")
    run = summarize_run(ref, events)
    state = RunState.from_events(events)
    hours = gpu_hours(events)
    components: dict[str, dict[str, str]] = {}
    for e in events:
        if e.get("type") == "agent_finished" and e.get("prompt_components"):
            components[e.get("id") or ""] = e["prompt_components"]
    rows = []
    for node_id in state.order:
        node = state.nodes[node_id]
        verdict = node.verdict or {}
        ratio = leading_speedup(state, node) if node.ok else None
        row: dict[str, Any] = {
            "experiment": run["experiment"], "arm": run["arm"], "task": run["task"], "project": run["project"],
            "run": run["run"], "config_hash": run["config_hash"], "node": node.id, "parent": node.parent,
            "kind": node.kind, "phase": node.phase, "status": node.status, "pruned": node.pruned,
            "description": node.description, "model": node.model, "prompt_hash": node.prompt_hash,
            "prompt_components": json.dumps(components.get(node.id, {}), sort_keys=True),
            "tokens": node.tokens, "cost_usd": round(node.cost_usd, 6), "gpu_hours": round(hours.get(node.id, 0.0), 6),
            "failure_stage": node.failure_stage, "failure_reason": node.failure_reason,
            "verdict": verdict.get("label"), "verdict_ratio": verdict.get("ratio"),
            "verdict_ci_low": verdict.get("ci_low"), "verdict_ci_high": verdict.get("ci_high"),
            "verdict_p_value": verdict.get("p_value"), "verdict_against": verdict.get("against"),
            "credited_ratio": round(ratio, 6) if ratio is not None else None,
            "credited_better": bool(node.ok and credited_better(state, node)),
        }
        for column, value in node.metrics.items():
            row[f"metric:{column}"] = value
        rows.append(row)
    return rows


def export_rows(paths: Iterable[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ref in find_runs(paths):
        rows.extend(node_rows(ref))
    return rows


def frame(rows: list[dict[str, Any]]):  # -> pandas.DataFrame
    import pandas as pd

    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    return pd.DataFrame(rows, columns=columns)


def write_export(rows: list[dict[str, Any]], fmt: str, out: Path | None) -> str | None:
    """CSV and JSONL go to `out` or are returned as text; parquet needs a file."""
    df = frame(rows)
    if fmt == "parquet":
        if out is None:
            raise LooptreeError("--format parquet needs --out FILE (it is a binary format)")
        df.to_parquet(out, index=False)
        return None
    if fmt == "csv":
        text = df.to_csv(index=False)
    elif fmt == "jsonl":
        text = "".join(json.dumps(_jsonable(r), sort_keys=False) + "\n" for r in df.to_dict(orient="records"))
    else:
        raise LooptreeError(f"--format {fmt!r}: use csv, jsonl or parquet")
    if out is not None:
        out.write_text(text, encoding="utf-8")
        return None
    return text


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


# --------------------------------------------------------------------------- --where


def parse_where(items: Iterable[str], columns: Iterable[str]) -> list[tuple[str, str, str]]:
    known = set(columns)
    out = []
    for item in items:
        for op in ("!=", ">=", "<=", "=", ">", "<"):
            if op in item:
                key, value = item.split(op, 1)
                key = key.strip()
                if key not in known:
                    raise LooptreeError(f"--where {item!r}: no column {key!r} (columns: {', '.join(sorted(known))})")
                out.append((key, op, value.strip()))
                break
        else:
            raise LooptreeError(f"--where {item!r} is not KEY=VALUE (also !=, <, <=, >, >=)")
    return out


def _matches(value: Any, op: str, wanted: str) -> bool:
    if op in ("=", "!="):
        if isinstance(value, bool):
            equal = wanted.lower() in (("true", "1", "yes") if value else ("false", "0", "no"))
        elif isinstance(value, (int, float)) and value is not None:
            try:
                equal = float(wanted) == float(value)
            except ValueError:
                equal = False
        else:
            equal = ("" if value is None else str(value)) == wanted
        return equal if op == "=" else not equal
    try:
        a, b = float(value), float(wanted)
    except (TypeError, ValueError):
        return False
    return {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[op]


def filter_rows(rows: list[dict[str, Any]], where: Iterable[str]) -> list[dict[str, Any]]:
    columns = {c for row in rows for c in row} or set(RUN_COLUMNS)
    conditions = parse_where(where, columns)
    return [r for r in rows if all(_matches(r.get(k), op, v) for k, op, v in conditions)]


RUN_COLUMNS = ["experiment", "arm", "task", "project", "run", "run_dir", "config_hash", "agent_config_hash", "model", "provider",
               "prompt_system", "prompt_ideas", "prompt_optimize", "prompt_improve", "prompt_fix", "status",
               "baseline_ok", "nodes", "evaluated", "failed", "tokens", "cost_usd", "llm_calls", "gpu_hours",
               "wall_s", "best_node", "best_ratio", "success", "metric"]

SHOWN = ["project", "run", "arm", "config_hash", "model", "prompt_system", "status", "nodes", "tokens",
         "cost_usd", "best_ratio", "success"]


def render_runs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs\n"
    shown = [c for c in SHOWN if any(r.get(c) is not None for r in rows)]

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if column == "project" and value:
            return Path(value).name
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    table = [shown] + [[cell(r, c) for c in shown] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    return "".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() + "\n" for line in table)
