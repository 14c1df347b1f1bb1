"""`looptree tree` and `looptree show`: folds of the event log rendered as text or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from looptree.engine.errors import LooptreeError
from looptree.engine.metrics import MetricSpec
from looptree.engine.runs import node_dir
from looptree.engine.state import NodeState, RunState

STATUS_MARK = {"done": "ok", "failed": "FAILED", "pending": "pending", "generating": "agent",
               "generated": "queued", "evaluating": "running"}


def lead_ratio(state: RunState, node: NodeState) -> float | None:
    """How many times better than the baseline on the leading metric (>1 is better)."""
    base, specs = state.baseline, state.specs
    if not specs or base is None or not base.ok or not node.ok:
        return None
    lead = specs[0]
    a, b = base.metrics.get(lead.column), node.metrics.get(lead.column)
    if not a or not b:
        return None
    return (b / a) if lead.higher_is_better else (a / b)


def _metric_text(node: NodeState, specs: list[MetricSpec] | None) -> str:
    if not node.metrics:
        return ""
    cols = specs or [MetricSpec(c, c, True) for c in node.metrics]
    return "  ".join(f"{s.name}={node.metrics[s.column]:.4g}" for s in cols if s.column in node.metrics)


def ci_text(verdict: dict) -> str:
    """`90% CI 0.91–0.98`: the interval with the coverage it really has.

    The level changes with the look (alpha spending), so it is read from the verdict; verdicts
    from runs made before it was recorded say only "CI".
    """
    level = verdict.get("ci_level")
    head = f"{level * 100:.3g}% CI" if isinstance(level, (int, float)) else "CI"
    return f"{head} {verdict.get('ci_low', 0):.3g}–{verdict.get('ci_high', 0):.3g}"


def verdict_text(node: NodeState) -> str:
    """`  [better than 1.2: 0.41x, 95% CI 0.38–0.45]`: the noise-aware call against the reference."""
    v = node.verdict
    if not v:
        return ""
    return (f"  [{v.get('label')} vs {v.get('against', node.parent)}: ratio {v.get('ratio', 0):.3g}, "
            f"{ci_text(v)}, n={v.get('n_candidate')}]")


def node_line(state: RunState, node: NodeState) -> str:
    status = STATUS_MARK.get(node.status, node.status)
    if not node.terminal and state.finished:
        status = "interrupted"
    marks = ("*best* " if state.best() is node else "") + ("[pinned] " if node.pinned else "") + ("[pruned] " if node.pruned else "")
    ratio = lead_ratio(state, node)
    ratio_text = f"  ({ratio:.2f}x)" if ratio is not None and node.kind != "baseline" else ""
    if node.status == "failed":
        detail = f"{node.failure_stage}: {' '.join((node.failure_reason or '').split())[:100]}"
    else:
        detail = _metric_text(node, state.specs) + ratio_text + verdict_text(node)
    desc = " ".join((node.description or node.idea or node.kind).split())[:70]
    return f"{node.id}  {status:<8} {marks}{detail}  — {node.kind}: {desc}"


def render_tree(state: RunState) -> str:
    if state.run is None:
        raise LooptreeError("the event log has no run_started event")
    best = state.best()
    header = [f"run {state.run}: {state.project}",
              f"status: {('finished: ' + state.finished) if state.finished else ('paused' if state.paused else 'running')}",
              f"nodes: {len(state.nodes)} ({state.evaluated} evaluated), tokens: {state.tokens_spent:,}"
              + (f" of {state.max_tokens:,}" if state.max_tokens else "")]
    if best is not None:
        ratio = lead_ratio(state, best)
        header.append(f"best: {best.id}" + (f" ({ratio:.2f}x the baseline on {state.specs[0].name})" if ratio and state.specs else ""))
    lines = header + [""]
    roots = [n for n in state.order if state.nodes[n].parent is None]

    def walk(node_id: str, prefix: str, last: bool, top: bool) -> None:
        node = state.nodes[node_id]
        branch = "" if top else ("└── " if last else "├── ")
        lines.append(prefix + branch + node_line(state, node))
        children = node.children
        for i, child in enumerate(children):
            walk(child, prefix + ("" if top else ("    " if last else "│   ")), i == len(children) - 1, False)

    for root in roots:
        walk(root, "", True, True)
    return "\n".join(lines)


def tree_json(state: RunState) -> dict[str, Any]:
    best = state.best()
    return {
        "run": state.run, "project": state.project, "finished": state.finished, "paused": state.paused,
        "tokens_spent": state.tokens_spent, "max_tokens": state.max_tokens, "cost_usd": state.cost_usd,
        "best": best.id if best else None,
        "metrics": [{"column": s.column, "name": s.name, "higher_is_better": s.higher_is_better} for s in state.specs or []],
        "nodes": [node_json(state, state.nodes[i]) for i in state.order],
    }


def node_json(state: RunState, node: NodeState) -> dict[str, Any]:
    return {
        "id": node.id, "parent": node.parent, "phase": node.phase, "kind": node.kind, "status": node.status,
        "description": node.description, "idea": node.idea, "hint": node.hint, "commit": node.commit,
        "branch": node.branch, "files": node.files, "metrics": node.metrics, "spread": node.spread,
        "iteration": node.iteration, "failure_stage": node.failure_stage, "failure_reason": node.failure_reason,
        "pinned": node.pinned, "pruned": node.pruned, "tokens": node.tokens, "prompt_hash": node.prompt_hash,
        "ratio_vs_baseline": lead_ratio(state, node), "children": node.children, "verdict": node.verdict,
        "credited_to": state.credited(node).id if node.ok else None, "device": node.device,
    }


def render_show(state: RunState, run_dir: Path, node_id: str, diff_text: str) -> str:
    node = state.nodes.get(node_id)
    if node is None:
        raise LooptreeError(f"no node {node_id} in run {state.run} (see `looptree tree {run_dir}`)")
    ndir = node_dir(run_dir, node_id)
    out = [node_line(state, node), ""]
    out.append(f"kind: {node.kind}   parent: {node.parent}   phase: {node.phase}   status: {node.status}")
    if node.branch:
        out.append(f"branch: {node.branch}   commit: {node.commit}")
    if node.idea:
        out.append(f"idea: {node.idea}")
    if node.hint:
        out.append(f"hint: {node.hint}")
    if node.prompt_hash:
        out.append(f"prompt: {node.prompt_hash}   model: {node.model}   tokens: {node.tokens:,}")
    out += ["", "## description", node.description or "(none)"]
    if node.metrics:
        out += ["", "## metrics"]
        for spec in state.specs or []:
            if spec.column in node.metrics:
                spread = node.spread.get(spec.column, {})
                extra = f"   (n={int(spread['n'])}, min {spread['min']:.6g}, max {spread['max']:.6g})" if spread.get("n") else ""
                out.append(f"{spec.column}: {node.metrics[spec.column]:.6g}{extra}")
    if node.failure_reason:
        out += ["", f"## failure ({node.failure_stage})", node.failure_reason]
    analysis = ndir / "analysis.md"
    if analysis.exists():
        out += ["", "## analysis", analysis.read_text().strip()]
    out += ["", "## diff against parent", diff_text.strip() or "(no change)"]
    for name in ("build.log", "check.log", "bench.log"):
        path = ndir / name
        if path.exists():
            text = path.read_text(errors="replace").strip().splitlines()
            out += ["", f"## {name} (last {min(20, len(text))} lines of {len(text)}; full log: {path})", *text[-20:]]
    return "\n".join(out) + "\n"
