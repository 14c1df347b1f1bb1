"""KernelBench support: discovery, task projects, the bench's verdicts and timings, the summary.

The bench (`looptree.gpu.kernelbench.runner.main`) runs for real on the CPU against the sample problems in
`sample_projects/kernelbench/level1` and the correct, wrong and hacky solutions beside them;
`--warmup-seconds 0` and few trials keep each call well under a second. The CLI is run as users
run it (`python -m looptree.engine.cli kernelbench ...`), and one slow test drives a whole replayed agent
run through the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from looptree.engine.cli import build_parser  # noqa: E402
from looptree.engine.core.config import load_config  # noqa: E402
from looptree.engine.edits.access import AccessPolicy, check_patterns  # noqa: E402
from looptree.engine.errors import ConfigError, LooptreeError  # noqa: E402
from looptree.gpu.kernelbench import runner as kb_bench  # noqa: E402
from looptree.gpu.kernelbench.cli import (  # noqa: E402
    TaskResult,
    absolutize_overrides,
    check_agent,
    result_from_state,
    run_kernelbench,
)
from looptree.gpu.kernelbench.problems import (  # noqa: E402
    METRIC_COLUMNS,
    KernelBenchError,
    fast_p,
    find_solution,
    list_problems,
    make_task_project,
    parse_tasks,
)

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "sample_projects" / "kernelbench"
LEVEL1 = DATASET / "level1"
SOLUTIONS = LEVEL1 / "solutions"
HACKS = SOLUTIONS / "hacks"
CASSETTE = DATASET / "cassette.jsonl"
QUICK = ["--no-compile", "--warmup-seconds", "0", "--trials", "3", "--seeds", "3"]


def bench(problem: Path, solution: Path | None, tmp_path: Path, *extra: str) -> tuple[int, dict, Path]:
    """Run the bench in this process; returns (exit status, its JSON result, the metrics path)."""
    metrics = tmp_path / "metrics.csv"
    out = tmp_path / "result.json"
    argv = ["--problem", str(problem), "--metrics", str(metrics), "--json", str(out), *QUICK, *extra]
    if "--launcher" in argv:
        argv.remove("--launcher")
    else:
        argv.append("--in-process")  # one torch import per test; the launcher has tests of its own
    if solution is not None:
        argv += ["--solution", str(solution)]
    rc = kb_bench.main(argv)
    return rc, json.loads(out.read_text()), metrics


def looptree(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "looptree.engine.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})


# --------------------------------------------------------------------------- discovery


def test_list_problems_selects_the_range_in_number_order() -> None:
    problems = list_problems(DATASET, "1", "1-3")
    assert [p.number for p in problems] == [1, 2, 3]
    assert [p.stem for p in problems] == ["1_Matmul_ReLU", "2_Softmax", "3_LayerNorm"]
    assert all(p.path.is_file() and p.level == "1" for p in problems)
    assert [p.number for p in list_problems(DATASET, "level1", "2,4-5")] == [2, 4, 5]
    assert [p.number for p in list_problems(DATASET, 1, "5")] == [5]
    assert [p.number for p in list_problems(DATASET, "1", "4-99")] == [4, 5]  # gaps are skipped


@pytest.mark.parametrize("layout", ["level_2", "2"])
def test_other_level_layouts_are_accepted(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / layout
    folder.mkdir()
    shutil.copy(LEVEL1 / "2_Softmax.py", folder / "7_Softmax.py")
    (folder / "notes.txt").write_text("not a problem")
    assert [p.stem for p in list_problems(tmp_path, "2", "1-10")] == ["7_Softmax"]


def test_discovery_errors_are_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(KernelBenchError, match="no such directory"):
        list_problems(tmp_path / "missing", "1", "1-3")
    with pytest.raises(KernelBenchError, match=r"has no level 9 \(looked for .*level9.*level_9"):
        list_problems(DATASET, "9", "1-3")
    with pytest.raises(KernelBenchError, match=r"no problem in that range .* numbered 1-5"):
        list_problems(DATASET, "1", "7-9")
    with pytest.raises(KernelBenchError, match="A must not exceed B"):
        parse_tasks("5-1")
    with pytest.raises(KernelBenchError, match="not a task number or a range"):
        parse_tasks("a-b")
    (tmp_path / "level1").mkdir()
    with pytest.raises(KernelBenchError, match="holds no problem files"):
        list_problems(tmp_path, "1", "1-3")
    shutil.copy(LEVEL1 / "2_Softmax.py", tmp_path / "level1" / "2_A.py")
    shutil.copy(LEVEL1 / "2_Softmax.py", tmp_path / "level1" / "2_B.py")
    with pytest.raises(KernelBenchError, match="two problems numbered 2"):
        list_problems(tmp_path, "1", "1-3")


def test_find_solution(tmp_path: Path) -> None:
    assert find_solution(SOLUTIONS, 1) == (SOLUTIONS / "1_Matmul_ReLU.py").resolve()
    assert find_solution(SOLUTIONS, 42) is None
    (tmp_path / "1_a.py").write_text("")
    (tmp_path / "1_b.py").write_text("")
    with pytest.raises(KernelBenchError, match="2 files for task 1"):
        find_solution(tmp_path, 1)


def test_fast_p_counts_correct_and_faster_over_every_task() -> None:
    rows = [
        {"correct": True, "speedup_vs_eager": 2.5},
        {"correct": True, "speedup_vs_eager": 1.2},
        {"correct": True, "speedup_vs_eager": 0.8},
        {"correct": False, "speedup_vs_eager": None},  # incorrect (or never measured) counts against
    ]
    assert fast_p(rows) == {"0": 0.75, "1": 0.5, "1.5": 0.25, "2": 0.25}
    assert fast_p([]) == {"0": 0.0, "1": 0.0, "1.5": 0.0, "2": 0.0}


# --------------------------------------------------------------------------- task projects


def test_make_task_project_writes_a_valid_locked_down_project(tmp_path: Path) -> None:
    problem = list_problems(DATASET, "1", "4")[0]
    project = make_task_project(problem, tmp_path / problem.stem)
    for name in ("problem.py", "solution.py", "bench.py", "looptree.toml", ".gitignore"):
        assert (project / name).is_file(), name
    assert (project / "problem.py").read_text() == problem.path.read_text()
    assert not (project / "problem.py").stat().st_mode & stat.S_IWUSR
    assert not (project / "bench.py").stat().st_mode & stat.S_IWUSR
    assert (project / "solution.py").stat().st_mode & stat.S_IWUSR
    assert "class ModelNew(Model)" in (project / "solution.py").read_text()

    config = load_config(project)
    check_patterns(config, project)  # the writable pattern matches a file
    assert config.project.writable == ["solution.py"]
    assert set(config.project.readonly) == {"problem.py", "bench.py"}
    assert "Write ModelNew in solution.py" in config.project.goal
    assert "bench.py" in config.bench.command and "py_compile solution.py" in config.build.command
    policy = AccessPolicy(config.project.writable, config.project.readonly, config.project.hidden)
    assert policy.classify("solution.py") == "writable"
    assert policy.classify("problem.py") == "readonly"
    assert policy.classify("bench.py") == "readonly"

    # Its own repository, even inside another one (tmp_path is not one, so check the top level).
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=project, capture_output=True, text=True)
    assert Path(top.stdout.strip()).resolve() == project

    # The same problem again reuses the directory; a different one is refused, not overwritten.
    (project / "solution.py").write_text("# my edits\n")
    assert make_task_project(problem, project) == project
    assert (project / "solution.py").read_text() == "# my edits\n"
    other = list_problems(DATASET, "1", "5")[0]
    with pytest.raises(KernelBenchError, match="already holds a different problem.py"):
        make_task_project(other, project)


def test_projects_inside_another_repository_get_their_own(tmp_path: Path, git_repo: Path) -> None:
    """`--out` inside the user's checkout must not make every task share (and clobber) its branches."""
    problems = list_problems(DATASET, "1", "1-2")
    projects = [make_task_project(p, git_repo / "kb" / p.stem) for p in problems]
    for project in projects:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=project, capture_output=True, text=True)
        assert Path(top.stdout.strip()).resolve() == project


