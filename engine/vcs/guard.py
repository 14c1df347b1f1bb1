"""The user's repository is as it was after every project command; what changed is put back.

Why: build, check and bench run the candidate's code as the user. The sandbox (when the kernel
allows one) keeps it away from the repository; this is the second line of defence, and the only
one with `sandbox.mode = "off"`. After each stage the guard compares the repository with a
snapshot taken when it was last known good:

- every ref but `refs/heads/looptree/*` (the runs manage those), and `HEAD`;
- `.git/config` and every file in `.git/hooks/`;
- this run's branches: each node with a commit still has `looptree/<ID>` pointing at it;
- the user's working tree: `git status` (with each listed path's size and mtime) and the
  entries directly in the project root (`.git` and `.looptree` aside).

Refs, config, hooks and branches are restored; working-tree changes are reported (the guard
cannot know which of the user's edits to undo). Either way the stage fails with the reason and
the caller reports it loudly.

Known-good snapshots: taken when no stage is running (the user may commit between stages, not
during one), so concurrent stages share one reference point; with several stages running at
once the first to finish is the one blamed. A change the user makes while a stage runs is
reported as if the candidate made it; nothing is lost (every moved ref's value is in the
reason, which the event log keeps).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looptree.engine.core.terminal import safe_text
from looptree.engine.errors import GitError
from looptree.engine.vcs import gitops

RUN_BRANCHES = "refs/heads/looptree/"
SKIP_TOP = (".git", ".looptree")


@dataclass
class Snapshot:
    refs: dict[str, tuple[str, str]]  # refname -> (object, symbolic target or "")
    files: dict[str, tuple[int, bytes] | None]  # path under the git dir -> (mode, bytes) or None (absent)
    status: dict[str, tuple[str, int, int]]  # `git status` path -> (code, size, mtime_ns)
    top: dict[str, tuple[str, int, int]]  # project-root entry -> (kind, size, mtime_ns)


@dataclass
class Watch:
    """What one guarded stage learned: None, or the reason the repository was found changed."""

    problem: str | None = None


@dataclass
class RepoGuard:
    repo: gitops.Repo
    project_dir: Path
    branches: Callable[[], dict[str, str]]  # refname -> commit every evaluated node must keep
    emit: Callable[..., Any]
    _git_dir: Path | None = None
    _common: Path | None = None
    _expected: Snapshot | None = None
    _active: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- setup ------------------------------------------------------------------------------
    async def _dirs(self) -> tuple[Path, Path]:
        if self._git_dir is None or self._common is None:
            def absolute(text: str) -> Path:
                path = Path(text.strip())
                return path if path.is_absolute() else (self.repo.root / path)

            self._git_dir = absolute(await gitops.git("rev-parse", "--git-dir", cwd=self.repo.root)).resolve()
            self._common = absolute(await gitops.git("rev-parse", "--git-common-dir", cwd=self.repo.root)).resolve()
        return self._git_dir, self._common

    async def start(self) -> list[str]:
        """Repair this run's branches (the user may have deleted some between runs), then snapshot."""
        async with self._lock:
            repaired = await self._repair_branches()
            self._expected = await self.snapshot()
        return repaired

    # -- the stage wrapper ----------------------------------------------------------------
    @asynccontextmanager
    async def watch(self, node_id: str, stage: str) -> AsyncIterator[Watch]:
        """Around one project command: snapshot if nothing else runs, verify afterwards."""
        watch = Watch()
        async with self._lock:
            if self._active == 0 or self._expected is None:
                self._expected = await self.snapshot()
            self._active += 1
        try:
            yield watch
        finally:
            # Shielded: a killed stage's changes are still put back before anything else runs.
            check = asyncio.ensure_future(self._leave(node_id, stage))
            watch.problem = await asyncio.shield(check)

    async def _leave(self, node_id: str, stage: str) -> str | None:
        async with self._lock:
            try:
                problems = await self.verify()
            except (GitError, OSError) as exc:
                problems = [f"could not check the repository: {exc}"]
            finally:
                self._active -= 1
        if not problems:
            return None
        reason = f"the {stage} changed the user's repository: " + "; ".join(problems)
        self.emit("message", text=f"WARNING {node_id}: {reason}", alert="repository_changed", id=node_id,
                  stage=stage, changes=problems)
        return reason

    # -- snapshots ----------------------------------------------------------------------------
    async def snapshot(self) -> Snapshot:
        git_dir, common = await self._dirs()
        refs = await self._refs()
        files = await asyncio.to_thread(self._read_files, git_dir, common)
        status = await self._status()
        top = await asyncio.to_thread(self._top)
        return Snapshot(refs, files, status, top)

    async def _refs(self) -> dict[str, tuple[str, str]]:
        out = await gitops.git("for-each-ref", "--format=%(refname)%00%(objectname)%00%(symref)", cwd=self.repo.root)
        refs: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            name, _, rest = line.partition("\0")
            obj, _, sym = rest.partition("\0")
            if name and not name.startswith(RUN_BRANCHES):
                refs[name] = ("", sym) if sym else (obj, "")  # a symref is its target, not the target's commit
        return refs

    def _read_files(self, git_dir: Path, common: Path) -> dict[str, tuple[int, bytes] | None]:
        files: dict[str, tuple[int, bytes] | None] = {"HEAD": _read(git_dir / "HEAD"), "config": _read(common / "config")}
        hooks = common / "hooks"
        try:
            names = sorted(os.listdir(hooks)) if hooks.is_dir() and not hooks.is_symlink() else []
        except OSError:
            names = []
        for name in names:
            files[f"hooks/{name}"] = _read(hooks / name)
        if hooks.is_symlink() or (hooks.exists() and not hooks.is_dir()):
            files["hooks"] = (0, b"not a directory")
        return files

    async def _status(self) -> dict[str, tuple[str, int, int]]:
        out = await gitops.git("--no-optional-locks", "status", "--porcelain=v1", "-z", "--untracked-files=normal",
                               "--ignore-submodules=dirty", cwd=self.repo.root)
        status: dict[str, tuple[str, int, int]] = {}
        entries = out.split("\0")
        index = 0
        while index < len(entries):
            entry = entries[index]
            index += 1
            if len(entry) < 4:
                continue
            code, path = entry[:2], entry[3:]
            if code[0] in "RC":
                index += 1  # the rename's source path follows
            try:
                st = os.lstat(self.repo.root / path)
                status[path] = (code, st.st_size, st.st_mtime_ns)
            except OSError:
                status[path] = (code, -1, 0)
        return status

    def _top(self) -> dict[str, tuple[str, int, int]]:
        top: dict[str, tuple[str, int, int]] = {}
        try:
            entries = list(os.scandir(self.project_dir))
        except OSError:
            return top
        for entry in entries:
            if entry.name in SKIP_TOP:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
            top[entry.name] = (kind, st.st_size if kind != "dir" else 0, st.st_mtime_ns)
        return top

    # -- verify and restore ---------------------------------------------------------------------
    async def verify(self) -> list[str]:
        """Differences from the known-good snapshot, each already put back where it can be."""
        expected = self._expected
        if expected is None:
            return []
        git_dir, common = await self._dirs()
        problems = await self._restore_refs(expected.refs, await self._refs())
        files = await asyncio.to_thread(self._read_files, git_dir, common)
        problems += await asyncio.to_thread(self._restore_files, expected.files, files)
        problems += await self._repair_branches()
        # After the refs are back: a moved HEAD branch would otherwise show as changed files.
        now = Snapshot({}, {}, await self._status(), await asyncio.to_thread(self._top))
        problems += _tree_changes(expected, now)
        # File names the code under test chose: one line each, escapes shown (engine/core/terminal.py).
        return [safe_text(problem, keep="\t") for problem in problems]

    async def _restore_refs(self, before: dict[str, tuple[str, str]], now: dict[str, tuple[str, str]]) -> list[str]:
        problems = []
        for name in sorted(set(before) | set(now)):
            old, new = before.get(name), now.get(name)
            if old == new:
                continue
            try:
                if old is None:
                    await gitops.git("update-ref", "-d", name, cwd=self.repo.root)
                    problems.append(f"{name} created at {new[0][:10]} (deleted)")  # type: ignore[index]
                elif old[1]:
                    await gitops.git("symbolic-ref", name, old[1], cwd=self.repo.root)
                    problems.append(f"{name} changed (restored to point at {old[1]})")
                else:
                    await gitops.git("update-ref", "--no-deref", name, old[0], cwd=self.repo.root)
                    what = f"moved {old[0][:10]} → {new[0][:10]}" if new else "deleted"
                    problems.append(f"{name} {what} (restored to {old[0][:10]})")
            except GitError as exc:
                problems.append(f"{name} changed and could not be restored: {exc}")
        return problems

    def _restore_files(self, before: dict[str, tuple[int, bytes] | None],
                       now: dict[str, tuple[int, bytes] | None]) -> list[str]:
        git_dir, common = self._git_dir, self._common
        assert git_dir is not None and common is not None
        problems = []
        for name in sorted(set(before) | set(now)):
            old, new = before.get(name), now.get(name)
            if old == new:
                continue
            path = (git_dir if name == "HEAD" else common) / name
            shown = ".git/" + name
            try:
                if name == "hooks":  # the hooks directory itself was replaced
                    _remove(path)
                    path.mkdir(exist_ok=True)
                    problems.append(f"{shown} replaced (recreated)")
                elif old is None:
                    _remove(path)
                    problems.append(f"{shown} added (removed)")
                else:
                    _write(path, old)
                    problems.append(f"{shown} {'deleted' if new is None else 'changed'} (restored)")
            except OSError as exc:
                problems.append(f"{shown} changed and could not be restored: {exc.strerror or exc}")
        if "hooks" in now and "hooks" not in before:
            for name, value in before.items():  # the replaced directory's hooks come back too
                if name.startswith("hooks/") and value is not None:
                    try:
                        _write(common / name, value)
                    except OSError:
                        pass
        return problems

    async def _repair_branches(self) -> list[str]:
        problems: list[str] = []
        want = self.branches()
        if not want:
            return problems
        out = await gitops.git("for-each-ref", "--format=%(refname)%00%(objectname)", RUN_BRANCHES.rstrip("/"),
                               cwd=self.repo.root)
        have = dict(line.split("\0", 1) for line in out.splitlines() if "\0" in line)
        for ref, commit in sorted(want.items()):
            current = have.get(ref)
            if current == commit:
                continue
            try:
                await gitops.git("update-ref", "--no-deref", ref, commit, cwd=self.repo.root)
                what = "deleted" if current is None else f"moved to {current[:10]}"
                problems.append(f"branch {ref.removeprefix('refs/heads/')} {what} (restored to {commit[:10]})")
            except GitError as exc:
                problems.append(f"branch {ref.removeprefix('refs/heads/')} changed and could not be restored: {exc}")
        return problems


