"""Where a project's runs live: `<project>/.looptree/runs/<N>/` (contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from looptree.engine.errors import LooptreeError

# A run that ended with one of these has nothing left to do: `resume` and `ctl` refuse it. A run
# stopped by the user, a signal or its budget (or an error) stays resumable.
DONE_REASONS = ("phases done", "early stop")


def runs_root(project_dir: Path) -> Path:
    return project_dir / ".looptree" / "runs"


def worktrees_root(run_dir: Path) -> Path:
    """Node worktrees live inside the run dir so a resume can find and remove every leftover."""
    return run_dir / "worktrees"


def node_dir(run_dir: Path, node_id: str) -> Path:
    return run_dir / "nodes" / node_id


def resolve_run_dir(text: str) -> Path:
    """Accept a run directory, or a project directory (its latest run)."""
    path = Path(text).expanduser().resolve()
    if (path / "events.jsonl").exists():
        return path
    root = runs_root(path)
    if root.is_dir():
        runs = sorted((p for p in root.iterdir() if p.name.isdigit() and (p / "events.jsonl").exists()),
                      key=lambda p: int(p.name))
        if runs:
            return runs[-1]
    raise LooptreeError(f"{text} is not a run directory (expected <project>/.looptree/runs/<N> with an events.jsonl)")


def check_resumable(state: Any, run_dir: Path, what: str) -> None:
    """Refuse `resume`/`ctl` on a run that finished its work (state: engine.state.RunState)."""
    if state.finished in DONE_REASONS:
        raise LooptreeError(f"run {state.run} in {run_dir} ended ({state.finished}); there is nothing to {what} - "
                            f"start a new run with `looptree run`")
