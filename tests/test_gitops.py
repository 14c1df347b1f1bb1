"""Git plumbing against real repositories: init, baseline snapshot, worktrees, commits, branches, hooks.

The promise under test is the contract's "the user's working tree and current branch are never
touched": every test that writes through gitops compares the user's HEAD, branch, index file and
`git status` before and after.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from looptree.engine.errors import GitError
from looptree.engine.vcs import gitops


def user_view(repo: Path, git_run) -> tuple[str, str, str, bytes]:
    """What the user would notice changing: HEAD, the branch, `git status`, the index's bytes."""
    index = repo / ".git" / "index"
    return (git_run(repo, "rev-parse", "HEAD").strip(), git_run(repo, "symbolic-ref", "HEAD").strip(),
            git_run(repo, "status", "--porcelain", "--untracked-files=all"),
            index.read_bytes() if index.exists() else b"")


def tree_files(repo: Path, git_run, commit: str) -> dict[str, str]:
    names = git_run(repo, "ls-tree", "-r", "--name-only", commit).split()
    return {n: git_run(repo, "show", f"{commit}:{n}") for n in names}


# ---------------------------------------------------------------------------- open_repo


async def test_open_repo_initialises_a_plain_directory(tmp_path: Path, git_run) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    repo = await gitops.open_repo(project)
    assert repo == gitops.Repo(project.resolve(), "")
    assert (project / ".git").is_dir()
    assert "/.looptree/" in (project / ".git" / "info" / "exclude").read_text().splitlines()
    (project / ".looptree" / "runs" / "1").mkdir(parents=True)
    (project / ".looptree" / "runs" / "1" / "events.jsonl").write_text("{}\n")
    assert git_run(project, "status", "--porcelain", "--untracked-files=all") == ""


async def test_open_repo_twice_adds_the_exclude_line_once(git_repo: Path) -> None:
    await gitops.open_repo(git_repo)
    await gitops.open_repo(git_repo)
    lines = (git_repo / ".git" / "info" / "exclude").read_text().splitlines()
    assert lines.count("/.looptree/") == 1


async def test_open_repo_keeps_the_users_exclude_lines(git_repo: Path) -> None:
    exclude = git_repo / ".git" / "info" / "exclude"
    exclude.write_text("*.log")  # no trailing newline
    await gitops.open_repo(git_repo)
    assert exclude.read_text().splitlines() == ["*.log", "/.looptree/"]


async def test_open_repo_without_create_refuses_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(GitError) as info:
        await gitops.open_repo(tmp_path, create=False)
    assert str(info.value) == f"{tmp_path.resolve()} is not inside a git repository"
    assert not (tmp_path / ".git").exists()


async def test_project_in_a_subdirectory_of_a_repository(git_repo: Path, git_run) -> None:
    sub = git_repo / "pkg" / "fast"
    sub.mkdir(parents=True)
    (sub / "solver.py").write_text("x = 1\n")
    repo = await gitops.open_repo(sub)
    assert repo.root == git_repo.resolve() and repo.prefix == "pkg/fast/"
    assert "/pkg/fast/.looptree/" in (git_repo / ".git" / "info" / "exclude").read_text().splitlines()
    (sub / ".looptree").mkdir()
    (sub / ".looptree" / "x").write_text("y")
    assert ".looptree" not in git_run(git_repo, "status", "--porcelain", "--untracked-files=all")
    assert repo.project_in(Path("/wt")) == Path("/wt/pkg/fast")
    assert repo.branch("3.1") == "looptree/3.1"


# ---------------------------------------------------------------------------- snapshot


async def test_snapshot_of_a_clean_tree_is_head(git_repo: Path, git_run) -> None:
    repo = await gitops.open_repo(git_repo)
    before = user_view(git_repo, git_run)
    assert await gitops.snapshot_working_tree(repo, "snap") == before[0]
    assert user_view(git_repo, git_run) == before


async def test_snapshot_takes_uncommitted_and_untracked_work_without_touching_it(git_repo: Path, git_run) -> None:
    (git_repo / ".gitignore").write_text("*.tmp\n")
    git_run(git_repo, "add", ".gitignore")
    git_run(git_repo, "commit", "-q", "-m", "ignore tmp")
    (git_repo / "solver.py").write_text("def solve(xs):\n    return 0  # uncommitted\n")  # modified, unstaged
    (git_repo / "staged.py").write_text("staged = True\n")
    git_run(git_repo, "add", "staged.py")  # staged, uncommitted
    (git_repo / "notes").mkdir()
    (git_repo / "notes" / "new.py").write_text("new = 1\n")  # untracked
    (git_repo / "scratch.tmp").write_text("ignored\n")  # ignored
    (git_repo / "bench.py").unlink()  # deleted, unstaged
    repo = await gitops.open_repo(git_repo)
    (git_repo / ".looptree").mkdir()
    (git_repo / ".looptree" / "state").write_text("not part of the project\n")
    before = user_view(git_repo, git_run)

    snap = await gitops.snapshot_working_tree(repo, "looptree: baseline")

    assert user_view(git_repo, git_run) == before
    assert (git_repo / "solver.py").read_text().endswith("# uncommitted\n")
    files = tree_files(git_repo, git_run, snap)
    assert set(files) == {".gitignore", "solver.py", "staged.py", "notes/new.py"}
    assert files["solver.py"].endswith("# uncommitted\n")
    assert git_run(git_repo, "rev-parse", f"{snap}^").strip() == before[0]
    assert git_run(git_repo, "log", "-1", "--format=%s|%an", snap).strip() == "looptree: baseline|looptree"