def _tree_changes(before: Snapshot, now: Snapshot) -> list[str]:
    """Working-tree differences, named (not restored: they may be the user's own edits)."""
    changed = []
    for path in sorted(set(before.status) | set(now.status)):
        if before.status.get(path) != now.status.get(path):
            changed.append(path)
    for name in sorted(set(before.top) | set(now.top)):
        if before.top.get(name) != now.top.get(name) and name not in changed and name + "/" not in changed:
            changed.append(name)
    if not changed:
        return []
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    return [f"files in the project's working tree created or changed: {shown} (not restored; check them)"]


def _read(path: Path) -> tuple[int, bytes] | None:
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return (st.st_mode, b"symlink:" + os.fsencode(os.readlink(path)))
        if stat.S_ISDIR(st.st_mode):
            return (st.st_mode, b"directory")
        with open(path, "rb") as fh:
            return (st.st_mode, fh.read(4 * 1024 * 1024))
    except OSError:
        return None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        import shutil

        shutil.rmtree(path)


def _write(path: Path, value: tuple[int, bytes]) -> None:
    mode, data = value
    _remove(path)
    if data.startswith(b"symlink:") and stat.S_ISLNK(mode):
        os.symlink(os.fsdecode(data[len(b"symlink:"):]), path)
        return
    tmp = path.with_name(path.name + ".looptree-restore")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, stat.S_IMODE(mode))
    os.replace(tmp, path)
