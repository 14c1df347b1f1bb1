"""A suspect node says so everywhere a reader looks: `tree`, `show`, `--json` and the dashboard."""

from __future__ import annotations

from pathlib import Path

from looptree.app.labels import node_label
from looptree.app.model import RunView
from looptree.engine.run.report import node_json, render_show, render_tree

REASON = "bench run 1 wrote 43 metrics rows where the parent's evaluation wrote 3"


def suspect_run(run_events) -> list[dict]:
    base = run_events.baseline(100.0)
    run_events.success("1.1", base, 60.0)
    run_events.success("1.2", base, 0.001)
    next(e for e in reversed(run_events.events) if e["type"] == "node_evaluated")["suspect"] = REASON
    return run_events.events


def test_tree_show_and_json_name_the_suspect_node_and_why(run_events, tmp_path: Path) -> None:
    suspect_run(run_events)
    state = run_events.state()
    tree = render_tree(state)
    line = next(line for line in tree.splitlines() if " 1.2  " in line)
    assert "SUSPECT" in line and "not credited" in line and "43 metrics rows" in line
    assert "*best*" not in line and "best: 1.1" in tree
    shown = render_show(state, tmp_path, "1.2", "")
    assert f"## SUSPECT: metrics not credited\n{REASON}" in shown
    data = node_json(state, state.nodes["1.2"])
    assert data["suspect"] == REASON and data["credited_to"] is None
    assert node_json(state, state.nodes["1.1"])["suspect"] is None


def test_the_dashboard_marks_the_suspect_node_and_never_makes_it_best(run_events) -> None:
    view = RunView()
    view.apply_all(suspect_run(run_events))
    assert view.best_id == "1.1"
    label = node_label(view, view.state.nodes["1.2"], frame=None).plain
    assert label.startswith("⚠ 1.2") and "suspect" in label and "best" not in label
    assert "suspect" not in node_label(view, view.state.nodes["1.1"], frame=None).plain
