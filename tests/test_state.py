"""RunState: the fold of events.jsonl into statuses, rankings, the tree's shape and the run's accounts."""

from __future__ import annotations

import pytest

from looptree.engine.core.state import RunState

RT = "runtime_ms (lower is better)"
ACC = "accuracy (higher is better)"


@pytest.fixture
def grown(run_events):
    """Baseline 100 ms; phase 0: 1.1 80 ms, 1.2 fails its build and its fix 1.2.1 gives 90 ms, 1.3 120 ms;
    phase 1 expands 1.1 into 1.1.1 at 50 ms."""
    ev = run_events
    ev.baseline(100.0)
    ev.emit("agent_started", id=None, role="ideas")
    ev.emit("tokens_spent", id=None, role="ideas", prompt_tokens=30, completion_tokens=20, total_tokens=50, cost_usd=0.002)
    ev.emit("ideas_generated", ideas=["vectorise", "cache", "unroll"])
    ev.emit("phase_started", phase=0, parents=["1", "1", "1"])
    ev.success("1.1", "1", 80.0)
    ev.failure("1.2", "1", stage="build", reason="SyntaxError: invalid syntax")
    ev.success("1.2.1", "1.2", 90.0, kind="fix")
    ev.success("1.3", "1", 120.0)
    ev.emit("phase_finished", phase=0, best="1.1", improved=True)
    ev.emit("phase_started", phase=1, parents=["1.1"])
    ev.success("1.1.1", "1.1", 50.0, kind="improve", phase=1, tokens=400)
    ev.emit("phase_finished", phase=1, best="1.1.1", improved=True)
    return ev


def test_run_started_sets_the_run_fields(grown) -> None:
    state = grown.state()
    assert (state.run, state.project, state.base_commit) == (1, "/nonexistent/project", "b" * 40)
    assert state.started_ts == 1000.0
    assert state.max_tokens == 1_000_000
    assert state.baseline is state.nodes["1"] and state.baseline.description == "baseline"
    assert state.ideas == ["vectorise", "cache", "unroll"]
    assert state.phases_started == {0: ["1", "1", "1"], 1: ["1.1"]}
    assert state.phases_finished[1] == {"best": "1.1.1", "improved": True}
    assert state.last_seq == len(grown.events) - 1


def test_statuses_follow_the_node_lifecycle(run_events) -> None:
    ev = run_events
    ev.baseline(100.0)
    seen = []

    def step(type_, **fields):
        ev.emit(type_, **fields)
        node = ev.state().nodes["1.1"]
        seen.append((node.status, node.stage))

    step("node_created", id="1.1", parent="1", phase=0, kind="idea", idea="vectorise")
    step("agent_started", id="1.1", role="optimize")
    step("agent_finished", id="1.1", role="optimize", text="t", description="d", usage={"total_tokens": 5})
    step("edits_applied", id="1.1", files=["solver.py"], commit="c1", branch="looptree/1.1")
    step("stage_started", id="1.1", stage="build")
    step("stage_finished", id="1.1", stage="build", ok=True, rc=0, duration_s=0.1)
    step("stage_started", id="1.1", stage="bench", repeat=0)
    step("node_evaluated", id="1.1", iteration=3, metrics={RT: 70.0}, spread={}, columns=[RT])
    assert seen == [("pending", None), ("generating", "agent"), ("generating", None), ("generated", None),
                    ("evaluating", "build"), ("evaluating", None), ("evaluating", "bench"), ("done", None)]
    node = ev.state().nodes["1.1"]
    assert node.ok and node.terminal and node.iteration == 3 and node.metrics == {RT: 70.0}
    assert node.idea == "vectorise" and node.description == "d"
    assert (node.commit, node.branch, node.files) == ("c1", "looptree/1.1", ["solver.py"])


def test_failed_node_keeps_stage_and_reason(grown) -> None:
    node = grown.state().nodes["1.2"]
    assert node.status == "failed" and node.terminal and not node.ok
    assert (node.failure_stage, node.failure_reason) == ("build", "SyntaxError: invalid syntax")
    assert node.finished_ts is not None


def test_incremental_apply_equals_a_fold_from_scratch(grown) -> None:
    live = RunState()
    for event in grown.events:
        live.apply(event)
    assert live == grown.state()


def test_unknown_event_types_are_ignored_but_advance_seq(run_events) -> None:
    run_events.emit("something_new", x=1)
    state = run_events.state()
    assert state.last_seq == 1 and state.run == 1


def test_tree_shape(grown) -> None:
    state = grown.state()
    assert state.order == ["1", "1.1", "1.2", "1.2.1", "1.3", "1.1.1"]
    assert state.nodes["1"].children == ["1.1", "1.2", "1.3"]
    assert state.nodes["1.2"].children == ["1.2.1"]
    assert state.nodes["1.2.1"].fix_of == "1.2" and state.nodes["1.2.1"].kind == "fix"
    assert [state.nodes[i].depth for i in ("1", "1.1", "1.1.1")] == [0, 1, 2]
    assert sorted(state.subtree("1.1")) == ["1.1", "1.1.1"]
    assert sorted(state.subtree("1")) == sorted(state.order)
    assert state.subtree("9.9") == []
    assert [n.id for n in state.path("1.1.1")] == ["1", "1.1", "1.1.1"]
    assert [n.id for n in state.path("1.2.1")] == ["1", "1.2", "1.2.1"]
    assert state.counts() == {"done": 5, "failed": 1}


