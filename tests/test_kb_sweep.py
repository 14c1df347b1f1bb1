"""`looptree kernelbench --eval-only` sweeps: partial results survive Ctrl-C, progress is printed
per task and stage, suspect tasks are shown but never counted in fast_p, and the KernelBench
protocol report carries upstream's thresholds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from looptree.gpu.kernelbench.cli import TaskResult, build_summary, render_summary
from looptree.gpu.kernelbench.problems import fast_p
from looptree.gpu.kernelbench.runner import KB_COMMIT

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "sample_projects" / "kernelbench"
QUICK = "--no-compile --warmup-seconds 0 --trials 3 --seeds 2"


def test_a_suspect_task_never_counts_in_fast_p(tmp_path: Path) -> None:
    rows = [TaskResult("1_a", 1, "p", correct=True, runtime_ms=1.0, speedup_vs_eager=3.0),
            TaskResult("2_b", 2, "p", correct=True, suspect=True, runtime_ms=0.01, speedup_vs_eager=437.0,
                       reason="suspect: the launcher's clock saw …")]
    summary = build_summary(rows, dataset="d", level="1", tasks="1-2", mode="eval-only", out=tmp_path)
    assert summary["fast_p"] == {"0": 0.5, "1": 0.5, "1.5": 0.5, "2": 0.5}
    assert summary["counts"]["suspect"] == 1
    assert summary["results"][1]["suspect"] is True and summary["results"][1]["correct"] is True
    assert fast_p([{"correct": True, "suspect": True, "speedup_vs_eager": 9.0}], ps=(0.0, 1.0)) == {"0": 0.0, "1": 0.0}
    printed = render_summary(summary, rows)
    assert "SUSPECT" in printed and "not counted in fast_p" in printed


def test_the_kernelbench_protocol_report_uses_upstreams_thresholds(tmp_path: Path) -> None:
    rows = [TaskResult("1_a", 1, "p", correct=True, runtime_ms=1.0, speedup_vs_eager=4.0),
            TaskResult("2_b", 2, "p", correct=True, runtime_ms=1.0, speedup_vs_eager=0.6),
            TaskResult("3_c", 3, "p", correct=False)]
    summary = build_summary(rows, dataset="d", level="1", tasks="1-3", mode="eval-only", out=tmp_path,
                            protocol="kernelbench")
    assert list(summary["fast_p"]) == ["0", "0.5", "0.8", "1", "1.5", "2"]
    assert summary["fast_p"]["0.5"] == pytest.approx(2 / 3) and summary["fast_p"]["0.8"] == pytest.approx(1 / 3)
    assert summary["geomean_speedup_correct"] == pytest.approx((4.0 * 0.6) ** 0.5)
    assert summary["protocol"] == "kernelbench" and summary["kernelbench_commit"] == KB_COMMIT
    assert "fast_0.8 = 0.33 (1/3)" in render_summary(summary, rows)


@pytest.mark.slow
def test_ctrl_c_writes_the_finished_tasks_first(tmp_path: Path) -> None:
    """Task 2's bench sleeps; SIGINT then: summary.json and .csv hold task 1, and say where it stopped."""
    data = tmp_path / "data" / "level1"
    data.mkdir(parents=True)
    shutil.copy(DATASET / "level1" / "1_Matmul_ReLU.py", data / "1_Matmul_ReLU.py")
    (data / "2_Slow.py").write_text(
        "import time\nimport torch\nimport torch.nn as nn\n\nclass Model(nn.Module):\n    def forward(self, x):\n"
        "        return x * 2\n\ndef get_inputs():\n    time.sleep(60)\n    return [torch.randn(4)]\n\n"
        "def get_init_inputs():\n    return []\n")
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "kernelbench", "--dataset", str(tmp_path / "data"),
                             "--level", "1", "--tasks", "1-2", "--eval-only", "--out", str(out),
                             f"bench.command={sys.executable} bench.py {QUICK}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "LOOPTREE_LOCK_DIR": str(tmp_path / "locks")},
                            start_new_session=True)
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "2_Slow: [" in line and "making the reference's inputs" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    _, err = proc.communicate(timeout=60)
    text = "".join(seen) + err
    assert "1_Matmul_ReLU: [" in text and "] timing the eager reference" in text  # a line per task and stage
    assert proc.returncode == 130, text[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["task"] for r in summary["results"]] == ["1_Matmul_ReLU"]
    assert summary["interrupted"] == {"task": "2_Slow", "finished": 1, "of": 2}
    assert (out / "summary.csv").read_text().count("\n") == 2
    assert "interrupted during 2_Slow" in err


@pytest.mark.slow
def test_eval_only_shows_a_suspect_solution_and_never_counts_it(tmp_path: Path) -> None:
    sols = tmp_path / "sols"
    sols.mkdir()
    shutil.copy(DATASET / "level1" / "solutions" / "hacks" / "1_slow_clock.py", sols / "1_slow_clock.py")
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "looptree.engine.cli", "kernelbench", "--dataset", str(DATASET),
                           "--level", "1", "--tasks", "1", "--eval-only", "--solutions", str(sols), "--out", str(out),
                           f"bench.command={sys.executable} bench.py {QUICK}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LOOPTREE_LOCK_DIR": str(tmp_path / "locks")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["results"]
    assert row["correct"] is True and row["suspect"] is True and "time.perf_counter" in row["reason"]
    assert summary["fast_p"]["0"] == 0.0 and summary["counts"]["suspect"] == 1
    assert "SUSPECT" in proc.stdout