async def test_snapshot_of_a_repository_without_commits(tmp_path: Path, git_run) -> None:
    (tmp_path / "solver.py").write_text("x = 1\n")
    repo = await gitops.open_repo(tmp_path)
    snap = await gitops.snapshot_working_tree(repo, "first")
    assert tree_files(tmp_path, git_run, snap) == {"solver.py": "x = 1\n"}
    assert git_run(tmp_path, "rev-list", "--parents", "-n", "1", snap).split() == [snap]  # no parent
    assert git_run(tmp_path, "status", "--porcelain") == "?? solver.py\n"  # the user's index is still empty


# ---------------------------------------------------------------------------- worktrees, commits, branches


async def test_worktree_commit_branch_and_remove(git_repo: Path, git_run, tmp_path: Path) -> None:
    repo = await gitops.open_repo(git_repo)
    base = await gitops.snapshot_working_tree(repo, "snap")
    before = user_view(git_repo, git_run)
    assert await gitops.set_branch(repo, "1", base) == "looptree/1"

    wt = git_repo / ".looptree" / "runs" / "1" / "worktrees" / "1.1"
    await gitops.add_worktree(repo, wt, base)
    assert (wt / "solver.py").read_text() == (git_repo / "solver.py").read_text()
    (wt / "solver.py").write_text("def solve(xs):\n    return sum(xs) * 1\n")
    (wt / "helper.py").write_text("h = 2\n")
    commit = await gitops.commit_worktree(wt, ["solver.py", "helper.py"], "1.1: multiply by one")
    assert await gitops.set_branch(repo, "1.1", commit) == "looptree/1.1"

    assert git_run(git_repo, "rev-parse", "looptree/1.1").strip() == commit
    assert git_run(git_repo, "rev-parse", "looptree/1").strip() == base
    assert git_run(git_repo, "rev-parse", f"{commit}^").strip() == base
    assert await gitops.changed_paths(repo, base, commit) == ["helper.py", "solver.py"]
    patch = await gitops.diff(repo, "looptree/1", "looptree/1.1")
    assert "+    return sum(xs) * 1" in patch and "+h = 2" in patch
    assert "solver.py" in await gitops.diff(repo, base, commit, stat=True)
    assert await gitops.resolve_ref(repo, "looptree/1.1") == commit
    assert user_view(git_repo, git_run) == before  # the user's checkout saw none of it

    await gitops.remove_worktree(repo, wt)
    assert not wt.exists()
    assert str(wt) not in git_run(git_repo, "worktree", "list", "--porcelain")
    assert git_run(git_repo, "rev-parse", "looptree/1.1").strip() == commit  # the branch outlives the worktree


async def test_commit_stages_only_the_named_files(git_repo: Path, git_run) -> None:
    repo = await gitops.open_repo(git_repo)
    base = await gitops.snapshot_working_tree(repo, "snap")
    wt = git_repo.parent / "wt"
    await gitops.add_worktree(repo, wt, base)
    (wt / "solver.py").write_text("changed\n")
    (wt / "stray.txt").write_text("left by a build\n")
    commit = await gitops.commit_worktree(wt, ["solver.py"], "only solver")
    assert await gitops.changed_paths(repo, base, commit) == ["solver.py"]
    empty = await gitops.commit_worktree(wt, [], "nothing")  # --allow-empty: a no-op reply still gets a node
    assert await gitops.changed_paths(repo, commit, empty) == []
    await gitops.remove_worktree(repo, wt)


async def test_add_worktree_replaces_a_leftover(git_repo: Path) -> None:
    repo = await gitops.open_repo(git_repo)
    base = await gitops.snapshot_working_tree(repo, "snap")
    wt = git_repo.parent / "wt"
    await gitops.add_worktree(repo, wt, base)
    (wt / "solver.py").write_text("half-done edit\n")
    await gitops.add_worktree(repo, wt, base)  # a resume re-creates the node's worktree
    assert (wt / "solver.py").read_text() == (git_repo / "solver.py").read_text()
    await gitops.remove_worktree(repo, wt)


async def test_remove_tolerates_a_half_gone_worktree(git_repo: Path, git_run) -> None:
    repo = await gitops.open_repo(git_repo)
    base = await gitops.snapshot_working_tree(repo, "snap")
    wt = git_repo.parent / "wt"
    await gitops.add_worktree(repo, wt, base)
    (wt / ".git").unlink()  # crash mid-remove: git no longer recognises the directory
    await gitops.remove_worktree(repo, wt)
    assert not wt.exists()
    await gitops.remove_worktree(repo, wt)  # and a second remove is a no-op
    assert git_run(git_repo, "worktree", "list", "--porcelain").count("worktree ") == 1


