"""The executor seam without Ray: the local executor names its worker, and a pair that ran on two
different machines gets no verdict. Real processes, real git, the real Evaluator."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from looptree.engine.cluster.factory import make_executor
from looptree.engine.core.config import validate_config
from looptree.engine.evaluation.evaluator import Evaluator
from looptree.engine.evaluation.executor import (
    LocalExecutor,
    LocalLease,
    worker_identity,
)
from looptree.engine.evaluation.procs import ProcResult, run_command


def git_cmd(cwd: Path, *args: str) -> str:
    """Plain synchronous git for test set-up (the same flags as tests/conftest.py's)."""
    return subprocess.run(["git", "-c", "user.name=tester", "-c", "user.email=t@example.com", "-c",
                           "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout

BENCH = """#!/bin/sh
echo "iteration,time_ms (lower is better)" > "$LOOPTREE_METRICS"
i=0
while [ $i -lt 3 ]; do echo "$i,$(cat speed.txt)" >> "$LOOPTREE_METRICS"; i=$((i+1)); done
"""


def _config(**bench: Any) -> Any:
    return validate_config({"project": {"goal": "g", "writable": ["speed.txt"]},
                            "build": {"command": "test -s speed.txt"},
                            "bench": {"command": "./bench.sh", "repeats": 3, "max_repeats": 6, "timeout": 30, **bench},
                            "sandbox": {"mode": "off"}})


def _project(root: Path) -> tuple[Path, Path]:
    """A parent checkout (speed 100) and a candidate worktree (speed 50), both committed."""
    parent = root / "parent"
    parent.mkdir()
    git_cmd(parent, "init", "-q")
    (parent / "bench.sh").write_text(BENCH)
    (parent / "bench.sh").chmod(0o755)
    (parent / "speed.txt").write_text("100\n")
    git_cmd(parent, "add", ".")
    git_cmd(parent, "commit", "-q", "-m", "parent")
    cand = root / "cand"
    git_cmd(parent, "worktree", "add", "-q", "--detach", str(cand), "HEAD")
    (cand / "speed.txt").write_text("50\n")
    git_cmd(cand, "commit", "-q", "-am", "faster")
    return parent, cand


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, type_: str, **fields: Any) -> None:
        self.events.append((type_, fields))


async def test_every_stage_event_names_the_local_worker(tmp_path: Path) -> None:
    parent, cand = _project(tmp_path)
    emit = Recorder()
    outcome = await Evaluator(_config(), executor=LocalExecutor()).evaluate(
        node_id="1.1", project_dir=cand, node_dir=tmp_path / "node", run_dir=tmp_path, job_tag="lt-test-local:1.1",
        emit=emit, reference_dir=parent)
    assert outcome.ok and outcome.verdict is not None and outcome.verdict["label"] == "better"
    stages = [f for t, f in emit.events if t in ("stage_started", "stage_finished")]
    assert {f["stage"] for f in stages} == {"build", "bench"}
    expected = {"node": "local", "host": socket.gethostname(), "device": "cpu", "uuid": None}
    assert all(f["worker"] == expected for f in stages), stages
    assert worker_identity() == expected


async def test_the_default_executor_is_the_local_one(tmp_path: Path) -> None:
    _, cand = _project(tmp_path)
    emit = Recorder()
    evaluator = Evaluator(_config(compare="off"))
    outcome = await evaluator.evaluate(node_id="1.1", project_dir=cand, node_dir=tmp_path / "node", run_dir=tmp_path,
                                       job_tag="lt-test-local:1.1", emit=emit)
    assert outcome.ok and isinstance(evaluator.executor, LocalExecutor)
    assert isinstance(make_executor(_config()), LocalExecutor)
    assert all(f["worker"]["node"] == "local" for t, f in emit.events if t == "stage_started")


class _TwoMachinesLease(LocalLease):
    """A FAKE lease: runs every command here, but names the parent's runs as if another machine
    ran them (what a broken executor would do) so the evaluator's pair check can be seen to act."""

    def __init__(self, parent_dir: Path) -> None:
        super().__init__({"node": "local", "host": "box-a", "device": "cpu", "uuid": None})
        self.parent_dir = parent_dir

    async def run(self, command: str, **options: Any) -> ProcResult:
        other = Path(options["cwd"]) == self.parent_dir
        self.worker = {"node": "n2" if other else "n1", "host": "box-b" if other else "box-a", "device": "cpu",
                       "uuid": None}
        return await run_command(command, **options)


class _TwoMachinesExecutor(LocalExecutor):
    """A FAKE executor handing out ``_TwoMachinesLease``."""

    def __init__(self, parent_dir: Path) -> None:
        super().__init__()
        self.parent_dir = parent_dir

    @contextlib.asynccontextmanager
    async def lease(self, holder: str, device: int | None = None) -> AsyncIterator[LocalLease]:
        yield _TwoMachinesLease(self.parent_dir)


async def test_a_pair_timed_on_two_machines_gets_no_verdict(tmp_path: Path) -> None:
    parent, cand = _project(tmp_path)
    emit = Recorder()
    outcome = await Evaluator(_config(), executor=_TwoMachinesExecutor(parent)).evaluate(
        node_id="1.1", project_dir=cand, node_dir=tmp_path / "node", run_dir=tmp_path, job_tag="lt-test-two:1.1",
        emit=emit, reference_dir=parent)
    assert outcome.ok and outcome.verdict is None and outcome.parent_rows == []
    said = [f["text"] for t, f in emit.events if t == "message"]
    assert any("no verdict" in text and "box-b" in text and "box-a" in text for text in said), said
