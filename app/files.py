"""What the detail panel reads from disk: a node's diff against its parent, and log tails.

Why here and cached: `git diff` is a subprocess (tens of ms, more on a cold NFS home), so it
runs in a worker and its text is kept per (parent commit, commit) pair; moving the cursor up and
down the tree then costs nothing. Log tails read only the last few KiB of each file, so a 2 GB
bench.log costs the same as a small one.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

from looptree.engine.core.state import NodeState, RunState
from looptree.engine.core.terminal import safe_text
from looptree.engine.errors import LooptreeError

DIFF_TIMEOUT_S = 15.0
MAX_DIFF_CHARS = 200_000
LOG_NAMES = ("build.log", "check.log", "bench.log")


def parent_commit(state: RunState, node: NodeState) -> str | None:
    """The commit a node's change is measured against: its parent's, or the run's base commit."""
    if node.parent is None:
        return None  # the baseline has nothing to be compared with
    parent = state.nodes.get(node.parent)
    if parent is not None and parent.commit:
        return parent.commit
    return state.base_commit


class DiffCache:
    """`git diff <parent> <node>` per pair of commits, computed once, bounded in memory."""

    def __init__(self, limit: int = 64) -> None:
        self._texts: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self.limit = limit

    def cached(self, project: str, old: str, new: str) -> str | None:
        key = (project, old, new)
        text = self._texts.get(key)
        if text is not None:
            self._texts.move_to_end(key)
        return text

    async def get(self, project: str, old: str, new: str, fallback: Path | None = None) -> str:
        """The diff text; on failure, the engine's saved `diff.patch`, else a one-line reason."""
        hit = self.cached(project, old, new)
        if hit is not None:
            return hit
        text = await load_diff(Path(project), old, new, fallback)
        self._texts[(project, old, new)] = text
        while len(self._texts) > self.limit:
            self._texts.popitem(last=False)
        return text


async def load_diff(project: Path, old: str, new: str, fallback: Path | None = None) -> str:
    from looptree.engine.vcs.gitops import git  # local: the dashboard imports git helpers only when it needs a diff

    reason = ""
    if project.is_dir():
        try:
            text = await asyncio.wait_for(
                git("diff", "--no-color", "--no-ext-diff", old, new, cwd=project), DIFF_TIMEOUT_S + 1
            )
            return _cap(text) if text.strip() else "(no changes between the parent and this node)"
        except (TimeoutError, LooptreeError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
    else:
        reason = f"project directory {project} not found"
    if fallback is not None and fallback.is_file():
        try:
            return _cap(fallback.read_text(errors="replace"))
        except OSError:
            pass
    return safe_text(f"! diff unavailable: {reason}")


def _cap(text: str) -> str:
    """The diff as shown: at most MAX_DIFF_CHARS, escape sequences in it made visible (the agent wrote it)."""
    if len(text) > MAX_DIFF_CHARS:
        text = text[:MAX_DIFF_CHARS] + f"\n... (diff cut at {MAX_DIFF_CHARS} characters)\n"
    return safe_text(text)


def tail_lines(path: Path, lines: int = 12, max_bytes: int = 16_384) -> list[str] | None:
    """The last `lines` lines of a file (reading at most `max_bytes`), or None if it is absent."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    text = data.decode(errors="replace").replace("\r\n", "\n")
    out = text.splitlines()
    if size > max_bytes and out:
        out = out[1:]  # the first line was cut mid-way
    # The candidate's code wrote these logs: escape sequences are shown, never obeyed.
    return [safe_text(line, keep="\t").expandtabs(4) for line in out[-lines:]]
