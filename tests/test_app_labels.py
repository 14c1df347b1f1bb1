"""Tree labels: a node left unfinished by a run that ended reads "interrupted", not a spinner."""

from __future__ import annotations

from looptree.app.labels import header_text, node_label
from looptree.app.model import RunView

EVENTS = [
    {"seq": 0, "ts": 1.0, "type": "run_started", "run": 1, "project": "/p", "config": {}},
    {"seq": 1, "ts": 1.1, "type": "node_created", "id": "1", "parent": None, "phase": -1, "kind": "baseline"},
    {"seq": 2, "ts": 1.2, "type": "node_created", "id": "1.1", "parent": "1", "phase": 0, "kind": "idea"},
    {"seq": 3, "ts": 1.3, "type": "agent_started", "id": "1.1", "role": "optimize"},
]


def test_running_node_spins_while_the_run_lives_and_reads_interrupted_after() -> None:
    view = RunView()
    view.apply_all(EVENTS)
    node = view.state.nodes["1.1"]
    live = node_label(view, node, frame=3).plain
    assert "interrupted" not in live and "agent" in live
    view.apply({"seq": 4, "ts": 2.0, "type": "run_finished", "reason": "stopped by user"})
    done = node_label(view, node, frame=3).plain
    assert done.startswith("◌ 1.1") and "interrupted" in done
    assert "1 interrupted" in header_text(view, now=2.0, engine_alive=False).plain
