"""Git plumbing for the optimization tree, async and without touching the user's checkout.

Why this shape: every candidate is a commit on `looptree/<ID>`, built in its own worktree under
the run directory, so concurrent candidates never share files and the user's working tree, index
and current branch stay exactly as they were. The baseline is a snapshot of the working tree
(tracked and untracked-not-ignored files) made through a temporary index, so uncommitted work is
optimized as the user sees it, and their real index is never written.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from looptree.engine.errors import GitError

GIT_TIMEOUT = 120.0
IDENTITY = {
    "GIT_AUTHOR_NAME": "looptree",
    "GIT_AUTHOR_EMAIL": "looptree@localhost",
    "GIT_COMMITTER_NAME": "looptree",
    "GIT_COMMITTER_EMAIL": "looptree@localhost",
}
# Hooks, signing and pagers belong to the user's own commits, not to ours.
SAFE_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false", "-c", "core.pager=cat",
               "-c", "advice.detachedHead=false", "-c", "gc.auto=0")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(IDENTITY)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


async def git(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = GIT_TIMEOUT,
              check: bool = True, input_bytes: bytes | None = None) -> str:
    """Run one git command; a failure raises GitError with git's own first error line."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git", *SAFE_CONFIG, *args, cwd=str(cwd), env=_env(env),
            stdin=asyncio.subprocess.PIPE if input_bytes is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
        )
    except FileNotFoundError:
        if not Path(cwd).is_dir():
            raise GitError(f"git {args[0]}: directory {cwd} does not exist") from None
        raise GitError("git is not installed (looptree needs the git command)") from None
    except OSError as exc:
        raise GitError(f"git {args[0]} could not start: {exc}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(input_bytes), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        await proc.wait()
        if isinstance(exc, asyncio.TimeoutError):
            raise GitError(f"git {args[0]} timed out after {timeout:g} s") from None
        raise
    if check and proc.returncode != 0:
        first = next((line for line in err.decode(errors="replace").splitlines() if line.strip()), "")
        raise GitError(f"git {args[0]} failed: {first or f'exit {proc.returncode}'}")
    return out.decode(errors="replace")


@dataclass(frozen=True)
class Repo:
    """The project's repository: `root` is the top level, `prefix` the project's path inside it."""

    root: Path
    prefix: str  # "" or "sub/dir/" (git's --show-prefix form)

    def project_in(self, worktree: Path) -> Path:
        return worktree / self.prefix if self.prefix else worktree

    def branch(self, node_id: str) -> str:
        return f"looptree/{node_id}"


async def open_repo(project_dir: Path, *, create: bool = True) -> Repo:
    """Find the repository holding the project; initialise one if there is none (contract)."""
    project_dir = project_dir.resolve()
    try:
        top = (await git("rev-parse", "--show-toplevel", cwd=project_dir)).strip()
        prefix = (await git("rev-parse", "--show-prefix", cwd=project_dir)).strip()
    except GitError:
        if not create:
            raise GitError(f"{project_dir} is not inside a git repository") from None
        await git("init", "-q", cwd=project_dir)
        top, prefix = str(project_dir), ""
    repo = Repo(Path(top), prefix)
    await ensure_excluded(repo)
    return repo


async def ensure_excluded(repo: Repo) -> None:
    """Keep `.looptree/` out of the user's `git status` without editing their .gitignore."""
    git_dir = Path((await git("rev-parse", "--git-common-dir", cwd=repo.root)).strip())
    if not git_dir.is_absolute():
        git_dir = repo.root / git_dir
    exclude = git_dir / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    pattern = f"/{repo.prefix}.looptree/"
    text = exclude.read_text() if exclude.exists() else ""
    if pattern not in text.splitlines():
        with open(exclude, "a") as fh:
            fh.write(("" if text.endswith("\n") or not text else "\n") + pattern + "\n")


async def head_commit(repo: Repo) -> str | None:
    out = await git("rev-parse", "--verify", "-q", "HEAD^{commit}", cwd=repo.root, check=False)
    return out.strip() or None


async def snapshot_working_tree(repo: Repo, message: str) -> str:
    """Commit what the user's working tree holds now, through a throwaway index."""
    head = await head_commit(repo)
    with tempfile.TemporaryDirectory(prefix="looptree-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if head:
            await git("read-tree", head, cwd=repo.root, env=env)
        await git("add", "-A", "--", ".", cwd=repo.root, env=env)
        tree = (await git("write-tree", cwd=repo.root, env=env)).strip()
    if head:
        head_tree = (await git("rev-parse", f"{head}^{{tree}}", cwd=repo.root)).strip()
        if head_tree == tree:
            return head
    parents = ["-p", head] if head else []
    return (await git("commit-tree", tree, *parents, "-m", message, cwd=repo.root)).strip()


async def set_branch(repo: Repo, node_id: str, commit: str) -> str:
    ref = f"refs/heads/{repo.branch(node_id)}"
    await git("update-ref", ref, commit, cwd=repo.root)
    return repo.branch(node_id)


async def add_worktree(repo: Repo, path: Path, commit: str) -> None:
    if path.exists():
        await remove_worktree(repo, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    await git("worktree", "add", "--detach", "-f", "-q", str(path), commit, cwd=repo.root)


async def remove_worktree(repo: Repo, path: Path) -> None:
    """Remove a node's worktree; tolerate one already half-gone (a crash mid-remove)."""
    if path.exists():
        await git("worktree", "remove", "--force", "--force", str(path), cwd=repo.root, check=False)
        if path.exists():
            await asyncio.to_thread(shutil.rmtree, path, True)
            # Only a half-removed worktree leaves git's bookkeeping behind; `remove` cleans its own.
            await _forget_missing_under(repo, path.parent)


async def commit_worktree(worktree: Path, files: list[str], message: str) -> str:
    """Stage exactly the changed files (paths relative to the worktree root) and commit them."""
    if files:
        # -f: a writable file the project's .gitignore happens to cover is still the agent's change.
        await git("add", "-A", "-f", "--", *files, cwd=worktree)
    await git("commit", "-q", "--allow-empty", "--no-verify", "-m", message, cwd=worktree)
    return (await git("rev-parse", "HEAD", cwd=worktree)).strip()


async def ref_exists(repo: Repo, ref: str) -> bool:
    out = await git("rev-parse", "--verify", "-q", ref, cwd=repo.root, check=False)
    return bool(out.strip())


async def diff(repo: Repo, old: str, new: str, *, stat: bool = False) -> str:
    args = ["diff", "--no-color", "--no-ext-diff"]
    if stat:
        args.append("--stat")
    return await git(*args, old, new, cwd=repo.root)


async def changed_paths(repo: Repo, old: str, new: str) -> list[str]:
    out = await git("diff", "--name-only", "--no-renames", old, new, cwd=repo.root)
    return [line for line in out.splitlines() if line]


async def resolve_ref(repo: Repo, ref: str) -> str:
    out = await git("rev-parse", "--verify", "-q", f"{ref}^{{commit}}", cwd=repo.root, check=False)
    if not out.strip():
        raise GitError(f"unknown git ref or node {ref!r}")
    return out.strip()


async def prune_worktrees(repo: Repo, root: Path) -> int:
    """After a crash: drop every leftover node worktree under `root`; return how many.

    Only looptree's own registrations are forgotten: `git worktree prune` would also drop the
    user's worktrees that are merely missing for now (an unmounted disk).
    """
    removed = 0
    if root.exists():
        for path in sorted(root.iterdir()):
            if path.is_dir():
                await remove_worktree(repo, path)
                removed += 1
    removed += await _forget_missing_under(repo, root)
    return removed


async def _forget_missing_under(repo: Repo, root: Path) -> int:
    """Delete git's bookkeeping for worktrees under `root` whose directory is gone."""
    common = Path((await git("rev-parse", "--git-common-dir", cwd=repo.root)).strip())
    admin = (common if common.is_absolute() else repo.root / common) / "worktrees"
    forgotten = 0
    if not admin.is_dir():
        return 0
    root = root.resolve()
    for entry in admin.iterdir():
        try:
            checkout = Path((entry / "gitdir").read_text().strip()).parent
        except OSError:
            continue
        if not checkout.exists() and (checkout == root or root in checkout.parents):
            await asyncio.to_thread(shutil.rmtree, entry, True)
            forgotten += 1
    return forgotten