def test_make_task_project_refuses_a_file_that_is_not_a_problem(tmp_path: Path) -> None:
    bad = tmp_path / "level1" / "1_Bad.py"
    bad.parent.mkdir()
    bad.write_text("import torch\nclass Model: pass\ndef get_inputs(): return []\n")
    with pytest.raises(KernelBenchError, match="defines no get_init_inputs"):
        make_task_project(bad, tmp_path / "out")
    bad.write_text("def broken(:\n")
    with pytest.raises(KernelBenchError, match="does not parse"):
        make_task_project(bad, tmp_path / "out")


def test_the_generated_bench_runs_the_starting_solution(tmp_path: Path) -> None:
    """bench.py as the engine runs it: the initial ModelNew is the reference, so it is correct."""
    problem = list_problems(DATASET, "1", "3")[0]
    project = make_task_project(problem, tmp_path / problem.stem)
    proc = subprocess.run([sys.executable, "bench.py", *QUICK], cwd=project, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "LOOPTREE_METRICS": str(tmp_path / "m.csv")})
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].split(",") == ["iteration", *METRIC_COLUMNS]
    assert len(lines) == 2


# --------------------------------------------------------------------------- the bench


def test_correct_solution_writes_metrics_with_speedups(tmp_path: Path) -> None:
    rc, result, metrics = bench(LEVEL1 / "4_Conv1dGELU.py", SOLUTIONS / "4_Conv1dGELU.py", tmp_path)
    assert rc == 0, result["reason"]
    assert result["ok"] and result["correct"] and result["device"] == "cpu"
    assert result["seeds_checked"] == kb_bench.kernelbench_trial_seeds(3)  # KernelBench's, drawn from seed 42
    assert result["suspect"] is False and result["atol"] == result["rtol"] == 1e-4
    header, row = [line.split(",") for line in metrics.read_text().splitlines()]
    assert header == ["iteration", *METRIC_COLUMNS]
    values = dict(zip(header, map(float, row)))
    runtime, eager, compiled = values[METRIC_COLUMNS[2]], values[METRIC_COLUMNS[3]], values[METRIC_COLUMNS[4]]
    assert runtime > 0 and eager > 0
    assert values[METRIC_COLUMNS[0]] == pytest.approx(eager / runtime)
    assert values[METRIC_COLUMNS[1]] == pytest.approx(compiled / runtime)
    assert compiled == eager and "--no-compile" in result["compile_note"]  # no compile: eager stands in