def test_ranking_lower_is_better(grown) -> None:
    state = grown.state()
    assert [s.name for s in state.specs] == ["runtime_ms"] and not state.specs[0].higher_is_better
    assert [n.id for n in state.ranked()] == ["1.1.1", "1.1", "1.2.1", "1", "1.3"]
    assert state.best().id == "1.1.1"
    assert [n.id for n in state.successful()] == ["1", "1.1", "1.2.1", "1.3", "1.1.1"]
    assert state.evaluated == 5


def test_ranking_higher_is_better_with_tie_break(make_events) -> None:
    ev = make_events(run=4, columns=(ACC, RT))
    ev.baseline(0.5, 10.0)
    ev.success("4.1", "4", 0.9, 30.0)
    ev.success("4.2", "4", 0.9, 20.0)  # same accuracy, faster: the second column breaks the tie
    ev.success("4.3", "4", 0.7, 1.0)
    state = ev.state()
    assert [n.id for n in state.ranked()] == ["4.2", "4.1", "4.3", "4"]
    assert state.best().id == "4.2" and state.baseline.id == "4"


def test_full_ties_keep_creation_order(run_events) -> None:
    run_events.baseline(100.0)
    run_events.success("1.1", "1", 50.0)
    run_events.success("1.2", "1", 50.0)
    assert [n.id for n in run_events.state().ranked()] == ["1.1", "1.2", "1"]


def test_no_successful_node_means_no_best(run_events) -> None:
    run_events.created("1", None, kind="baseline", phase=-1)
    run_events.emit("node_failed", id="1", stage="bench", reason="exit 1")
    state = run_events.state()
    assert state.best() is None and state.ranked() == []


def test_prune_marks_the_whole_subtree(grown) -> None:
    grown.emit("node_pruned", id="1.1")
    state = grown.state()
    assert state.nodes["1.1"].pruned and state.nodes["1.1.1"].pruned
    assert not any(state.nodes[i].pruned for i in ("1", "1.2", "1.2.1", "1.3"))
    assert [n.id for n in state.ranked(include_pruned=False)] == ["1.2.1", "1", "1.3"]
    assert state.best().id == "1.1.1"  # pruning stops expansion; the measured result still stands


def test_pin_and_unpin(grown) -> None:
    grown.emit("node_pinned", id="1.3")
    assert grown.state().nodes["1.3"].pinned
    grown.emit("node_unpinned", id="1.3")
    assert not grown.state().nodes["1.3"].pinned
    grown.emit("node_pinned", id="8.8")  # an unknown node changes nothing
    assert not any(n.pinned for n in grown.state().nodes.values())


def test_next_child_id(grown) -> None:
    state = grown.state()
    assert state.next_child_id("1") == "1.4"
    assert state.next_child_id("1.3") == "1.3.1"
    assert state.next_child_id("1.2") == "1.2.2"
    grown.created("1.7", "1")  # after a gap the numbering continues from the highest
    assert grown.state().next_child_id("1") == "1.8"


def test_fix_depth_counts_fix_of_fix(grown) -> None:
    grown.failure("1.3.1", "1.3", kind="improve", phase=1)
    grown.failure("1.3.1.1", "1.3.1", kind="fix", phase=1)
    grown.failure("1.3.1.1.1", "1.3.1.1", kind="fix", phase=1)
    state = grown.state()
    assert [state.fix_depth(i) for i in ("1", "1.2", "1.2.1", "1.3.1", "1.3.1.1", "1.3.1.1.1")] == [0, 0, 1, 0, 1, 2]
    assert state.fix_depth("nope") == 0


def test_token_and_cost_accounting(grown) -> None:
    state = grown.state()
    # ideas 50 + four agents at 100 + one at 400 (1.1, 1.2, 1.2.1, 1.3, then 1.1.1)
    assert state.tokens_spent == 50 + 4 * 100 + 400
    assert state.prompt_tokens == 30 + 4 * 75 + 300
    assert state.completion_tokens == 20 + 4 * 25 + 100
    assert state.llm_calls == 6
    assert state.cost_usd == pytest.approx(0.002 + 5 * 0.001)
    assert state.nodes["1.1.1"].tokens == 400 and state.nodes["1"].tokens == 0
    assert state.nodes["1.1.1"].cost_usd == pytest.approx(0.001)
    assert state.nodes["1.1.1"].prompt_hash == "h1.1.1"


def test_budget_changed_replaces_the_cap(grown) -> None:
    grown.emit("budget_changed", max_tokens=1_500_000)
    assert grown.state().max_tokens == 1_500_000


