"""The phased tree search policy, as pure functions of the folded state.

Why pure: the engine asks "which parents does phase p expand?", "is the run stuck?", "may this
failed node be fixed?" of the state alone, so a resumed run makes the same choices the crashed
one would have, and each rule is tested without processes or models.
"""

from __future__ import annotations

from looptree.engine.core.metrics import priority_key
from looptree.engine.core.state import NodeState, RunState

FIXABLE_STAGES = ("edit", "build", "check", "bench", "metrics", "timeout")


def choose_parents(state: RunState, num_samples: int, expand_top: int) -> list[str]:
    """Pinned nodes always, then the best unpruned nodes, `num_samples` agents spread round robin."""
    ranked = [n for n in state.ranked() if not n.pruned]
    pinned = [n.id for n in ranked if n.pinned]
    chosen = list(pinned) + [n.id for n in ranked if not n.pinned][:expand_top]
    if not chosen:
        base = state.baseline
        chosen = [base.id] if base is not None and base.ok and not base.pruned else []
    if not chosen:
        return []
    return [chosen[i % len(chosen)] for i in range(num_samples)]


def phase_nodes(state: RunState, phase: int) -> list[NodeState]:
    """The agents a phase started (fix attempts hang below them and are not counted)."""
    return [state.nodes[i] for i in state.order if state.nodes[i].phase == phase and state.nodes[i].kind in ("idea", "improve")]


def may_fix(state: RunState, node: NodeState, max_fix_attempts: int) -> bool:
    if node.status != "failed" or node.pruned or node.failure_stage not in FIXABLE_STAGES:
        return False
    if any(state.nodes[c].kind == "fix" for c in node.children):
        return False  # already being (or been) fixed
    return state.fix_depth(node.id) < max_fix_attempts


def lead_key(state: RunState, node: NodeState | None) -> tuple[float, ...] | None:
    """The metrics a node is credited with, in priority order (larger is better)."""
    if node is None or not state.specs:
        return None
    return priority_key(state.credited(node).metrics, state.specs)


def best_key(state: RunState) -> tuple[float, ...] | None:
    return lead_key(state, state.best())


def improved_since(state: RunState, before_id: str | None) -> bool:
    """Did the best node beat the one that was best when the phase started (recorded in the log)?"""
    now = best_key(state)
    before = lead_key(state, state.nodes.get(before_id or ""))
    return now is not None and (before is None or now > before)


def phases_without_improvement(state: RunState) -> int:
    """Consecutive finished phases, counted from the last, whose best did not beat the previous best."""
    count = 0
    for phase in sorted(state.phases_finished, reverse=True):
        if state.phases_finished[phase].get("improved"):
            break
        count += 1
    return count
