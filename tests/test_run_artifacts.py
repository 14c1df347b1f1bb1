"""metrics.csv and the per-node files: views of the log that any CSV reader parses back exactly."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import pandas as pd

from looptree.engine.core.state import RunState
from looptree.engine.run.artifacts import RunArtifacts, analysis_text

# Column names a user's bench may well print: a comma, quotes, a unit in parentheses.
TIME = 'time, "wall" (lower is better)'
SCORE = "score (higher is better)"


def evaluated_state(count: int) -> RunState:
    state = RunState()
    state.apply({"seq": 0, "ts": 1.0, "type": "run_started", "run": 1, "config": {}})
    state.apply({"seq": 1, "ts": 1.0, "type": "node_created", "id": "1", "parent": None, "phase": -1,
                 "kind": "baseline"})
    state.apply({"seq": 2, "ts": 1.0, "type": "node_evaluated", "id": "1", "iteration": 1,
                 "metrics": {TIME: 10.0, SCORE: 0.5}, "spread": {}, "columns": [TIME, SCORE]})
    for i in range(2, count + 1):
        node_id = f"1.{i}"
        state.apply({"seq": 2 * i, "ts": 2.0, "type": "node_created", "id": node_id, "parent": "1", "phase": 0,
                     "kind": "idea"})
        state.apply({"seq": 2 * i + 1, "ts": 2.0, "type": "node_evaluated", "id": node_id, "iteration": i,
                     "metrics": {TIME: 10.0 / i, SCORE: 0.1 * i}, "spread": {}, "columns": [TIME, SCORE]})
    return state


def test_concurrent_rows_make_one_header_and_rows_in_iteration_order(tmp_path: Path) -> None:
    state = evaluated_state(30)
    artifacts = RunArtifacts(tmp_path, state)
    order = sorted(state.nodes, key=lambda n: state.nodes[n].iteration or 0)

    async def append_all() -> None:  # the nodes of a phase finish at once
        await asyncio.gather(*(artifacts.append_metrics_row(node_id) for node_id in order))

    asyncio.run(append_all())
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["iteration", "node", TIME, SCORE]
    assert [r[1] for r in rows[1:]] == order
    assert float(rows[5][2]) == state.nodes[rows[5][1]].metrics[TIME]
    frame = pd.read_csv(tmp_path / "metrics.csv")  # what a user's notebook does with it
    assert list(frame.columns) == ["iteration", "node", TIME, SCORE] and len(frame) == 30


def test_the_rebuilt_csv_equals_the_one_written_row_by_row(tmp_path: Path) -> None:
    state = evaluated_state(5)
    artifacts = RunArtifacts(tmp_path, state)

    async def write_then_rebuild() -> tuple[str, str]:
        for node_id in sorted(state.nodes, key=lambda n: state.nodes[n].iteration or 0):
            await artifacts.append_metrics_row(node_id)
        written = (tmp_path / "metrics.csv").read_text()
        (tmp_path / "metrics.csv").write_text(written.rsplit("\n", 2)[0] + "\n")  # a crash lost the last row
        await artifacts.rewrite_metrics_csv()
        return written, (tmp_path / "metrics.csv").read_text()

    written, rebuilt = asyncio.run(write_then_rebuild())
    assert rebuilt == written and written.count("\n") == 6


def test_the_log_tail_a_fix_agent_sees_is_the_end_of_the_failed_stages_log(tmp_path: Path) -> None:
    (tmp_path / "build.log").write_text("early line\n" + "x" * 10_000 + "\nlast build line\n")
    artifacts = RunArtifacts(tmp_path, RunState())
    tail = asyncio.run(artifacts.read_log_tail(tmp_path, "build", limit=100))
    assert tail.endswith("last build line\n") and "early line" not in tail and len(tail) == 100
    assert asyncio.run(artifacts.read_log_tail(tmp_path, "agent")) == ""  # no log for that stage
    assert asyncio.run(artifacts.read_log_tail(tmp_path, "bench")) == ""  # none written


def test_analysis_compares_with_parent_and_baseline() -> None:
    state = evaluated_state(4)
    text = analysis_text(state, "1.4")
    assert "4x better than parent 1" in text and "time" in text