def test_a_rerun_replaces_the_metrics_file(tmp_path: Path) -> None:
    bench(LEVEL1 / "5_SumReduce.py", None, tmp_path)  # reference only: two columns
    rc, _, metrics = bench(LEVEL1 / "5_SumReduce.py", SOLUTIONS / "5_SumReduce.py", tmp_path)
    assert rc == 0
    assert metrics.read_text().splitlines()[0].split(",") == ["iteration", *METRIC_COLUMNS]


def test_reference_only_times_the_baselines(tmp_path: Path) -> None:
    rc, result, metrics = bench(LEVEL1 / "2_Softmax.py", None, tmp_path)
    assert rc == 0
    assert result["correct"] is None and result["runtime_ms"] is None
    assert result["eager_ms"] > 0 and result["compile_ms"] == result["eager_ms"]
    assert metrics.read_text().splitlines()[0] == "iteration,eager_ms (lower is better),compile_ms (lower is better)"


@pytest.mark.parametrize(
    ("problem", "solution", "reason"),
    [
        ("1_Matmul_ReLU.py", HACKS / "1_wrong.py", "values differ beyond atol=0.0001"),
        ("1_Matmul_ReLU.py", HACKS / "1_cache_outputs.py", "same output for different inputs"),
        ("1_Matmul_ReLU.py", HACKS / "1_zeros.py", "output is all zeros"),
        ("1_Matmul_ReLU.py", HACKS / "1_cache_by_identity.py", "stale result"),
        ("1_Matmul_ReLU.py", HACKS / "1_crash.py", "candidate raised RuntimeError"),
        ("1_Matmul_ReLU.py", HACKS / "1_no_modelnew.py", "defines no ModelNew"),
        ("2_Softmax.py", HACKS / "2_returns_input.py", "input"),
        ("3_LayerNorm.py", SOLUTIONS / "3_LayerNorm.py", "values differ"),
    ],
    ids=lambda v: v.stem if isinstance(v, Path) else None,
)
def test_incorrect_or_hacky_solutions_fail_with_the_guard_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str, solution: Path, reason: str
) -> None:
    rc, result, metrics = bench(LEVEL1 / problem, solution, tmp_path)
    assert rc == kb_bench.EXIT_CANDIDATE
    assert result["correct"] is False and not result["ok"]
    assert reason in result["reason"]
    assert not metrics.exists(), "an incorrect candidate must not leave a metrics row"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"kb_bench: {result['reason']}"  # the line looptree shows as the failure reason


