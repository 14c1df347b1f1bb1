"""Git worktrees and branches for a run's nodes, one git command at a time.

Why a lock: several nodes of a phase run at once, and concurrent `git worktree add` /
`update-ref` calls on one repository race on its lock files. Every worktree change and
branch move of the run goes through here, serialized; commits inside a worktree do not.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from looptree.engine.edits.access import AccessPolicy
from looptree.engine.vcs import gitops


class Worktrees:
    def __init__(self, repo: gitops.Repo, policy: AccessPolicy) -> None:
        self.repo = repo
        self.policy = policy
        self._git_lock = asyncio.Lock()

    async def add(self, path: Path, commit: str) -> Path:
        """Check `commit` out at `path`; return the project folder inside it."""
        async with self._git_lock:
            await gitops.add_worktree(self.repo, path, commit)
        project = self.repo.project_in(path)
        # Hidden files stay out of a candidate's worktree unless a command needs them (project.hidden_needed).
        await asyncio.to_thread(self.policy.drop_hidden, project)
        return project

    async def remove(self, path: Path) -> None:
        async with self._git_lock:
            await asyncio.shield(gitops.remove_worktree(self.repo, path))

    async def set_branch(self, node_id: str, commit: str) -> str:
        async with self._git_lock:
            return await gitops.set_branch(self.repo, node_id, commit)
