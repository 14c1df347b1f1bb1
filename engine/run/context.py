"""What every part of one run shares: where it lives, its config, its log, its folded state.

Why one small record: the scheduler, the node runner, the control commands and the
telemetry recorder each need these same few things. Passing this record keeps each of them
a class of its own with one job, instead of methods on one engine that can reach everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looptree.engine.core.config import Config
from looptree.engine.core.events import EventLog
from looptree.engine.core.state import RunState
from looptree.engine.run.gate import RunGate
from looptree.engine.vcs import gitops


@dataclass
class RunContext:
    project_dir: Path
    run_dir: Path
    config: Config
    repo: gitops.Repo
    log: EventLog
    state: RunState
    gate: RunGate
    job_prefix: str

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Write one event; the fold (a listener of the log) has applied it when this returns."""
        return self.log.append(type_, **fields)

    def metric_names(self) -> str:
        specs = self.state.specs
        return ", ".join(s.column for s in specs) if specs else "(not measured yet)"

    def run_branches(self) -> dict[str, str]:
        """Every node with a commit keeps `looptree/<ID>` pointing at it (checked by the guard)."""
        return {f"refs/heads/{self.repo.branch(n.id)}": n.commit for n in self.state.nodes.values() if n.commit}
