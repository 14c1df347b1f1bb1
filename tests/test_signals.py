"""Signals named as signals: SIGTERM (a SLURM preemption) is not "stopped by user".

Real `looptree run --no-tui` subprocesses on a copy of the sample project (recorded replies, real
builds and benchmarks): the signal lands while a benchmark runs; the run must end with the
signal's name and the exit status a scheduler expects, and `looptree resume` must finish it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from looptree.engine.run.headless import exit_status_for, stop_reason_for

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_projects" / "hotloop"
QUICK = ["bench.repeats=1", "bench.compare=off", "search.num_phases=2"]


def test_reason_and_status_per_signal() -> None:
    assert stop_reason_for(signal.SIGINT) == "stopped by user"
    assert stop_reason_for(signal.SIGTERM) == "stopped by signal SIGTERM"
    assert exit_status_for(signal.SIGTERM) == 143
    assert exit_status_for(signal.SIGINT) is None and exit_status_for(None) is None


def _events(run_dir: Path) -> list[dict]:
    out = []
    path = run_dir / "events.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _stop_mid_bench(tmp_path: Path, sig: signal.Signals) -> tuple[Path, subprocess.CompletedProcess[str] | None, int, str]:
    project = tmp_path / "hotloop"
    shutil.copytree(SAMPLE, project, ignore=shutil.ignore_patterns(".looptree", "__pycache__", "metrics.csv"))
    log = tmp_path / "engine.err"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui", *QUICK],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    run_dir = project / ".looptree" / "runs" / "1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(e["type"] == "stage_started" and e.get("stage") == "bench" for e in _events(run_dir)):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"the run never reached its first benchmark: {log.read_text()[-2000:]}")
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return run_dir, None, proc.returncode, log.read_text()


@pytest.mark.slow
def test_sigterm_is_named_exits_143_and_the_run_resumes(tmp_path: Path) -> None:
    run_dir, _, status, stderr = _stop_mid_bench(tmp_path, signal.SIGTERM)
    assert status == 143, stderr[-2000:]
    finished = [e for e in _events(run_dir) if e["type"] == "run_finished"]
    assert [e["reason"] for e in finished] == ["stopped by signal SIGTERM"]
    assert "stopping: stopped by signal SIGTERM" in stderr and "stopped by user" not in stderr
    resumed = subprocess.run([sys.executable, "-m", "looptree.engine.cli", "resume", str(run_dir), "--no-tui"],
                             cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = _events(run_dir)
    assert [e["type"] for e in events].count("engine_attached") == 1
    assert events[-1]["type"] == "run_finished" and events[-1]["reason"] in ("phases done", "early stop")
    assert any(e["type"] == "node_evaluated" and e["id"] != "1" for e in events)


@pytest.mark.slow
def test_sigint_stays_stopped_by_user(tmp_path: Path) -> None:
    run_dir, _, status, stderr = _stop_mid_bench(tmp_path, signal.SIGINT)
    assert status == 0, stderr[-2000:]
    finished = [e for e in _events(run_dir) if e["type"] == "run_finished"]
    assert [e["reason"] for e in finished] == ["stopped by user"]