def test_pause_stop_finish_and_attach(grown) -> None:
    grown.emit("run_paused")
    assert grown.state().paused
    grown.emit("run_unpaused")
    assert not grown.state().paused
    grown.emit("stop_requested", reason="stopped by user")
    grown.emit("run_finished", reason="stopped by user")
    state = grown.state()
    assert (state.stop_requested, state.finished) == ("stopped by user", "stopped by user")
    assert state.finished_ts == grown.events[-1]["ts"]
    grown.emit("engine_attached", pid=7)  # resume: the run is live again
    state = grown.state()
    assert state.finished is None and state.stop_requested is None and state.finished_ts is None


def test_fork_request_is_pending_until_its_node_exists(grown) -> None:
    grown.emit("fork_requested", id="1.3", hint="try numpy")
    assert grown.state().pending_forks == [{"id": "1.3", "hint": "try numpy"}]
    grown.created("1.3.1", "1.3", kind="fork", phase=1, hint="try numpy")
    state = grown.state()
    assert state.pending_forks == [] and state.nodes["1.3.1"].hint == "try numpy"


def test_metric_rows_are_live_and_reset_by_a_new_evaluation(run_events) -> None:
    ev = run_events
    ev.baseline(100.0)
    assert ev.state().nodes["1"].rows == [{"repeat": 0, "iteration": 1, RT: 100.0}]
    ev.emit("stage_started", id="1", stage="build")  # a re-evaluation starts from an empty chart
    assert ev.state().nodes["1"].rows == []


def test_specs_come_from_the_first_metric_row(run_events) -> None:
    run_events.created("1", None, kind="baseline", phase=-1)
    run_events.emit("metric_row", id="1", repeat=0, iteration=1, values={RT: 3.0}, columns=[RT])
    assert [s.column for s in run_events.state().specs] == [RT]


def test_gpu_samples_and_messages(run_events) -> None:
    run_events.emit("gpu_sample", device=0, fields={"util": 50})
    run_events.emit("gpu_sample", device=0, fields={"util": 70})
    run_events.emit("message", text="refused prune: no node 9")
    state = run_events.state()
    assert state.gpu == {0: {"util": 70}}
    assert state.messages == ["refused prune: no node 9"]


def test_consumed_replies_record_every_paid_reply_in_order(run_events) -> None:
    run_events.baseline(100.0)
    run_events.emit("ideas_generated", ideas=["a"], text='["a"]')
    run_events.created("1.1", "1")
    run_events.emit("agent_finished", id="1.1", role="optimize", text="first", description="d", usage={})
    run_events.emit("agent_finished", id=None, role="ideas", text="", description="", usage={})  # nothing to record
    run_events.emit("agent_finished", id="9.9", role="fix", text="orphan", description="", usage={})
    assert run_events.state().consumed_replies == ['["a"]', "first", "orphan"]


def test_children_of_a_pruned_node_are_born_pruned_and_forks_leave_one_request_each() -> None:
    state = RunState()
    for event in [
        {"type": "run_started", "run": 1, "config": {}},
        {"type": "node_created", "id": "1", "parent": None, "kind": "baseline", "phase": -1},
        {"type": "node_created", "id": "1.1", "parent": "1", "kind": "idea", "phase": 0},
        {"type": "node_pruned", "id": "1.1"},
        {"type": "node_created", "id": "1.1.1", "parent": "1.1", "kind": "improve", "phase": 1},
        {"type": "fork_requested", "id": "1", "hint": "a"},
        {"type": "fork_requested", "id": "1", "hint": "b"},
        {"type": "node_created", "id": "1.2", "parent": "1", "kind": "fork", "phase": 0, "hint": "a"},
    ]:
        state.apply(event)
    assert state.nodes["1.1.1"].pruned
    assert state.pending_forks == [{"id": "1", "hint": "b"}]


def test_a_suspect_node_is_shown_but_never_credited_ranked_or_best(run_events) -> None:
    base = run_events.baseline(100.0)
    run_events.success("1.1", base, 60.0)
    run_events.success("1.2", base, 0.001)
    evaluated = next(e for e in reversed(run_events.events) if e["type"] == "node_evaluated")
    evaluated["suspect"] = "bench run 1 wrote 43 metrics rows where the parent's evaluation wrote 3"
    evaluated["shape"] = {"rows": 43}
    run_events.success("1.1.1", "1.1", 60.0)
    run_events.events[-1]["verdict"] = {"label": "no significant change", "against": "1.1"}
    state = run_events.state()
    forged = state.nodes["1.2"]
    assert forged.status == "done" and forged.ok and not forged.credible
    assert forged.suspect.startswith("bench run 1 wrote 43") and forged.shape == {"rows": 43}
    assert forged.metrics  # the numbers stay on record, for the reader
    assert forged not in state.successful() and forged not in state.ranked()
    assert state.best().id == "1.1"
    assert state.credited(state.nodes["1.1.1"]).id == "1.1"
    assert state.nodes["1.1"].suspect is None and state.nodes["1.1"].credible
    # The search never expands it, and nothing is timed against it.
    from looptree.engine.run.search import choose_parents

    assert "1.2" not in choose_parents(state, 6, 3)
