"""The evaluator gives every way a candidate can fail a stage and a reason the fix step can read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from looptree.engine.core.config import validate_config
from looptree.engine.evaluation.evaluator import Evaluator
from looptree.engine.evaluation.sequential import nominal_levels

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


# ---------------------------------------------------------------------- hostile metrics files

HUGE_FIELD = (
    "import sys\n"
    "with open('metrics.csv', 'w') as fh:\n"
    "    fh.write('iteration,t (lower is better)\\n1,')\n"
    "    chunk = '7' * (1 << 20)\n"
    "    for _ in range(256):\n"  # a 256 MiB field, no newline
    "        fh.write(chunk)\n"
)


async def test_a_256_mib_field_fails_the_node_not_the_run_and_memory_stays_bounded(tmp_path: Path) -> None:
    """Before: csv raised `field larger than field limit` out of the tick hook and the run died."""
    import tracemalloc

    tracemalloc.start()
    try:
        outcome, emit = await evaluate(tmp_path, HUGE_FIELD, bench={"timeout": 60})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (outcome.ok, outcome.stage) == (False, "metrics")
    assert "metrics field larger than 65536 bytes" in outcome.reason
    assert peak < 16 * 1024 * 1024, f"the engine held {peak / 2**20:.0f} MiB reading the file"
    finished = [f for t, f in emit.events if t == "stage_finished" and f.get("stage") == "bench"]
    assert finished and finished[-1]["ok"] is False


async def test_a_flood_of_rows_fails_the_node_with_a_reason(tmp_path: Path) -> None:
    bench = ("with open('metrics.csv', 'w') as fh:\n"
             "    fh.write('iteration,t (lower is better)\\n')\n"
             "    fh.write(''.join(f'{i},1.0\\n' for i in range(150_000)))\n")
    outcome, _ = await evaluate(tmp_path, bench)
    assert (outcome.ok, outcome.stage) == (False, "metrics")
    assert "more than 100000 rows" in outcome.reason


async def test_a_metrics_path_the_candidate_made_a_directory_fails_the_node(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "metrics.csv").mkdir(parents=True)
    (project / "metrics.csv" / "x").write_text("")
    outcome, _ = await evaluate(tmp_path, GOOD_BENCH)
    assert (outcome.ok, outcome.stage) == (False, "metrics")
    assert "could not remove the old metrics file metrics.csv" in outcome.reason


STREAMING = (
    "import os, time\n"
    "with open('metrics.csv', 'w') as fh:\n"
    "    fh.write('iteration,t (lower is better)\\n')\n"
    "    for i in range(1, 4):\n"
    "        time.sleep(0.3)\n"
    "        fh.write(f'{i},{V}\\n')\n"
    "        fh.flush()\n"
    "{EXTRA}"
)


async def test_rows_carry_engine_arrival_times_and_a_shape_for_children(tmp_path: Path) -> None:
    outcome, emit = await evaluate(tmp_path, STREAMING.replace("{V}", "5.0").replace("{EXTRA}", ""))
    assert outcome.ok and outcome.suspect is None
    assert outcome.shape["rows"] == 3 and outcome.shape["iterations"] == [1, 2, 3]
    assert outcome.shape["restarts"] == 0 and outcome.shape["bench_s"] >= 0.9
    arrived = [f["arrived_s"] for t, f in emit.events if t == "metric_row" and f["repeat"] == 0]
    assert len(arrived) == 3 and arrived == sorted(arrived)
    assert arrived[0] >= 0.25 and arrived[-1] - arrived[0] >= 0.4  # streamed: seen as they were written


async def test_extra_rows_against_the_expected_shape_make_the_outcome_suspect(tmp_path: Path) -> None:
    forged = STREAMING.replace("{V}", "5.0").replace(
        "{EXTRA}", "with open('metrics.csv', 'a') as fh:\n    fh.write(''.join(f'{4 + i},0.001\\n' for i in range(40)))\n")
    expected = {"rows": 3, "iterations": [1, 2, 3], "restarts": 0, "bench_s": 1.0, "timed_s": None}
    project = tmp_path / "proj"
    project.mkdir()
    (project / "bench.py").write_text(forged)
    emit = Recorder()
    outcome = await Evaluator(make_config()).evaluate(
        node_id="1.1", project_dir=project, node_dir=tmp_path / "node", run_dir=tmp_path, job_tag="lt-test3:1.1",
        emit=emit, expected_shape=expected)
    assert outcome.ok and outcome.suspect and "wrote 43 metrics rows" in outcome.suspect
    assert any(t == "message" and "SUSPECT" in f["text"] for t, f in emit.events)