async def test_prune_worktrees_removes_every_leftover(git_repo: Path, git_run) -> None:
    repo = await gitops.open_repo(git_repo)
    base = await gitops.snapshot_working_tree(repo, "snap")
    root = git_repo / ".looptree" / "runs" / "1" / "worktrees"
    for node in ("1.1", "1.2"):
        await gitops.add_worktree(repo, root / node, base)
    assert await gitops.prune_worktrees(repo, root) == 2
    assert list(root.iterdir()) == []
    assert git_run(git_repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert await gitops.prune_worktrees(repo, git_repo / "nowhere") == 0


async def test_project_in_a_subdirectory_gets_whole_repo_worktrees(git_repo: Path) -> None:
    sub = git_repo / "pkg"
    sub.mkdir()
    (sub / "kernel.py").write_text("k = 1\n")
    repo = await gitops.open_repo(sub)
    base = await gitops.snapshot_working_tree(repo, "snap")
    wt = git_repo.parent / "wt"
    await gitops.add_worktree(repo, wt, base)
    project = repo.project_in(wt)
    assert (project / "kernel.py").read_text() == "k = 1\n"
    (project / "kernel.py").write_text("k = 2\n")
    commit = await gitops.commit_worktree(wt, ["pkg/kernel.py"], "k")
    assert await gitops.changed_paths(repo, base, commit) == ["pkg/kernel.py"]
    await gitops.remove_worktree(repo, wt)


# ---------------------------------------------------------------------------- hooks, identity, errors


def install_hook(hooks_dir: Path, name: str, body: str) -> None:
    hooks_dir.mkdir(parents=True, exist_ok=True)
    hook = hooks_dir / name
    hook.write_text("#!/bin/sh\n" + body + "\n")
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


async def test_the_users_commit_hooks_are_not_run(git_repo: Path, git_run, tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    for hooks in (git_repo / ".git" / "hooks", tmp_path / "my-hooks"):
        install_hook(hooks, "pre-commit", f"echo pre >> {marker}; exit 1")
        install_hook(hooks, "commit-msg", f"echo msg >> {marker}; exit 1")
        install_hook(hooks, "post-commit", f"echo post >> {marker}")
    # The hooks really are live for the user's own commits...
    (git_repo / "solver.py").write_text("changed\n")
    git_run(git_repo, "add", "solver.py")
    with pytest.raises(Exception):
        git_run(git_repo, "commit", "-q", "-m", "user commit")
    assert marker.read_text() == "pre\n"
    marker.unlink()
    git_run(git_repo, "config", "core.hooksPath", str(tmp_path / "my-hooks"))  # ...and from a configured path too
    # ...but never for looptree's.
    repo = await gitops.open_repo(git_repo)
    base = await gitops.snapshot_working_tree(repo, "snap")
    wt = tmp_path / "wt"
    await gitops.add_worktree(repo, wt, base)
    (wt / "solver.py").write_text("agent change\n")
    commit = await gitops.commit_worktree(wt, ["solver.py"], "agent")
    assert not marker.exists()
    assert git_run(git_repo, "show", f"{commit}:solver.py") == "agent change\n"
    await gitops.remove_worktree(repo, wt)


async def test_commits_use_looptrees_identity_whatever_the_environment(git_repo: Path, git_run, monkeypatch) -> None:
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Someone Else")
    monkeypatch.setenv("GIT_DIR", "/nonexistent")  # a stray GIT_DIR must not redirect gitops
    repo = await gitops.open_repo(git_repo)
    (git_repo / "solver.py").write_text("dirty\n")
    snap = await gitops.snapshot_working_tree(repo, "snap")
    monkeypatch.delenv("GIT_DIR")
    assert git_run(git_repo, "log", "-1", "--format=%an <%ae>|%cn", snap).strip() == "looptree <looptree@localhost>|looptree"


async def test_unknown_ref_is_a_one_line_error(git_repo: Path) -> None:
    repo = await gitops.open_repo(git_repo)
    with pytest.raises(GitError) as info:
        await gitops.resolve_ref(repo, "looptree/9.9")
    assert str(info.value) == "unknown git ref or node 'looptree/9.9'"


async def test_failing_git_command_reports_gits_first_error_line(git_repo: Path) -> None:
    with pytest.raises(GitError) as info:
        await gitops.git("rev-parse", "--verify", "no-such-branch", cwd=git_repo)
    message = str(info.value)
    assert message.startswith("git rev-parse failed: ") and "\n" not in message
    assert await gitops.git("rev-parse", "--verify", "-q", "no-such-branch", cwd=git_repo, check=False) == ""


async def test_head_commit(git_repo: Path, git_run, tmp_path: Path) -> None:
    assert await gitops.head_commit(await gitops.open_repo(git_repo)) == git_run(git_repo, "rev-parse", "HEAD").strip()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert await gitops.head_commit(await gitops.open_repo(empty)) is None
    assert os.listdir(empty) == [".git"]
