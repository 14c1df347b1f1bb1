"""Shared fixtures: a real git repository in tmp_path and a builder of realistic event logs.

Why a builder rather than canned logs: the fold, the search policy and the CLI viewers must agree
on the event sequence the engine writes (docs/ARCHITECTURE.md "Event log"), so every test that
needs a run grows it through the same helper, one node at a time, the way the engine does.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Every event any test makes looptree write is checked against its class in engine/core/schema.py
# (subprocesses inherit it): a field the schema does not define fails the test that wrote it.
os.environ["LOOPTREE_STRICT_EVENTS"] = "1"
# Device locks are machine-wide: the suite takes its own folder, so it never waits on (nor leaves
# lock files beside) a real run's, and two suites on one machine do not serialise each other.
os.environ["LOOPTREE_LOCK_DIR"] = tempfile.mkdtemp(prefix="looptree-test-locks-")

RT = "runtime_ms (lower is better)"


def git_cmd(cwd: Path, *args: str) -> str:
    """Plain synchronous git for test setup and for inspecting what gitops left behind."""
    out = subprocess.run(
        ["git", "-c", "user.name=tester", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
         "-c", "init.defaultBranch=main", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    )
    return out.stdout


class RunEvents:
    """Emits the events of one run in the order the engine writes them; `.state()` folds them."""

    def __init__(self, run: int = 1, project: str = "/nonexistent/project", columns: tuple[str, ...] = (RT,),
                 max_tokens: int = 1_000_000) -> None:
        self.run = run
        self.columns = list(columns)
        self.events: list[dict[str, Any]] = []
        self.emit("run_started", run=run, project=project, config={"budget": {"max_tokens": max_tokens}},
                  base_commit="b" * 40, pid=4242, host="testhost")

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"seq": len(self.events), "ts": 1000.0 + len(self.events), "type": type_, **fields}
        self.events.append(event)
        return event

    def created(self, node_id: str, parent: str | None, *, kind: str = "idea", phase: int = 0, **extra: Any) -> None:
        self.emit("node_created", id=node_id, parent=parent, phase=phase, kind=kind, **extra)

    def generated(self, node_id: str, *, tokens: int = 100, role: str = "optimize", description: str = "a change") -> None:
        """The agent replies, its tokens are booked and its edits committed."""
        usage = {"prompt_tokens": tokens - tokens // 4, "completion_tokens": tokens // 4, "total_tokens": tokens}
        self.emit("agent_started", id=node_id, role=role)
        self.emit("tokens_spent", id=node_id, role=role, cost_usd=0.001, **usage)
        self.emit("agent_finished", id=node_id, role=role, text="reply", description=description, usage=usage,
                  model="m", prompt_hash="h" + node_id, duration_s=0.1, cost_usd=0.001)
        self.emit("edits_applied", id=node_id, files=["solver.py"], commit=f"c{node_id}", branch=f"looptree/{node_id}")

    def evaluated(self, node_id: str, *values: float) -> None:
        """Build, one bench repeat with one metric row, then the aggregate."""
        metrics = dict(zip(self.columns, values))
        self.emit("stage_started", id=node_id, stage="build")
        self.emit("stage_finished", id=node_id, stage="build", ok=True, rc=0, duration_s=0.1)
        self.emit("stage_started", id=node_id, stage="bench", repeat=0)
        self.emit("metric_row", id=node_id, repeat=0, iteration=1, values=metrics, columns=self.columns)
        self.emit("stage_finished", id=node_id, stage="bench", ok=True, rc=0, duration_s=0.2, repeat=0)
        self.emit("node_evaluated", id=node_id, iteration=1, metrics=metrics,
                  spread={c: {"n": 1.0, "min": v, "max": v} for c, v in metrics.items()}, columns=self.columns)

    def baseline(self, *values: float) -> str:
        node_id = str(self.run)
        self.created(node_id, None, kind="baseline", phase=-1)
        self.emit("edits_applied", id=node_id, files=[], commit="b" * 40, branch=f"looptree/{node_id}")
        self.evaluated(node_id, *values)
        return node_id

    def success(self, node_id: str, parent: str, *values: float, kind: str = "idea", phase: int = 0, tokens: int = 100) -> None:
        self.created(node_id, parent, kind=kind, phase=phase, **({"fix_of": parent} if kind == "fix" else {}))
        self.generated(node_id, tokens=tokens, role="fix" if kind == "fix" else "optimize")
        self.evaluated(node_id, *values)

    def failure(self, node_id: str, parent: str, *, stage: str = "build", reason: str = "SyntaxError: boom",
                kind: str = "idea", phase: int = 0) -> None:
        self.created(node_id, parent, kind=kind, phase=phase, **({"fix_of": parent} if kind == "fix" else {}))
        self.generated(node_id, role="fix" if kind == "fix" else "optimize")
        self.emit("stage_started", id=node_id, stage=stage)
        self.emit("stage_finished", id=node_id, stage=stage, ok=False, rc=1, duration_s=0.1, reason=reason)
        self.emit("node_failed", id=node_id, stage=stage, reason=reason)

    def state(self):  # -> engine.state.RunState (imported late so a broken fold fails only its users)
        from looptree.engine.core.state import RunState

        return RunState.from_events(self.events)

    def write(self, run_dir: Path) -> Path:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "events.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        return path


@pytest.fixture
def run_events() -> RunEvents:
    """Run 1, one metric (runtime_ms, lower is better)."""
    return RunEvents()


@pytest.fixture
def make_events() -> type[RunEvents]:
    """The builder class itself, for runs with other numbers or metric columns."""
    return RunEvents


@pytest.fixture
def git_run():
    """`git_run(cwd, *args) -> stdout`: synchronous git with a test identity."""
    return git_cmd


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    """A repository with one commit (solver.py, bench.py) on branch main."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git_cmd(repo, "init", "-q")
    (repo / "solver.py").write_text("def solve(xs):\n    return sum(xs)\n")
    (repo / "bench.py").write_text("print('bench')\n")
    git_cmd(repo, "add", "-A")
    git_cmd(repo, "commit", "-q", "-m", "initial")
    return repo
