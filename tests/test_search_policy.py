"""The phased tree search policy: which parents a phase expands, when a failure may be fixed, when to stop."""

from __future__ import annotations

import pytest

from looptree.engine.run.search import best_key, choose_parents, may_fix, phase_nodes, phases_without_improvement

RT = "runtime_ms (lower is better)"


@pytest.fixture
def phase0(run_events):
    """Baseline 100 ms; phase 0 gives 1.1 at 80, 1.2 at 60, 1.3 at 90, 1.4 fails its check."""
    ev = run_events
    ev.baseline(100.0)
    ev.emit("phase_started", phase=0, parents=["1"] * 4)
    ev.success("1.1", "1", 80.0)
    ev.success("1.2", "1", 60.0)
    ev.success("1.3", "1", 90.0)
    ev.failure("1.4", "1", stage="check", reason="wrong answer")
    return ev


# ---------------------------------------------------------------------------- choose_parents


def test_best_nodes_round_robin(phase0) -> None:
    assert choose_parents(phase0.state(), num_samples=5, expand_top=2) == ["1.2", "1.1", "1.2", "1.1", "1.2"]


def test_expand_top_one_sends_every_agent_to_the_best(phase0) -> None:
    assert choose_parents(phase0.state(), num_samples=3, expand_top=1) == ["1.2"] * 3


def test_fewer_samples_than_parents_takes_the_best_first(phase0) -> None:
    assert choose_parents(phase0.state(), num_samples=2, expand_top=4) == ["1.2", "1.1"]


def test_pinned_nodes_are_always_expanded_and_come_first(phase0) -> None:
    phase0.emit("node_pinned", id="1.3")  # third-best, outside the top 2
    assert choose_parents(phase0.state(), num_samples=3, expand_top=2) == ["1.3", "1.2", "1.1"]


def test_pinned_node_does_not_take_a_top_slot(phase0) -> None:
    phase0.emit("node_pinned", id="1.2")
    assert choose_parents(phase0.state(), num_samples=4, expand_top=1) == ["1.2", "1.1", "1.2", "1.1"]


def test_pruned_nodes_are_never_expanded(phase0) -> None:
    phase0.emit("node_pruned", id="1.2")
    assert choose_parents(phase0.state(), num_samples=2, expand_top=2) == ["1.1", "1.3"]


def test_pruning_wins_over_pinning(phase0) -> None:
    phase0.emit("node_pinned", id="1.2")
    phase0.emit("node_pruned", id="1.2")
    assert "1.2" not in choose_parents(phase0.state(), num_samples=4, expand_top=2)


def test_pruning_a_parent_excludes_its_descendants(phase0) -> None:
    phase0.success("1.2.1", "1.2", 10.0, kind="improve", phase=1)
    phase0.emit("node_pruned", id="1.2")
    assert choose_parents(phase0.state(), num_samples=2, expand_top=2) == ["1.1", "1.3"]


def test_failed_nodes_are_not_parents(phase0) -> None:
    assert "1.4" not in choose_parents(phase0.state(), num_samples=8, expand_top=10)


def test_only_the_baseline_left(run_events) -> None:
    run_events.baseline(100.0)
    assert choose_parents(run_events.state(), num_samples=3, expand_top=2) == ["1", "1", "1"]


def test_nothing_to_expand_when_everything_failed_or_was_pruned(run_events) -> None:
    run_events.baseline(100.0)
    run_events.emit("node_pruned", id="1")
    assert choose_parents(run_events.state(), num_samples=3, expand_top=2) == []


# ---------------------------------------------------------------------------- may_fix


def test_a_failed_check_may_be_fixed(phase0) -> None:
    state = phase0.state()
    assert may_fix(state, state.nodes["1.4"], max_fix_attempts=2)
    assert not may_fix(state, state.nodes["1.4"], max_fix_attempts=0)


def test_successful_nodes_are_not_fixed(phase0) -> None:
    state = phase0.state()
    assert not may_fix(state, state.nodes["1.1"], max_fix_attempts=2)


@pytest.mark.parametrize("stage", ["edit", "build", "check", "bench", "metrics", "timeout"])
def test_fixable_stages(run_events, stage: str) -> None:
    run_events.baseline(100.0)
    run_events.failure("1.1", "1", stage=stage)
    state = run_events.state()
    assert may_fix(state, state.nodes["1.1"], max_fix_attempts=1)


def test_agent_failures_are_not_fixed(run_events) -> None:
    run_events.baseline(100.0)
    run_events.created("1.1", "1")
    run_events.emit("agent_failed", id="1.1", role="optimize", reason="HTTP 500")
    run_events.emit("node_failed", id="1.1", stage="agent", reason="HTTP 500")
    state = run_events.state()
    assert not may_fix(state, state.nodes["1.1"], max_fix_attempts=5)


def test_pruned_failures_are_not_fixed(phase0) -> None:
    phase0.emit("node_pruned", id="1.4")
    state = phase0.state()
    assert not may_fix(state, state.nodes["1.4"], max_fix_attempts=2)


def test_a_node_is_fixed_once(phase0) -> None:
    phase0.created("1.4.1", "1.4", kind="fix", fix_of="1.4")
    state = phase0.state()
    assert not may_fix(state, state.nodes["1.4"], max_fix_attempts=5)


def test_fix_attempts_are_limited_along_the_chain(phase0) -> None:
    phase0.failure("1.4.1", "1.4", kind="fix")
    state = phase0.state()
    assert may_fix(state, state.nodes["1.4.1"], max_fix_attempts=2)  # one fix so far
    assert not may_fix(state, state.nodes["1.4.1"], max_fix_attempts=1)
    phase0.failure("1.4.1.1", "1.4.1", kind="fix")
    state = phase0.state()
    assert not may_fix(state, state.nodes["1.4.1.1"], max_fix_attempts=2)  # two fixes: the limit
    assert may_fix(state, state.nodes["1.4.1.1"], max_fix_attempts=3)


# ---------------------------------------------------------------------------- phases and improvement


def test_phase_nodes_excludes_fixes_and_forks(phase0) -> None:
    phase0.failure("1.4.1", "1.4", kind="fix")
    phase0.created("1.1.1", "1.1", kind="fork", phase=0, hint="h")
    assert [n.id for n in phase_nodes(phase0.state(), 0)] == ["1.1", "1.2", "1.3", "1.4"]
    assert phase_nodes(phase0.state(), 1) == []


def test_best_key_is_larger_when_better(phase0) -> None:
    assert best_key(phase0.state()) == (-60.0,)


def test_best_key_without_results(run_events) -> None:
    assert best_key(run_events.state()) is None


@pytest.mark.parametrize("improved, count", [
    ([], 0),
    ([True], 0),
    ([False], 1),
    ([True, False, False], 2),
    ([False, True], 0),
    ([False, False, False], 3),
    ([True, False, True, False], 1),
])
def test_phases_without_improvement(run_events, improved: list[bool], count: int) -> None:
    run_events.baseline(100.0)
    for phase, flag in enumerate(improved):
        run_events.emit("phase_started", phase=phase, parents=["1"])
        run_events.emit("phase_finished", phase=phase, best="1", improved=flag)
    assert phases_without_improvement(run_events.state()) == count
