"""AccessPolicy: classification, every refusal of resolve_for_edit, listings for prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from looptree.engine.edits.access import AccessPolicy
from looptree.engine.errors import ConfigError, EditRejected


def make_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.fixture
def policy() -> AccessPolicy:
    return AccessPolicy(
        writable=["solver.py", "kernels/**/*.py", "lib/"],
        readonly=["bench.py", "tests/**"],
        hidden=["secrets/**", "kernels/private_*.py"],
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    make_tree(tmp_path, {
        "solver.py": "def solve(): pass\n",
        "bench.py": "print('bench')\n",
        "notes.txt": "notes\n",
        "kernels/a.py": "A = 1\n",
        "kernels/deep/b.py": "B = 2\n",
        "kernels/private_key.py": "SECRET = 'hunter2'\n",
        "kernels/readme.md": "doc\n",
        "tests/test_x.py": "def test(): pass\n",
        "tests/.fixture": "data\n",
        "secrets/token.txt": "TOPSECRET\n",
        "secrets/.env": "KEY=1\n",
        "lib/util.py": "u = 1\n",
        ".git/config": "[core]\n",
        ".looptree/runs/1/events.jsonl": "{}\n",
    })
    return tmp_path


# ---- classify ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rel, kind", [
    ("solver.py", "writable"),
    ("./solver.py", "writable"),
    ("sub/solver.py", "outside"),          # anchored at the root
    ("kernels/a.py", "writable"),
    ("kernels/x/y/z.py", "writable"),      # ** spans segments
    ("kernels/a.cu", "outside"),
    ("kernels/private_key.py", "hidden"),  # writable and hidden: hidden wins
    ("bench.py", "readonly"),
    ("tests/test_x.py", "readonly"),
    ("tests/.fixture", "readonly"),        # readonly globs match dot-files
    ("secrets/token.txt", "hidden"),
    ("secrets/.env", "hidden"),            # hidden globs match dot-files
    ("lib/util.py", "writable"),           # trailing '/' means the whole directory
    ("lib/a/b/c.txt", "writable"),
    (".git/config", "hidden"),
    (".looptree/runs/1/events.jsonl", "hidden"),
    ("sub/.git/HEAD", "hidden"),
    ("notes.txt", "outside"),
    ("../solver.py", "outside"),
    ("/etc/passwd", "outside"),
    ("", "outside"),
])
def test_classify(policy: AccessPolicy, rel: str, kind: str) -> None:
    assert policy.classify(rel) == kind


def test_readonly_beats_writable() -> None:
    pol = AccessPolicy(writable=["**/*.py"], readonly=["bench.py"], hidden=[])
    assert pol.classify("bench.py") == "readonly"
    assert pol.classify("x/y.py") == "writable"


def test_writable_globs_skip_dot_directories() -> None:
    pol = AccessPolicy(writable=["**/*.py", ".tools/*.py"], readonly=[], hidden=[])
    assert pol.classify(".venv/lib/site.py") == "outside"
    assert pol.classify(".tools/gen.py") == "writable"  # named explicitly


def test_literal_pattern_covers_a_directory() -> None:
    pol = AccessPolicy(writable=["src"], readonly=[], hidden=["src/keys"])
    assert pol.classify("src/a/b.py") == "writable"
    assert pol.classify("src/keys/k.pem") == "hidden"
    assert pol.classify("srcx/a.py") == "outside"


def test_brace_patterns() -> None:
    pol = AccessPolicy(writable=["{solver,helper}.py"], readonly=[], hidden=[])
    assert pol.classify("helper.py") == "writable"
    assert pol.classify("other.py") == "outside"


@pytest.mark.parametrize("bad", ["", "  ", "../x.py", "a/../../x", "a\\b.py"])
def test_bad_patterns_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        AccessPolicy(writable=[bad], readonly=[], hidden=[])


# ---- resolve_for_edit: accepted -------------------------------------------------------------------
def test_resolve_existing_writable(policy: AccessPolicy, project: Path) -> None:
    assert policy.resolve_for_edit(project, "solver.py") == (project / "solver.py").resolve()
    assert policy.resolve_for_edit(project, "./kernels/deep/b.py") == (project / "kernels/deep/b.py").resolve()


def test_resolve_new_file_matching_writable(policy: AccessPolicy, project: Path) -> None:
    p = policy.resolve_for_edit(project, "kernels/new/fast.py")
    assert p == (project / "kernels/new/fast.py").resolve()
    assert not p.exists()


def test_symlink_inside_root_to_writable_file_resolves_to_target(policy: AccessPolicy, project: Path) -> None:
    (project / "kernels/link.py").symlink_to(project / "kernels/a.py")
    assert policy.resolve_for_edit(project, "kernels/link.py") == (project / "kernels/a.py").resolve()


# ---- resolve_for_edit: every refusal ----------------------------------------------------------------
def reason(policy: AccessPolicy, root: Path, rel: str) -> str:
    with pytest.raises(EditRejected) as ei:
        policy.resolve_for_edit(root, rel)
    return str(ei.value)


def test_refuse_readonly(policy: AccessPolicy, project: Path) -> None:
    assert reason(policy, project, "bench.py") == "bench.py is read-only"
    assert "tests/test_x.py is read-only" in reason(policy, project, "tests/test_x.py")


def test_refuse_hidden_without_leaking(policy: AccessPolicy, project: Path) -> None:
    msg = reason(policy, project, "secrets/token.txt")
    assert "secrets/token.txt" in msg and "off limits" in msg
    assert "TOPSECRET" not in msg
    msg = reason(policy, project, "kernels/private_key.py")
    assert "off limits" in msg and "hunter2" not in msg


def test_refuse_outside_lists_writable_patterns(policy: AccessPolicy, project: Path) -> None:
    msg = reason(policy, project, "notes.txt")
    assert msg == "notes.txt is not writable; writable: solver.py, kernels/**/*.py, lib/"
    assert "kernels/a.cu is not writable" in reason(policy, project, "kernels/a.cu")


def test_refuse_absolute(policy: AccessPolicy, project: Path) -> None:
    msg = reason(policy, project, str(project / "solver.py"))
    assert "absolute path" in msg and str(project / "solver.py") in msg
    assert "absolute path" in reason(policy, project, "C:/x/solver.py")


@pytest.mark.parametrize("rel", ["../solver.py", "kernels/../../etc/passwd", "kernels/../solver.py", ".."])
def test_refuse_dotdot(policy: AccessPolicy, project: Path, rel: str) -> None:
    msg = reason(policy, project, rel)
    assert "'..'" in msg and rel in msg


def test_refuse_backslash_and_nul(policy: AccessPolicy, project: Path) -> None:
    assert "backslash" in reason(policy, project, "kernels\\a.py")
    assert "NUL" in reason(policy, project, "solver.py\x00.txt")
    assert "empty path" in reason(policy, project, "")


@pytest.mark.parametrize("rel", [".git/config", ".git/hooks/pre-commit", ".looptree/runs/1/events.jsonl",
                                 "kernels/.git/HEAD"])
def test_refuse_git_and_looptree_even_if_writable(project: Path, rel: str) -> None:
    pol = AccessPolicy(writable=["**", ".git/**", ".looptree/**", "kernels/**"], readonly=[], hidden=[])
    msg = reason(pol, project, rel)
    assert "off limits" in msg and rel in msg


def test_refuse_symlink_file_pointing_outside(policy: AccessPolicy, project: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "victim.py"
    outside.write_text("x = 1\n")
    (project / "kernels/evil.py").symlink_to(outside)
    msg = reason(policy, project, "kernels/evil.py")
    assert "kernels/evil.py" in msg and "outside the project" in msg


def test_refuse_symlinked_parent_dir_pointing_outside(policy: AccessPolicy, project: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere2")
    (project / "kernels/ext").symlink_to(outside, target_is_directory=True)
    msg = reason(policy, project, "kernels/ext/new.py")  # a new file under the escaping dir
    assert "kernels/ext" in msg and "outside the project" in msg
    assert not (outside / "new.py").exists()


def test_refuse_symlink_to_readonly_file(policy: AccessPolicy, project: Path) -> None:
    (project / "kernels/sneaky.py").symlink_to(project / "bench.py")
    msg = reason(policy, project, "kernels/sneaky.py")
    assert "kernels/sneaky.py" in msg and "bench.py" in msg and "read-only" in msg


def test_refuse_symlink_to_hidden_file(policy: AccessPolicy, project: Path) -> None:
    (project / "kernels/peek.py").symlink_to(project / "secrets/token.txt")
    msg = reason(policy, project, "kernels/peek.py")
    assert "off limits" in msg and "TOPSECRET" not in msg


def test_refuse_symlink_into_git(policy: AccessPolicy, project: Path) -> None:
    (project / "kernels/cfg.py").symlink_to(project / ".git/config")
    assert "off limits" in reason(policy, project, "kernels/cfg.py")


def test_refuse_symlinked_dir_to_readonly_dir(policy: AccessPolicy, project: Path) -> None:
    (project / "kernels/t").symlink_to(project / "tests", target_is_directory=True)
    msg = reason(policy, project, "kernels/t/test_x.py")
    assert "read-only" in msg


def test_refuse_directory(project: Path) -> None:
    pol = AccessPolicy(writable=["kernels/**"], readonly=[], hidden=[])
    assert "is a directory" in reason(pol, project, "kernels/deep")


def test_refuse_file_used_as_directory(project: Path) -> None:
    pol = AccessPolicy(writable=["solver.py/**", "solver.py"], readonly=[], hidden=[])
    assert "not a directory" in reason(pol, project, "solver.py/x.py")


# ---- listings ---------------------------------------------------------------------------------------
def test_visible_files(policy: AccessPolicy, project: Path, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("far") / "x.py"
    outside.write_text("x\n")
    (project / "kernels/out.py").symlink_to(outside)                       # escapes: not listed
    (project / "kernels/ro.py").symlink_to(project / "bench.py")           # stricter kind wins
    (project / "kernels/hid.py").symlink_to(project / "secrets/token.txt")  # hidden target
    vis = policy.visible_files(project)
    assert vis == {
        "bench.py": "readonly",
        "kernels/a.py": "writable",
        "kernels/deep/b.py": "writable",
        "kernels/ro.py": "readonly",
        "lib/util.py": "writable",
        "solver.py": "writable",
        "tests/.fixture": "readonly",
        "tests/test_x.py": "readonly",
    }


def test_visible_files_never_lists_git_or_looptree(project: Path) -> None:
    pol = AccessPolicy(writable=["**"], readonly=[], hidden=[])
    vis = pol.visible_files(project)
    assert not any(k.startswith((".git/", ".looptree/")) for k in vis)
    assert "solver.py" in vis and "notes.txt" in vis


def test_unmatched_patterns(project: Path) -> None:
    pol = AccessPolicy(writable=["solver.py", "kernels/**/*.py", "solvr.py", "src/**/*.cu", "lib/"],
                       readonly=[], hidden=[])
    assert pol.unmatched_patterns(project) == ["solvr.py", "src/**/*.cu"]


def test_unmatched_ignores_git_contents(project: Path) -> None:
    pol = AccessPolicy(writable=[".git/config", "*.py"], readonly=[], hidden=[])
    assert pol.unmatched_patterns(project) == [".git/config"]


def test_walk_pruning_only_skips_unreachable_directories() -> None:
    """Tree walks skip directories no pattern can reach (.venv, build dirs) but nothing else."""
    from looptree.engine.edits.access import _PatternSet

    ps = _PatternSet(["solver.py", "kernels/**/*.py", "src/*/x.py", "lib"], dotglob=False)
    assert ps.may_match_under("kernels")
    assert ps.may_match_under("kernels/a/b/c")
    assert ps.may_match_under("src/a")
    assert not ps.may_match_under("src/a/b")      # 'src/*/x.py' is only two levels deep
    assert ps.may_match_under("lib/sub")
    assert not ps.may_match_under("build")
    assert not ps.may_match_under("kernels/.cache")  # '**' does not enter dot dirs here
    dot = _PatternSet(["**/*.key"], dotglob=True)
    assert dot.may_match_under(".ssh")


# ---------------------------------------------------------------------------- hidden files in worktrees


def test_hidden_files_needed_ones_and_dropping_the_rest(tmp_path: Path) -> None:
    for rel in ("solver.py", "bench.py", "hidden/holdout.json", "hidden/notes/.answers", "secrets.env"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / ".git").write_text("gitdir: elsewhere\n")  # a worktree's .git file is not a hidden file
    pol = AccessPolicy(writable=["solver.py"], readonly=["bench.py"], hidden=["hidden/", "secrets.env"],
                       hidden_needed=["hidden/holdout.json"])
    assert sorted(pol.hidden_files(tmp_path)) == ["hidden/holdout.json", "hidden/notes/.answers", "secrets.env"]
    assert pol.unmatched_needed(tmp_path) == []
    assert sorted(pol.drop_hidden(tmp_path)) == ["hidden/notes/.answers", "secrets.env"]
    assert (tmp_path / "hidden/holdout.json").exists() and not (tmp_path / "secrets.env").exists()
    assert (tmp_path / ".git").exists() and (tmp_path / "solver.py").exists()
    assert pol.has_writable_file(tmp_path)
    assert AccessPolicy(["solver.py"], [], ["hidden/"], ["solver.py"]).unmatched_needed(tmp_path) == ["solver.py"]
    assert not AccessPolicy(["*.py"], ["*.py"], []).has_writable_file(tmp_path)
