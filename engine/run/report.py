"""`looptree tree` and `looptree show`: folds of the event log rendered as text or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from looptree.engine.core.metrics import MetricSpec
from looptree.engine.core.runs import node_dir
from looptree.engine.core.schema import ci_text, clip_words  # re-exported: the dashboard reads them here
from looptree.engine.core.state import NodeState, RunState
from looptree.engine.errors import LooptreeError

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


def verdict_text(node: NodeState) -> str:
    """`  [better than 1.2: 0.41x, 95% CI 0.38–0.45]`: the noise-aware call against the reference."""
    v = node.verdict
    if not v:
        return ""
    return (f"  [{v.get('label')} vs {v.get('against', node.parent)}: ratio {v.get('ratio', 0):.3g}, "
            f"{ci_text(v)}, n={v.get('n_candidate')}]")


REASON_WIDTH = 100  # characters of a failure reason per line of `tree`
REASON_LINES = 6  # lines of it before `tree` points at `show`


def wrap_reason(reason: str | None, node_id: str) -> list[str]:
    """A failure reason wrapped at word boundaries; past REASON_LINES lines, a pointer to `show`."""
    import textwrap

    text = " ".join((reason or "").split())
    lines = textwrap.wrap(text, width=REASON_WIDTH, break_long_words=False, break_on_hyphens=False)
    if len(lines) > REASON_LINES:
        lines = textwrap.wrap(text, width=REASON_WIDTH, break_long_words=False, break_on_hyphens=False,
                              max_lines=REASON_LINES, placeholder=f" … (the whole reason: `looptree show <run dir> {node_id}`)")
    return lines or [""]


def node_line(state: RunState, node: NodeState) -> str:
    """The node's line; a long failure reason continues on lines indented by 4 (`render_tree` prefixes them)."""
    status = STATUS_MARK.get(node.status, node.status)
    if not node.terminal and state.finished:
        status = "interrupted"
    if node.suspect:
        status = "SUSPECT"
    marks = ("*best* " if state.best() is node else "") + ("[pinned] " if node.pinned else "") + ("[pruned] " if node.pruned else "")
    ratio = lead_ratio(state, node)
    ratio_text = f"  ({ratio:.2f}x)" if ratio is not None and node.kind != "baseline" else ""
    if node.status == "failed":
        reason = wrap_reason(node.failure_reason, node.id)
        detail, more = f"{node.failure_stage}: {reason[0]}", reason[1:]
    elif node.suspect:  # its numbers are shown for the record, with why they are not credited
        detail = (_metric_text(node, state.specs) + "  [not credited: " + " ".join(node.suspect.split())[:160]
                  + "]")
    else:
        detail = _metric_text(node, state.specs) + ratio_text + verdict_text(node)
    desc = clip_words(node.description or node.idea or node.kind, 70)
    line = f"{node.id}  {status:<8} {marks}{detail}  — {node.kind}: {desc}"
    return "\n".join([line, *("    " + part for part in more)]) if node.status == "failed" else line


def containment_text(state: RunState) -> str | None:
    """"not sandboxed: <reason>" when the run's commands ran uncontained (`run_started.sandbox`)."""
    record = getattr(state, "sandbox", None)
    if isinstance(record, dict) and record.get("mechanism") == "off":
        return f"not sandboxed: {record.get('reason') or 'no reason recorded'}"
    return None


def render_tree(state: RunState) -> str:
    if state.run is None:
        raise LooptreeError("the event log has no run_started event")
    best = state.best()
    header = [f"run {state.run}: {state.project}",
              f"status: {('finished: ' + state.finished) if state.finished else ('paused' if state.paused else 'running')}",
              f"nodes: {len(state.nodes)} ({state.evaluated} evaluated), tokens: {state.tokens_spent:,}"
              + (f" of {state.max_tokens:,}" if state.max_tokens else "")]
    uncontained = containment_text(state)
    if uncontained:
        header.append(uncontained)
    if best is not None:
        ratio = lead_ratio(state, best)
        header.append(f"best: {best.id}" + (f" ({ratio:.2f}x the baseline on {state.specs[0].name})" if ratio and state.specs else ""))
    lines = header + [""]
    roots = [n for n in state.order if state.nodes[n].parent is None]

    def walk(node_id: str, prefix: str, last: bool, top: bool) -> None:
        node = state.nodes[node_id]
        branch = "" if top else ("└── " if last else "├── ")
        first, *more = node_line(state, node).split("\n")
        lines.append(prefix + branch + first)
        below = prefix + ("" if top else ("    " if last else "│   ")) + ("│   " if node.children else "    ")
        lines.extend(below + part.removeprefix("    ") for part in more)
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
        "credited_to": state.credited(node).id if node.credible else None, "device": node.device,
        "suspect": node.suspect,
    }


REPLY_HEAD_LINES = 40
REPLY_HEAD_CHARS = 4000


def reply_section(run_dir: Path, node: NodeState) -> list[str]:
    """The agent's reply for `show`: whole when short, else its head and the file that holds it.

    Every node that got a reply shows it, above all one that failed at the edit stage (the reply
    is the only evidence of what went wrong). The baseline shows the ideas reply asked on it.
    """
    if node.kind == "baseline":
        path, title, text = run_dir / "ideas.md", "ideas reply (asked on the baseline)", None
    else:
        path, title, text = node_dir(run_dir, node.id) / "response.md", "agent reply", node.reply_text
    if text is None:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return []  # no reply yet (or the agent call failed): nothing to show
    where = f"the whole reply: {path}" if path.exists() else "from the event log"
    if not text.strip():
        return ["", f"## {title}", f"(the reply was empty; {where})"]
    lines = text.rstrip().splitlines()
    head: list[str] = []
    size = 0
    for line in lines[:REPLY_HEAD_LINES]:
        if size + len(line) > REPLY_HEAD_CHARS and head:
            break
        head.append(line if len(line) <= REPLY_HEAD_CHARS else line[:REPLY_HEAD_CHARS] + " …")
        size += len(line) + 1
    if len(head) == len(lines) and not head[-1].endswith(" …"):
        return ["", f"## {title} ({len(lines)} lines; {where})", *head]
    return ["", f"## {title} (first {len(head)} of {len(lines)} lines; {where})", *head,
            f"… ({len(lines) - len(head)} more lines in {path})"]


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
    if node.suspect:
        out += ["", "## SUSPECT: metrics not credited", node.suspect]
    out += reply_section(run_dir, node)
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
