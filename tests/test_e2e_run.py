"""End to end: the sample project optimized headless through the real CLI, and crash-resume.

These run the real `looptree` command in subprocesses against a copy of
`sample_projects/hotloop` (recorded agent replies, real builds and benchmarks).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_projects" / "hotloop"
FAST = ["bench.repeats=2", "bench.max_repeats=5", "search.num_phases=2"]
# Crash/resume semantics do not depend on the interleaved comparison: keep those runs short.
QUICK = ["bench.repeats=1", "bench.compare=off", "search.num_phases=2"]

pytestmark = pytest.mark.slow


def looptree(*args: str, cwd: Path | None = None, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "looptree.engine.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"looptree {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def events_of(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    dest = tmp_path / "hotloop"
    shutil.copytree(SAMPLE, dest, ignore=shutil.ignore_patterns(".looptree", "__pycache__", "metrics.csv"))
    return dest


def assert_run_consistent(run_dir: Path, project: Path) -> dict:
    events = events_of(run_dir)
    finished = [e for e in events if e["type"] == "run_finished"]
    assert finished, "run never finished"
    assert finished[-1]["reason"] in ("phases done", "early stop"), finished[-1]
    evaluated = Counter(e["id"] for e in events if e["type"] == "node_evaluated")
    assert evaluated and max(evaluated.values()) == 1, f"a node was evaluated twice: {evaluated}"
    tree = json.loads(looptree("tree", str(run_dir), "--json").stdout)
    for node in tree["nodes"]:
        assert node["status"] in ("done", "failed"), node
    # No stale worktree, in git's list or on disk.
    listed = [l for l in git(project, "worktree", "list", "--porcelain").splitlines() if l.startswith("worktree ")]
    assert listed == [f"worktree {project}"], listed
    leftovers = list((run_dir / "worktrees").glob("*")) if (run_dir / "worktrees").exists() else []
    assert leftovers == []
    # The run's metrics.csv has one row per evaluated node.
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,node,")
    assert sorted(r.split(",")[1] for r in rows[1:]) == sorted(evaluated)
    return tree


def test_sample_run_end_to_end(project: Path) -> None:
    looptree("run", str(project), "--no-tui", *FAST)
    run_dir = project / ".looptree" / "runs" / "1"
    tree = assert_run_consistent(run_dir, project)
    nodes = {n["id"]: n for n in tree["nodes"]}
    assert tree["best"] and tree["best"] != "1"
    assert nodes[tree["best"]]["ratio_vs_baseline"] > 1.5
    kinds = Counter(n["kind"] for n in tree["nodes"])
    assert kinds["idea"] == 4 and kinds["fix"] >= 1 and kinds["improve"] >= 1
    failures = {n["failure_stage"] for n in tree["nodes"] if n["status"] == "failed"}
    assert {"build", "edit"} <= failures
    refused = [n for n in tree["nodes"] if n["failure_stage"] == "edit"]
    assert any("read-only" in (n["failure_reason"] or "") for n in refused)
    # Every branch changes writable files only, and the user's checkout is untouched.
    for node in tree["nodes"]:
        if node["branch"] and node["id"] != "1":
            changed = git(project, "diff", "--name-only", "looptree/1", node["branch"]).split()
            assert set(changed) <= {"solver.py"}, (node["id"], changed)
    assert git(project, "branch", "--show-current").strip() in ("", "main", "master")
    # `show` prints the diff and the metrics of the best node.
    shown = looptree("show", str(run_dir), tree["best"]).stdout
    assert "## diff against parent" in shown and "solver.py" in shown and "## metrics" in shown
    # No API key or bearer token anywhere (replay uses none, but the recorder must not invent one).
    assert (run_dir / "llm" / "calls.jsonl").exists()


def _wait_for(run_dir: Path, predicate, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").exists():
            events = events_of(run_dir)
            if predicate(events):
                return events
        time.sleep(0.02)
    raise AssertionError("the run never reached the expected point")


def _job_processes(run_dir: Path) -> list[int]:
    from looptree.engine.evaluation.procs import find_job_pids
    from looptree.engine.run.engine import job_prefix

    return find_job_pids(job_prefix(run_dir), prefix=True)


@pytest.mark.parametrize("kill_point", ["first bench", "mid phase 0", "phase 1"])
def test_kill_9_then_resume_finishes(project: Path, kill_point: str) -> None:
    predicates = {
        "first bench": lambda ev: any(e["type"] == "stage_started" and e.get("stage") == "bench" for e in ev),
        "mid phase 0": lambda ev: sum(e["type"] == "node_evaluated" for e in ev) >= 3
        and any(e["type"] == "stage_started" and e.get("stage") == "bench" and e.get("id") != "1" for e in ev[-3:]),
        "phase 1": lambda ev: any(e["type"] == "phase_started" and e.get("phase") == 1 for e in ev)
        and any(e["type"] == "agent_finished" and e.get("id", "").count(".") >= 2 for e in ev),
    }
    proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui", *QUICK],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    run_dir = project / ".looptree" / "runs" / "1"
    try:
        _wait_for(run_dir, predicates[kill_point])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    events_before = events_of(run_dir)
    assert not any(e["type"] == "run_finished" for e in events_before)
    done_before = {e["id"] for e in events_before if e["type"] == "node_evaluated"}
    replies_before = {e["id"] for e in events_before if e["type"] == "agent_finished"}

    looptree("resume", str(run_dir), "--no-tui")
    tree = assert_run_consistent(run_dir, project)
    events = events_of(run_dir)
    attached = [e for e in events if e["type"] == "engine_attached"]
    assert len(attached) == 1
    # Nothing finished before the crash was redone, and no reply was asked for twice.
    after = events[events.index(attached[0]):]
    assert not ({e["id"] for e in after if e["type"] == "node_evaluated"} & done_before)
    assert not ({e["id"] for e in after if e["type"] == "agent_started"} & replies_before)
    # Orphans of the dead engine are gone.
    assert _job_processes(run_dir) == []
    assert tree["best"] is not None


def test_second_engine_on_same_run_is_refused(project: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui", *QUICK],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    run_dir = project / ".looptree" / "runs" / "1"
    try:
        _wait_for(run_dir, lambda ev: len(ev) >= 2)
        second = looptree("resume", str(run_dir), "--no-tui", check=False)
        assert second.returncode == 2
        assert second.stderr.startswith("looptree: error: run 1 is already driven by pid")
        assert "Traceback" not in second.stderr
        looptree("ctl", str(run_dir), "stop")
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    events = events_of(run_dir)
    assert events[-1]["type"] == "run_finished" and events[-1]["reason"] == "stopped by user"
    assert _job_processes(run_dir) == []
    assert [p for p in psutil.process_iter() if p.pid == proc.pid] == []