def test_patching_torch_at_import_is_caught(tmp_path: Path) -> None:
    """Run in a subprocess: the hack patches torch for the whole process."""
    proc = subprocess.run([sys.executable, "-m", "looptree.gpu.kernelbench.runner", "--problem", str(LEVEL1 / "1_Matmul_ReLU.py"),
                           "--solution", str(HACKS / "1_patch_torch.py"), *QUICK],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == kb_bench.EXIT_CANDIDATE
    last = proc.stderr.strip().splitlines()[-1]
    assert "suspect: solution.py tampered with the process: torch.relu changed" in last


OOM_PROBLEM = '''import torch
import torch.nn as nn

class Model(nn.Module):
    def forward(self, x):
        return x * 2

def get_inputs():
    {body}

def get_init_inputs():
    return []
'''


@pytest.mark.parametrize(
    "body",
    [
        "raise MemoryError()",
        'raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB (GPU 0; 79.10 GiB total capacity)")',
    ],
    ids=["MemoryError", "cuda-oom-RuntimeError"],
)
def test_a_problem_too_large_for_the_machine_is_reported_as_out_of_memory(tmp_path: Path, body: str) -> None:
    problem = tmp_path / "1_Huge.py"
    problem.write_text(OOM_PROBLEM.format(body=body))
    rc, result, metrics = bench(problem, SOLUTIONS / "5_SumReduce.py", tmp_path)
    assert rc == kb_bench.EXIT_OOM
    assert result["oom"] is True
    assert result["reason"].startswith("out of memory while making the reference's inputs")
    assert "do not fit this machine" in result["reason"]
    assert not metrics.exists()


def test_a_candidate_that_runs_out_of_memory_is_the_candidates_failure(tmp_path: Path) -> None:
    solution = tmp_path / "greedy.py"
    solution.write_text("import torch.nn as nn\nclass ModelNew(nn.Module):\n    def forward(self, x):\n"
                        "        raise RuntimeError('CUDA out of memory. Tried to allocate 1.00 TiB')\n")
    rc, result, _ = bench(LEVEL1 / "2_Softmax.py", solution, tmp_path)
    assert rc == kb_bench.EXIT_CANDIDATE
    assert result["oom"] is True and result["correct"] is False
    assert result["reason"].startswith("candidate ran out of memory")


# --------------------------------------------------------------------------- the command


def test_eval_only_through_the_real_cli(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = looptree("kernelbench", "--dataset", str(DATASET), "--level", "1", "--tasks", "1-2", "--eval-only",
                    "--out", str(out), f"bench.command={sys.executable} bench.py {' '.join(QUICK)}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "KernelBench level 1, tasks 1-2 (eval-only, cpu)" in proc.stdout
    assert "fast_p vs eager:   n/a" in proc.stdout  # no candidate was judged
    summary = json.loads((out / "summary.json").read_text())
    assert [r["task"] for r in summary["results"]] == ["1_Matmul_ReLU", "2_Softmax"]
    assert all(r["eager_ms"] > 0 and r["correct"] is None and not r["error"] for r in summary["results"])
    assert summary["fast_p"] is None
    assert (out / "summary.csv").read_text().splitlines()[0].startswith("task,correct,runtime_ms")
    assert (out / "2_Softmax" / "looptree.toml").is_file()


def _args(*argv: str, solutions: Path | None = None):
    """The real parser's namespace (plus --solutions until looptree.engine.cli declares it)."""
    args = build_parser().parse_args(["kernelbench", *argv])
    if solutions is not None:
        args.solutions = str(solutions)
    return args


def test_eval_only_with_solutions_reports_correctness_and_fast_p(tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs"
    args = _args("--dataset", str(DATASET), "--level", "1", "--tasks", "1-3", "--eval-only", "--out", str(out),
                 f"bench.command={sys.executable} bench.py {' '.join(QUICK)}", solutions=SOLUTIONS)
    assert run_kernelbench(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    by_task = {r["task"]: r for r in summary["results"]}
    assert by_task["1_Matmul_ReLU"]["correct"] and by_task["2_Softmax"]["correct"]
    assert by_task["3_LayerNorm"]["correct"] is False and "values differ" in by_task["3_LayerNorm"]["reason"]
    for task in ("1_Matmul_ReLU", "2_Softmax"):
        r = by_task[task]
        assert r["speedup_vs_eager"] == pytest.approx(r["eager_ms"] / r["runtime_ms"])
    fp = summary["fast_p"]
    assert fp["0"] == pytest.approx(2 / 3)
    assert fp["0"] >= fp["1"] >= fp["1.5"] >= fp["2"]
    expected_fast_1 = sum(1 for r in by_task.values() if r["correct"] and r["speedup_vs_eager"] > 1) / 3
    assert fp["1"] == pytest.approx(expected_fast_1)
    assert "fast_0 = 0.67 (2/3)" in printed
    assert summary["counts"] == {"tasks": 3, "correct": 2, "incorrect": 1, "not_measured": 0, "oom": 0, "suspect": 0}
    assert all(r["suspect"] is False for r in summary["results"])


def test_eval_only_marks_a_task_that_does_not_fit_and_exits_non_zero(tmp_path: Path, capsys) -> None:
    dataset = tmp_path / "data"
    (dataset / "level1").mkdir(parents=True)
    shutil.copy(LEVEL1 / "5_SumReduce.py", dataset / "level1" / "1_SumReduce.py")
    (dataset / "level1" / "2_Huge.py").write_text(
        OOM_PROBLEM.format(body='raise RuntimeError("CUDA out of memory. Tried to allocate 512.00 GiB")'))
    args = _args("--dataset", str(dataset), "--level", "1", "--tasks", "1-2", "--eval-only",
                 "--out", str(tmp_path / "runs"), f"bench.command={sys.executable} bench.py {' '.join(QUICK)}")
    assert run_kernelbench(args) == 1
    captured = capsys.readouterr()
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    ok, huge = summary["results"]
    assert not ok["error"] and ok["eager_ms"] > 0
    assert huge["error"] and huge["oom"] and "out of memory" in huge["reason"]
    assert "OOM" in captured.out
    assert "1 of 2 task(s) could not be measured (2_Huge: out of memory" in captured.err


def test_bad_arguments_fail_before_any_work(tmp_path: Path) -> None:
    proc = looptree("kernelbench", "--dataset", str(DATASET), "--level", "1", "--tasks", "8-9", "--eval-only",
                    "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("looptree: error: --tasks 8-9: no problem in that range")
    assert not (tmp_path / "runs").exists()
    proc = looptree("kernelbench", "--dataset", str(DATASET), "--level", "1", "--tasks", "1", "--eval-only",
                    "--out", str(tmp_path / "runs"), "search.num_samples=many", cwd=tmp_path)
    assert proc.returncode == 2 and "search.num_samples" in proc.stderr


def test_agent_runs_need_an_agent(tmp_path: Path) -> None:
    problem = list_problems(DATASET, "1", "1")[0]
    project = make_task_project(problem, tmp_path / problem.stem)
    with pytest.raises(ConfigError, match="kernelbench needs an agent"):
        check_agent(load_config(project), project)
    check_agent(load_config(project, None, [f"agent.cassette={CASSETTE}"]), project)  # a cassette is an agent


def test_a_relative_cassette_is_taken_from_where_the_user_stands(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(DATASET)
    assert absolutize_overrides(["agent.cassette=cassette.jsonl", "search.num_samples=2"]) == [
        f"agent.cassette={CASSETTE}", "search.num_samples=2"]


def test_result_from_state_reports_the_best_node_beyond_the_baseline(make_events) -> None:
    ev = make_events(columns=METRIC_COLUMNS)
    ev.baseline(1.0, 0.8, 2.0, 2.0, 1.6)
    ev.success("1.1", "1", 1.6, 1.3, 1.25, 2.0, 1.6)
    ev.failure("1.2", "1", stage="bench", reason="kb_bench: incorrect: output is all zeros")
    ev.success("1.3", "1", 1.2, 1.0, 1.6, 2.0, 1.6)
    r = result_from_state(TaskResult("1_X", 1, "/p"), ev.state(), "phases done")
    assert (r.correct, r.best_node, r.error) == (True, "1.1", False)
    assert (r.speedup_vs_eager, r.speedup_vs_compile, r.runtime_ms) == (1.6, 1.3, 1.25)

    only_failures = make_events(columns=METRIC_COLUMNS)
    only_failures.baseline(1.0, 0.8, 2.0, 2.0, 1.6)
    only_failures.failure("1.1", "1", stage="bench", reason="kb_bench: incorrect: stale result")
    r = result_from_state(TaskResult("1_X", 1, "/p"), only_failures.state(), "phases done")
    assert r.correct is False and not r.error and r.eager_ms == 2.0
    assert "no ModelNew beyond the baseline passed (1 tried)" in r.reason and "stale result" in r.reason

    base_oom = make_events(columns=METRIC_COLUMNS)
    base_oom.created("1", None, kind="baseline", phase=-1)
    base_oom.emit("node_failed", id="1", stage="bench", reason="kb_bench: out of memory while running the reference")
    r = result_from_state(TaskResult("1_X", 1, "/p"), base_oom.state(), "error: the baseline failed")
    assert r.error and r.oom and r.correct is False


def test_solutions_without_eval_only_is_refused(tmp_path: Path) -> None:
    args = _args("--dataset", str(DATASET), "--level", "1", "--tasks", "1", "--out", str(tmp_path),
                 solutions=SOLUTIONS)
    with pytest.raises(LooptreeError, match="--solutions goes with --eval-only"):
        run_kernelbench(args)


@pytest.mark.slow
def test_replayed_agent_run_end_to_end(tmp_path: Path) -> None:
    """A whole agent run on problem 1 through the engine, with recorded replies: one good change,
    one that returns zeros (the bench fails it with the guard's reason), and its fix."""
    out = tmp_path / "runs"
    proc = looptree("kernelbench", "--dataset", str(DATASET), "--level", "1", "--tasks", "1", "--out", str(out),
                    "--no-tui", f"agent.cassette={CASSETTE}", "search.num_samples=2", "search.num_phases=1",
                    "search.max_fix_attempts=1", f"bench.command={sys.executable} bench.py {' '.join(QUICK)}",
                    cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    (result,) = summary["results"]
    assert result["correct"] is True and result["best_node"] in ("1.1", "1.2.1")
    assert result["runtime_ms"] > 0 and result["speedup_vs_eager"] > 0
    assert summary["fast_p"]["0"] == 1.0
    events = [json.loads(line) for line in Path(result["run_dir"], "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["type"] == "node_failed"]
    assert [e["id"] for e in failed] == ["1.2"]
    assert "output is all zeros" in failed[0]["reason"]
    evaluated = {e["id"] for e in events if e["type"] == "node_evaluated"}
    assert evaluated == {"1", "1.1", "1.2.1"}
    project = out / "1_Matmul_ReLU"
    branch = subprocess.run(["git", "show", "looptree/1.1:solution.py"], cwd=project, capture_output=True,
                            text=True, check=True).stdout
    assert "clamp_min_" in branch
    assert "class ModelNew(Model)" in (project / "solution.py").read_text()  # the working tree is untouched
