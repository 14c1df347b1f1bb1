"""The evaluator gives every way a candidate can fail a stage and a reason the fix step can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from looptree.engine.config import validate_config
from looptree.engine.evaluator import Evaluator
from looptree.engine.sequential import nominal_levels

GOOD_BENCH = (
    "import sys\n"
    "open('metrics.csv', 'w').write('iteration,runtime_ms (lower is better),ops (higher is better)\\n1,5.0,10\\n2,7.0,12\\n')\n"
)


def make_config(**sections: Any):
    data = {"project": {"goal": "g", "writable": ["solver.py"]},
            "bench": {"command": "python bench.py", "repeats": 2, "timeout": 5, "compare": "off"}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return validate_config(data)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, **fields: Any) -> None:
        self.events.append((type_, fields))

    def types(self) -> list[str]:
        return [t for t, _ in self.events]


async def evaluate(tmp_path: Path, script: str, **sections: Any):
    project = tmp_path / "proj"
    project.mkdir(exist_ok=True)
    (project / "solver.py").write_text("X = 1\n")
    (project / "bench.py").write_text(script)
    emit = Recorder()
    outcome = await Evaluator(make_config(**sections)).evaluate(
        node_id="1.1", project_dir=project, node_dir=tmp_path / "node", run_dir=tmp_path, job_tag="lt-test:1.1",
        emit=emit)
    return outcome, emit


async def test_success_aggregates_medians_and_streams_rows(tmp_path: Path) -> None:
    outcome, emit = await evaluate(tmp_path, GOOD_BENCH)
    assert outcome.ok
    assert outcome.aggregate.values == {"runtime_ms (lower is better)": 6.0, "ops (higher is better)": 11.0}
    assert [s.higher_is_better for s in outcome.specs] == [False, True]
    assert emit.types().count("metric_row") == 4
    assert (tmp_path / "node" / "bench_metrics.csv").read_text().count("\n") == 5


async def test_build_failure_reason_names_command_and_last_line(tmp_path: Path) -> None:
    outcome, _ = await evaluate(tmp_path, GOOD_BENCH, build={"command": "python -c 'import sys; print(\"boom here\"); sys.exit(3)'"})
    assert not outcome.ok and outcome.stage == "build"
    assert outcome.reason.startswith("build failed with exit status 3 (`python -c")
    assert outcome.reason.endswith(": boom here")
    assert "boom here" in outcome.log_tail


async def test_check_failure(tmp_path: Path) -> None:
    outcome, emit = await evaluate(tmp_path, GOOD_BENCH, check={"command": "echo 'MISMATCH at case 4' >&2; exit 1"})
    assert (outcome.ok, outcome.stage) == (False, "check")
    assert "MISMATCH at case 4" in outcome.reason
    assert "metric_row" not in emit.types()  # the bench never ran


async def test_timeout_kills_and_says_so(tmp_path: Path) -> None:
    outcome, _ = await evaluate(tmp_path, "import time\ntime.sleep(30)\n", bench={"timeout": 0.5})
    assert (outcome.ok, outcome.stage) == (False, "timeout")
    assert outcome.reason == "bench timed out after 0.5 s (`python bench.py`; the whole process tree was killed)"


async def test_crash_by_signal(tmp_path: Path) -> None:
    outcome, _ = await evaluate(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert (outcome.ok, outcome.stage) == (False, "bench")
    assert outcome.reason.startswith("bench crashed with signal 11 (SIGSEGV) (`python bench.py`)")


async def test_missing_metrics_file(tmp_path: Path) -> None:
    outcome, _ = await evaluate(tmp_path, "print('forgot the csv')\n")
    assert (outcome.ok, outcome.stage) == (False, "metrics")
    assert outcome.reason == "bench command did not write metrics.csv"


async def test_header_without_rows(tmp_path: Path) -> None:
    outcome, _ = await evaluate(tmp_path, "open('metrics.csv','w').write('iteration,t (lower is better)\\n')\n")
    assert (outcome.ok, outcome.stage) == (False, "metrics")
    assert "has a header but no rows" in outcome.reason


@pytest.mark.parametrize("cell,words", [("nan", "NaN"), ("abc", "is not a number"), ("inf", "inf")])
async def test_garbled_or_nan_cells(tmp_path: Path, cell: str, words: str) -> None:
    bench = f"open('metrics.csv','w').write('iteration,t (lower is better)\\n1,{cell}\\n')\n"
    outcome, _ = await evaluate(tmp_path, bench)
    assert (outcome.ok, outcome.stage) == (False, "metrics")
    assert words.lower() in outcome.reason.lower()
    assert "row 1" in outcome.reason and "t (lower is better)" in outcome.reason


async def test_interleaved_comparison_calls_a_real_speedup_better(tmp_path: Path) -> None:
    """Parent and candidate alternate; a clear 2x speed-up is 'better' with its interval."""
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "bench.py").write_text("open('metrics.csv','w').write('iteration,t (lower is better)\\n1,10.0\\n')\n")
    project = tmp_path / "cand"
    project.mkdir()
    (project / "bench.py").write_text("open('metrics.csv','w').write('iteration,t (lower is better)\\n1,5.0\\n')\n")
    emit = Recorder()
    config = make_config(bench={"compare": "interleaved", "repeats": 5, "max_repeats": 6})
    outcome = await Evaluator(config).evaluate(node_id="1.1", project_dir=project, node_dir=tmp_path / "node",
                                               run_dir=tmp_path, job_tag="lt-test2:1.1", emit=emit,
                                               reference_dir=parent)
    assert outcome.ok
    assert outcome.verdict["label"] == "better"
    assert outcome.verdict["ratio"] == pytest.approx(0.5)
    # Decided at the first of two looks (5 then 6 pairs), at that look's alpha-spending level,
    # with the interval whose one-sided bounds have that same level.
    first_look = nominal_levels((5, 6), config.bench.alpha)[0]
    assert outcome.verdict["alpha_look"] == pytest.approx(first_look)
    assert outcome.verdict["ci_level"] == pytest.approx(1 - 2 * first_look)
    assert outcome.verdict["ci_high"] < 1.0
    sides = [f["side"] for t, f in emit.events if t == "stage_started" and f.get("stage") == "bench"]
    assert sides[:4] == ["parent", "candidate", "candidate", "parent"]
    assert len(outcome.parent_rows) == len(outcome.rows) == 5
