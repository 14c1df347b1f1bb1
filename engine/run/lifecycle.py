"""Opening a run: a new numbered run directory, or an existing one taken back after a crash or stop.

Why apart from the engine: everything here happens before there is an engine to drive (the
lock, the baseline snapshot, the folded log, clearing what a dead engine left), and a start
refused half-way must leave nothing behind: no lock held, no empty run that `tree .` picks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from looptree.engine.core.config import Config, validate_config
from looptree.engine.core.events import EventLog, RunLock
from looptree.engine.core.runs import check_resumable, runs_root, worktrees_root
from looptree.engine.core.state import RunState
from looptree.engine.edits.access import check_patterns
from looptree.engine.errors import LooptreeError
from looptree.engine.evaluation.procs import kill_jobs_with_prefix
from looptree.engine.vcs import gitops


def job_prefix(run_dir: Path) -> str:
    """Every process of this run carries LOOPTREE_JOB=<prefix><node>…, so a resume can find orphans."""
    return "lt-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10] + ":"


@dataclass
class OpenedRun:
    """A run directory held by this process, with its log and folded state, ready for an engine."""

    project_dir: Path
    run_dir: Path
    config: Config
    repo: gitops.Repo
    lock: RunLock
    log: EventLog
    state: RunState
    base_commit: str | None = None  # a new run's baseline snapshot
    orphans_killed: int = 0  # what a resume cleared
    worktrees_removed: int = 0
    _new: bool = True

    @contextlib.contextmanager
    def undone_on_error(self) -> Iterator[OpenedRun]:
        """Anything raised while the engine is built and its first event written releases the run."""
        try:
            yield self
        except BaseException:
            self.log.close()
            self.lock.release()
            if self._new:
                discard_empty_run(self.run_dir)
            raise


async def open_new_run(project_dir: Path, config: Config, run_dir: Path | None = None, *,
                       check_endpoints: bool = True) -> OpenedRun:
    """Run N+1: a numbered run dir, its lock, its config.toml, a snapshot of the working tree.

    `check_endpoints=False` when the caller brings its own LLM backend (tests, experiments).
    """
    from looptree.engine.agents.llm.preflight import require_endpoints
    from looptree.engine.agents.llm.providers import resolve_endpoint

    project_dir = project_dir.resolve()
    check_patterns(config, project_dir)
    if check_endpoints and config.agent.provider != "replay":
        resolve_endpoint(config.agent.provider, config.agent.base_url, config.agent.api_key_env)
        # One cheap request per endpoint before the baseline: a wrong port, a base_url
        # without /v1, a refused key or an unknown model is one line and a non-zero exit.
        await require_endpoints(config)
    repo = await gitops.open_repo(project_dir)
    if run_dir is None:
        run_dir = allocate_run_dir(project_dir)
        while await gitops.ref_exists(repo, f"refs/heads/looptree/{run_dir.name}"):
            # .looptree was deleted but the branches remain: never overwrite the user's refs.
            run_dir.rmdir()
            run_dir = allocate_run_dir(project_dir, start=int(run_dir.name) + 1)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        (run_dir / "config.toml").write_text(tomli_w.dumps(toml_safe(config.to_dict())))
        base = await gitops.snapshot_working_tree(repo, "looptree: baseline snapshot of the working tree")
        log = EventLog(run_dir)
    except BaseException:
        lock.release()
        discard_empty_run(run_dir)
        raise
    return OpenedRun(project_dir=project_dir, run_dir=run_dir, config=config, repo=repo, lock=lock, log=log,
                     state=RunState(), base_commit=base)


async def reopen_run(run_dir: Path, *, check_endpoints: bool = True) -> OpenedRun:
    """Take a run back: the lock, the folded log, and nothing left of the dead engine (processes, worktrees)."""
    run_dir = run_dir.resolve()
    if not (run_dir / "events.jsonl").exists():
        raise LooptreeError(f"{run_dir} is not a looptree run directory (no events.jsonl)")
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        state = RunState.load(run_dir)  # the one pass over the log a resume makes
        if state.run is None:
            raise LooptreeError(f"{run_dir}/events.jsonl has no run_started event")
        check_resumable(state, run_dir, "resume")
        config = validate_config(state.config, source=f"{run_dir}/config.toml")
        if check_endpoints and config.agent.provider != "replay":
            from looptree.engine.agents.llm.preflight import require_endpoints

            await require_endpoints(config)  # a resume against a dead endpoint: say so now
        # The run lives in <project>/.looptree/runs/<N>: trust that over the recorded path,
        # which is wrong once the project was moved or is mounted elsewhere.
        project_dir = run_dir.parents[2]
        repo = await gitops.open_repo(project_dir, create=False)
        killed = await asyncio.to_thread(kill_jobs_with_prefix, job_prefix(run_dir))
        removed = await gitops.prune_worktrees(repo, worktrees_root(run_dir))
        log = EventLog(run_dir)
    except BaseException:
        lock.release()
        raise
    return OpenedRun(project_dir=project_dir, run_dir=run_dir, config=config, repo=repo, lock=lock, log=log,
                     state=state, orphans_killed=killed, worktrees_removed=removed, _new=False)


def toml_safe(data: Any) -> Any:
    """TOML has no null: drop the unset keys (config.toml is the config as the run saw it)."""
    if isinstance(data, dict):
        return {k: toml_safe(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [toml_safe(v) for v in data]
    return data


def discard_empty_run(run_dir: Path) -> None:
    """A start refused before its first event leaves no run behind (`tree .` must not pick it)."""
    events = run_dir / "events.jsonl"
    if events.exists() and events.stat().st_size > 0:
        return
    if (run_dir / "engine.log").exists():
        # Started by the dashboard launcher: it reads the log for the error, then removes the run.
        for name in ("events.jsonl", "config.toml", "engine.lock"):
            (run_dir / name).unlink(missing_ok=True)
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def allocate_run_dir(project_dir: Path, start: int = 1) -> Path:
    """Runs are numbered 1, 2, 3…; mkdir is atomic, so two starts at once get different numbers."""
    root = runs_root(project_dir)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    n = max(max(numbers, default=0) + 1, start)
    while True:
        try:
            (root / str(n)).mkdir()
            return root / str(n)
        except FileExistsError:
            n += 1
