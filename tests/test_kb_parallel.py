"""Parallel `looptree kernelbench` sweeps: one task per slot (device) at a time, one ordered summary.

The slot plan is checked on a fake two-GPU telemetry backend (it says it is fake); the overlap is
checked with real CPU benches of the sample problems: with ``bench.concurrency = 2`` the second
task's bench stages are printed before the first task ends, with 1 they never are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from looptree.engine.core.config import load_config
from looptree.gpu.kernelbench.cli import plan_slots
from looptree.gpu.kernelbench.problems import list_problems, make_task_project

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "sample_projects" / "kernelbench"
QUICK = "--no-compile --warmup-seconds 0 --trials 3 --seeds 2"


def _config(tmp_path: Path, *overrides: str):
    problem = list_problems(DATASET, "1", "1")[0]
    return load_config(make_task_project(problem, tmp_path / problem.stem), None, list(overrides))


def test_slots_are_one_per_gpu_or_bench_concurrency_on_cpu(tmp_path: Path) -> None:
    assert [s.label for s in plan_slots(_config(tmp_path, "bench.device=cpu"), eval_only=True)] == ["cpu"]
    cpu3 = plan_slots(_config(tmp_path, "bench.device=cpu", "bench.concurrency=3"), eval_only=False)
    assert [s.label for s in cpu3] == ["cpu#1", "cpu#2", "cpu#3"] and all(not s.overrides for s in cpu3)
    gpus = plan_slots(_config(tmp_path, "gpu.telemetry=fake"), eval_only=True)  # FakeBackend: two fake GPUs
    assert [s.label for s in gpus] == ["cuda:0", "cuda:1"]
    assert [s.overrides for s in gpus] == [("gpu.devices=[0]",), ("gpu.devices=[1]",)]
    one = plan_slots(_config(tmp_path, "gpu.telemetry=fake", "gpu.devices=[1]"), eval_only=True)
    assert [s.label for s in one] == ["cuda:1"]


def _sweep(tmp_path: Path, concurrency: int) -> tuple[str, dict]:
    out = tmp_path / f"runs{concurrency}"
    proc = subprocess.run([sys.executable, "-m", "looptree.engine.cli", "kernelbench", "--dataset", str(DATASET),
                           "--level", "1", "--tasks", "1-3", "--eval-only", "--out", str(out),
                           f"bench.command={sys.executable} bench.py {QUICK}", "bench.device=cpu",
                           f"bench.concurrency={concurrency}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LOOPTREE_LOCK_DIR": str(tmp_path / "locks")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["task"] for r in summary["results"]] == ["1_Matmul_ReLU", "2_Softmax", "3_LayerNorm"]
    assert (out / "summary.csv").read_text().splitlines()[1].startswith("1_Matmul_ReLU,")
    assert all(r["eager_ms"] for r in summary["results"])
    return proc.stderr, summary


def _first(text: str, needle: str) -> int:
    at = text.find(needle)
    assert at >= 0, f"{needle!r} not in:\n{text[-3000:]}"
    return at


@pytest.mark.slow
def test_concurrency_two_overlaps_tasks_and_keeps_one_ordered_summary(tmp_path: Path) -> None:
    err, _ = _sweep(tmp_path, 2)
    first_done = _first(err, "== 1_Matmul_ReLU (cpu#")
    assert _first(err, "== [2/3] 2_Softmax on cpu#2") < first_done  # started while task 1 ran, on its own slot
    assert _first(err, "   2_Softmax: [") < first_done  # and its bench reached a stage before task 1 ended
    assert "2 task(s) at a time (cpu#1, cpu#2)" in err


@pytest.mark.slow
def test_concurrency_one_never_overlaps(tmp_path: Path) -> None:
    err, _ = _sweep(tmp_path, 1)
    assert _first(err, "== 1_Matmul_ReLU (cpu): ") < _first(err, "== [2/3] 2_Softmax on cpu")
    assert _first(err, "== 2_Softmax (cpu): ") < _first(err, "== [3/3] 3_LayerNorm on cpu")
    assert _first(err, "== 1_Matmul_ReLU (cpu): ") < _first(err, "   2_Softmax: [")


def _spans(run_dir: str) -> tuple[float, float]:
    """First stage start and last stage end of a run, from its event log's timestamps."""
    events = [json.loads(line) for line in Path(run_dir, "events.jsonl").read_text().splitlines() if line.strip()]
    starts = [e["ts"] for e in events if e["type"] == "stage_started"]
    ends = [e["ts"] for e in events if e["type"] == "stage_finished"]
    assert starts and ends
    return min(starts), max(ends)


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 2])
def test_agent_runs_overlap_only_with_concurrency(tmp_path: Path, concurrency: int) -> None:
    """Two replayed agent runs (the cassette is problem 1's; on problem 2 its edits fail, a result)."""
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "looptree.engine.cli", "kernelbench", "--dataset", str(DATASET),
                           "--level", "1", "--tasks", "1-2", "--out", str(out), "--no-tui",
                           f"agent.cassette={DATASET / 'cassette.jsonl'}", "search.num_samples=1",
                           "search.num_phases=1", "search.max_fix_attempts=0", "bench.device=cpu",
                           f"bench.concurrency={concurrency}", f"bench.command={sys.executable} bench.py {QUICK}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LOOPTREE_LOCK_DIR": str(tmp_path / "locks")})
    summary = json.loads((out / "summary.json").read_text())
    assert [r["task"] for r in summary["results"]] == ["1_Matmul_ReLU", "2_Softmax"], proc.stderr[-3000:]
    (start1, end1), (start2, end2) = (_spans(r["run_dir"]) for r in summary["results"])
    if concurrency == 2:
        assert start2 < end1 and start1 < end2, (start1, end1, start2, end2)  # the two runs' stages overlap
    else:
        assert end1 <= start2, (start1, end1, start2, end2)  # one after the other


@pytest.mark.slow
def test_ctrl_c_during_a_parallel_sweep_writes_the_finished_tasks(tmp_path: Path) -> None:
    """Tasks 1 and 2 run at once; task 2 sleeps in its inputs; SIGINT once task 1 is done."""
    import shutil
    import signal
    import time

    data = tmp_path / "data" / "level1"
    data.mkdir(parents=True)
    shutil.copy(DATASET / "level1" / "1_Matmul_ReLU.py", data / "1_Matmul_ReLU.py")
    (data / "2_Slow.py").write_text(
        "import time\nimport torch\nimport torch.nn as nn\n\nclass Model(nn.Module):\n    def forward(self, x):\n"
        "        return x * 2\n\ndef get_inputs():\n    time.sleep(60)\n    return [torch.randn(4)]\n\n"
        "def get_init_inputs():\n    return []\n")
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "kernelbench", "--dataset",
                             str(tmp_path / "data"), "--level", "1", "--tasks", "1-2", "--eval-only", "--out", str(out),
                             f"bench.command={sys.executable} bench.py {QUICK}", "bench.device=cpu",
                             "bench.concurrency=2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "LOOPTREE_LOCK_DIR": str(tmp_path / "locks")},
                            start_new_session=True)
    assert proc.stderr is not None
    seen: list[str] = []
    slow_started = first_done = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (slow_started and first_done):
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        slow_started |= "2_Slow: [" in line and "making the reference's inputs" in line
        first_done |= line.startswith("== 1_Matmul_ReLU (cpu#")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, ("".join(seen) + err)[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["task"] for r in summary["results"]] == ["1_Matmul_ReLU"]
    assert summary["interrupted"] == {"task": "2_Slow", "finished": 1, "of": 2}
