"""Parsing change replies and applying their edits all-or-nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from looptree.engine.edits.access import AccessPolicy
from looptree.engine.edits.blocks import (
    EditBlock,
    UnifiedDiff,
    WholeFile,
    apply_edits,
    parse_change_reply,
)
from looptree.engine.errors import EditError, EditParseError, EditRejected, SearchNotFound

SOLVER = """\
def solve(xs):
    total = 0
    for i in range(len(xs)):
        total += xs[i]
    return total
"""

BLOCK = """\
<<<<<<< SEARCH
    for i in range(len(xs)):
        total += xs[i]
=======
    total = sum(xs)
>>>>>>> REPLACE
"""


def reply(*parts: str) -> str:
    return "\n".join(parts)


@pytest.fixture
def policy() -> AccessPolicy:
    return AccessPolicy(writable=["solver.py", "kernels/**/*.py", "docs/*.md"], readonly=["bench.py"],
                        hidden=["secrets/**"])


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "solver.py").write_text(SOLVER)
    (tmp_path / "bench.py").write_text("print('bench')\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels/a.py").write_text("A = 1\nB = 2\n")
    return tmp_path


def run(root: Path, policy: AccessPolicy, text: str):
    return apply_edits(root, parse_change_reply(text).edits, policy)


# =================================================================================================
# Parsing
# =================================================================================================
def test_plain_block() -> None:
    r = parse_change_reply(reply("Use the builtin sum.", "", "solver.py", BLOCK))
    assert r.description == "Use the builtin sum."
    assert r.edits == [EditBlock("solver.py", "    for i in range(len(xs)):\n        total += xs[i]\n",
                                 "    total = sum(xs)\n")]


@pytest.mark.parametrize("path_line", [
    "solver.py", "`solver.py`", "**solver.py**", "**`solver.py`**", "File: solver.py", "file: `solver.py`",
    "### solver.py", "## File: solver.py", "**File:** `solver.py`", "solver.py:", "./solver.py",
])
def test_path_line_styles(path_line: str) -> None:
    r = parse_change_reply(reply("Desc.", "", path_line, "```python", BLOCK, "```"))
    assert [e.path for e in r.edits] == ["solver.py"]


def test_path_as_fence_first_line() -> None:
    r = parse_change_reply(reply("Desc.", "", "```python", "solver.py", BLOCK, "```"))
    assert [e.path for e in r.edits] == ["solver.py"]


def test_path_in_fence_info() -> None:
    r = parse_change_reply(reply("Desc.", "", "```python:kernels/a.py", BLOCK, "```"))
    assert [e.path for e in r.edits] == ["kernels/a.py"]


def test_path_before_fence_with_blank_line() -> None:
    r = parse_change_reply(reply("Desc.", "", "solver.py", "", "```", BLOCK, "```"))
    assert r.edits[0].path == "solver.py"


def test_several_blocks_after_one_path_and_several_files() -> None:
    text = reply(
        "Two files.", "", "solver.py", "```python", BLOCK,
        "<<<<<<< SEARCH", "    return total", "=======", "    return int(total)", ">>>>>>> REPLACE", "```",
        "", "Then the kernel:", "", "kernels/a.py", "```python",
        "<<<<<<< SEARCH", "A = 1", "=======", "A = 3", ">>>>>>> REPLACE", "```",
    )
    r = parse_change_reply(text)
    assert [(e.path, e.replace) for e in r.edits] == [
        ("solver.py", "    total = sum(xs)\n"),
        ("solver.py", "    return int(total)\n"),
        ("kernels/a.py", "A = 3\n"),
    ]


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9])
def test_marker_drift(n: int) -> None:
    text = reply("Desc.", "", "solver.py", "<" * n + " SEARCH", "a", "=" * n, "b", ">" * n + " REPLACE")
    assert parse_change_reply(text).edits == [EditBlock("solver.py", "a\n", "b\n")]


def test_four_markers_are_not_blocks() -> None:
    with pytest.raises(EditParseError, match="no edit blocks"):
        parse_change_reply(reply("Desc.", "solver.py", "<<<< SEARCH", "a", "====", "b", ">>>> REPLACE"))


def test_empty_search_and_empty_replace_are_distinct_from_blank_lines() -> None:
    r = parse_change_reply(reply("solver.py", "<<<<<<< SEARCH", "=======", "", ">>>>>>> REPLACE",
                                 "<<<<<<< SEARCH", "x", "=======", ">>>>>>> REPLACE"))
    assert r.edits == [EditBlock("solver.py", "", "\n"), EditBlock("solver.py", "x\n", "")]


def test_new_file_block() -> None:
    r = parse_change_reply(reply("Add a kernel.", "", "kernels/fast.py", "```python", "<<<<<<< SEARCH", "=======",
                                 "def fast(): return 1", ">>>>>>> REPLACE", "```"))
    assert r.edits == [EditBlock("kernels/fast.py", "", "def fast(): return 1\n")]


def test_fences_inside_search_content_do_not_close_the_fence() -> None:
    text = reply("Docs.", "", "docs/a.md", "````markdown", "<<<<<<< SEARCH", "```", "old", "```", "=======",
                 "```", "new", "```", ">>>>>>> REPLACE", "````")
    assert parse_change_reply(text).edits == [EditBlock("docs/a.md", "```\nold\n```\n", "```\nnew\n```\n")]


def test_whole_file() -> None:
    r = parse_change_reply(reply("Rewrite.", "", "solver.py", "```python", "def solve(xs):", "    return sum(xs)",
                                 "```"))
    assert r.edits == [WholeFile("solver.py", "def solve(xs):\n    return sum(xs)\n")]


def test_whole_file_with_path_as_first_line() -> None:
    r = parse_change_reply(reply("Rewrite.", "", "```python", "# solver.py", "X = 1", "```"))
    assert r.edits == [WholeFile("solver.py", "X = 1\n")]


def test_whole_file_too_long() -> None:
    body = [f"x{i} = {i}" for i in range(401)]
    with pytest.raises(EditParseError, match="401 lines; the limit is 400"):
        parse_change_reply(reply("Big.", "", "solver.py", "```python", *body, "```"))
    ok = parse_change_reply(reply("Big.", "", "solver.py", "```python", *body[:400], "```"))
    assert isinstance(ok.edits[0], WholeFile)


def test_whole_file_that_elides_code_is_refused() -> None:
    with pytest.raises(EditParseError, match="elides code"):
        parse_change_reply(reply("Lazy.", "", "solver.py", "```python", "def f():",
                                 "    # ... rest of the code unchanged", "```"))


def test_replace_that_elides_code_is_refused() -> None:
    text = reply("solver.py", "<<<<<<< SEARCH", "def solve(xs):", "    total = 0", "=======", "def solve(xs):",
                 "    # ... existing code ...", ">>>>>>> REPLACE")
    with pytest.raises(EditParseError, match=r"solver\.py starting at line 2 elides code at line 7"):
        parse_change_reply(text)
    # the same comment kept from SEARCH is fine
    same = reply("solver.py", "<<<<<<< SEARCH", "    # ... rest unchanged", "=======", "    # ... rest unchanged",
                 "    x = 1", ">>>>>>> REPLACE")
    assert len(parse_change_reply(same).edits) == 1


def test_prose_code_fence_is_not_an_edit() -> None:
    text = reply("Idea: vectorize.", "", "For example:", "```python", "total = sum(xs)", "```", "", "solver.py",
                 BLOCK)
    r = parse_change_reply(text)
    assert len(r.edits) == 1 and isinstance(r.edits[0], EditBlock)


def test_unified_diff_fenced() -> None:
    text = reply("Use sum.", "", "```diff", "--- a/solver.py", "+++ b/solver.py", "@@ -2,4 +2,2 @@",
                 "     total = 0", "-    for i in range(len(xs)):", "-        total += xs[i]", "+    total = sum(xs)",
                 "     return total", "```")
    r = parse_change_reply(text)
    assert r.description == "Use sum."
    assert len(r.edits) == 1 and isinstance(r.edits[0], UnifiedDiff)
    assert r.edits[0].path == "solver.py"
    assert r.edits[0].hunks_text.startswith("@@ -2,4 +2,2 @@\n     total = 0\n")


def test_unified_diff_unfenced_two_files_and_new_file() -> None:
    text = reply("Two changes.", "", "diff --git a/solver.py b/solver.py", "index 1..2 100644",
                 "--- a/solver.py", "+++ b/solver.py", "@@ -1 +1 @@", "-def solve(xs):", "+def solve(xs: list):",
                 "--- /dev/null", "+++ b/kernels/n.py", "@@ -0,0 +1,2 @@", "+N = 1", "+M = 2", "", "That's all.")
    r = parse_change_reply(text)
    assert r.edits[0] == UnifiedDiff("solver.py", "@@ -1 +1 @@\n-def solve(xs):\n+def solve(xs: list):\n")
    assert r.edits[1] == EditBlock("kernels/n.py", "", "N = 1\nM = 2\n")


def test_diff_fence_without_headers_uses_path_line() -> None:
    r = parse_change_reply(reply("Fix.", "", "kernels/a.py", "```diff", "@@ -1 +1 @@", "-A = 1", "+A = 5", "```"))
    assert r.edits == [UnifiedDiff("kernels/a.py", "@@ -1 +1 @@\n-A = 1\n+A = 5\n")]


def test_diff_deleting_a_file_is_refused() -> None:
    with pytest.raises(EditParseError, match="deleting files is not supported"):
        parse_change_reply(reply("Rm.", "--- a/solver.py", "+++ /dev/null", "@@ -1 +0,0 @@", "-x"))


def test_no_edits() -> None:
    with pytest.raises(EditParseError, match="^the reply contains no edit blocks"):
        parse_change_reply("I think we should use sum() in solver.py.\n\n```python\ntotal = sum(xs)\n```\n")


def test_unterminated_block_names_file_and_line() -> None:
    text = reply("Desc.", "", "solver.py", "<<<<<<< SEARCH", "a", "=======", "b")
    with pytest.raises(EditParseError, match=r"unterminated edit block for solver\.py starting at line 4"):
        parse_change_reply(text)
    with pytest.raises(EditParseError, match=r"solver\.py starting at line 2.*no ======="):
        parse_change_reply(reply("solver.py", "<<<<<<< SEARCH", "a"))


def test_unterminated_whole_file_fence() -> None:
    with pytest.raises(EditParseError, match=r"code block for solver\.py opened at line 3 is never closed"):
        parse_change_reply(reply("Desc.", "solver.py", "```python", "x = 1"))


def test_block_without_any_path() -> None:
    with pytest.raises(EditParseError, match="line 3: edit block names no file"):
        parse_change_reply(reply("Desc.", "", "<<<<<<< SEARCH", "a", "=======", "b", ">>>>>>> REPLACE"))


def test_first_block_may_name_its_file_in_prose() -> None:
    r = parse_change_reply(reply("Vectorize.", "", "In `solver.py`:", "```python", BLOCK, "```"))
    assert r.description == "Vectorize." and r.edits[0].path == "solver.py"


def test_stray_replace_marker() -> None:
    with pytest.raises(EditParseError, match="line 3.*without a matching"):
        parse_change_reply(reply("solver.py", "a", ">>>>>>> REPLACE"))


def test_crlf_reply() -> None:
    r = parse_change_reply(reply("Desc.", "", "solver.py", BLOCK).replace("\n", "\r\n"))
    assert r.edits[0].replace == "    total = sum(xs)\n"


# ---- description ----------------------------------------------------------------------------------
def test_description_strips_heading_marks() -> None:
    r = parse_change_reply(reply("## Vectorize the loop", "", "Longer explanation.", "", "solver.py", BLOCK))
    assert r.description == "Vectorize the loop"


def test_description_skips_generic_heading_and_label() -> None:
    r = parse_change_reply(reply("### Description", "", "**Replace** the loop", "with sum().", "", "solver.py", BLOCK))
    assert r.description == "Replace the loop with sum()."
    r = parse_change_reply(reply("Description: cache the table.", "", "solver.py", BLOCK))
    assert r.description == "cache the table."


def test_description_is_capped() -> None:
    long = " ".join(["word"] * 200)
    r = parse_change_reply(reply(long, "", "solver.py", BLOCK))
    assert 50 < len(r.description) <= 300 and r.description.endswith("…")


def test_description_empty_when_reply_starts_with_edit() -> None:
    assert parse_change_reply(reply("solver.py", BLOCK, "", "Trailing prose.")).description == ""


# =================================================================================================
# Applying
# =================================================================================================
def test_apply_simple(root: Path, policy: AccessPolicy) -> None:
    res = run(root, policy, reply("Sum.", "", "solver.py", BLOCK))
    assert res.changed_files == ["solver.py"] and res.created_files == []
    assert (root / "solver.py").read_text() == "def solve(xs):\n    total = 0\n    total = sum(xs)\n    return total\n"


def test_sequential_blocks_apply_in_order(root: Path, policy: AccessPolicy) -> None:
    text = reply("solver.py", BLOCK, "<<<<<<< SEARCH", "    total = sum(xs)", "=======", "    total = sum(xs, 0)",
                 ">>>>>>> REPLACE")
    run(root, policy, text)
    assert "    total = sum(xs, 0)\n" in (root / "solver.py").read_text()


def test_all_or_nothing_second_block_does_not_match(root: Path, policy: AccessPolicy) -> None:
    text = reply("solver.py", BLOCK, "kernels/a.py", "<<<<<<< SEARCH", "C = 3", "=======", "C = 4",
                 ">>>>>>> REPLACE")
    with pytest.raises(SearchNotFound):
        run(root, policy, text)
    assert (root / "solver.py").read_text() == SOLVER
    assert (root / "kernels/a.py").read_text() == "A = 1\nB = 2\n"


def test_all_or_nothing_second_path_refused(root: Path, policy: AccessPolicy) -> None:
    text = reply("solver.py", BLOCK, "bench.py", "<<<<<<< SEARCH", "print('bench')", "=======", "print(0)",
                 ">>>>>>> REPLACE")
    with pytest.raises(EditRejected, match="bench.py is read-only"):
        run(root, policy, text)
    assert (root / "solver.py").read_text() == SOLVER
    assert (root / "bench.py").read_text() == "print('bench')\n"


def test_all_or_nothing_new_file_not_created(root: Path, policy: AccessPolicy) -> None:
    text = reply("kernels/sub/new.py", "<<<<<<< SEARCH", "=======", "N = 1", ">>>>>>> REPLACE",
                 "solver.py", "<<<<<<< SEARCH", "nope", "=======", "x", ">>>>>>> REPLACE")
    with pytest.raises(SearchNotFound):
        run(root, policy, text)
    assert not (root / "kernels/sub").exists()


@pytest.mark.parametrize("path", ["secrets/x.py", "../x.py", "/etc/passwd", ".git/config", "other.py"])
def test_refused_paths_write_nothing(root: Path, policy: AccessPolicy, path: str) -> None:
    with pytest.raises(EditRejected):
        apply_edits(root, [EditBlock(path, "", "x\n")], policy)
    assert sorted(p.name for p in root.iterdir()) == ["bench.py", "kernels", "solver.py"]


def test_ambiguous_search(root: Path, policy: AccessPolicy) -> None:
    (root / "solver.py").write_text("x = 1\ny = 2\nx = 1\nz = 3\nx = 1\n")
    with pytest.raises(EditError, match=r"matches 3 places \(lines 1, 3, 5\); add context lines") as ei:
        apply_edits(root, [EditBlock("solver.py", "x = 1\n", "x = 0\n")], policy)
    assert "solver.py" in str(ei.value)
    assert (root / "solver.py").read_text() == "x = 1\ny = 2\nx = 1\nz = 3\nx = 1\n"


def test_not_found_names_file_first_line_and_closest_region(root: Path, policy: AccessPolicy) -> None:
    wrong = EditBlock("solver.py", "    for j in range(len(xs)):\n        total += xs[j]\n", "pass\n")
    with pytest.raises(SearchNotFound) as ei:
        apply_edits(root, [wrong], policy)
    msg = str(ei.value)
    assert "solver.py" in msg
    assert "'for j in range(len(xs)):'" in msg
    assert "closest region is lines 3-4" in msg
    assert "  3 |     for i in range(len(xs)):" in msg
    assert "4 |         total += xs[i]" in msg
    assert "similarity 0.9" in msg


def test_not_found_in_a_long_file_is_fast_and_precise(root: Path, policy: AccessPolicy) -> None:
    import time

    body = "".join(f"    v{i} = f(x[{i}], {i * 7 % 13})  # step {i}\n" for i in range(5000))
    (root / "kernels/big.py").write_text(body)
    search = "".join(f"    v{i} = f(x[{i}], 99)  # step {i}\n" for i in range(3000, 3020))
    t0 = time.monotonic()
    with pytest.raises(SearchNotFound, match="closest region is lines 3001-3020") as ei:
        apply_edits(root, [EditBlock("kernels/big.py", search, "pass\n")], policy)
    assert time.monotonic() - t0 < 3.0
    assert "3001 |     v3000 = f(x[3000]" in str(ei.value)


def test_not_found_in_empty_file(root: Path, policy: AccessPolicy) -> None:
    (root / "kernels/empty.py").write_text("")
    with pytest.raises(SearchNotFound, match="kernels/empty.py is empty"):
        apply_edits(root, [EditBlock("kernels/empty.py", "x\n", "y\n")], policy)


def test_search_on_missing_file(root: Path, policy: AccessPolicy) -> None:
    with pytest.raises(SearchNotFound, match="kernels/nope.py does not exist"):
        apply_edits(root, [EditBlock("kernels/nope.py", "x\n", "y\n")], policy)


def test_empty_search_on_existing_file_is_refused(root: Path, policy: AccessPolicy) -> None:
    with pytest.raises(EditError, match="already exists"):
        apply_edits(root, [EditBlock("solver.py", "", "x\n")], policy)


def test_new_file_created(root: Path, policy: AccessPolicy) -> None:
    res = apply_edits(root, [EditBlock("kernels/deep/er/new.py", "", "N = 1\n")], policy)
    assert res.created_files == ["kernels/deep/er/new.py"] and res.changed_files == ["kernels/deep/er/new.py"]
    assert (root / "kernels/deep/er/new.py").read_text() == "N = 1\n"


def test_trailing_whitespace_tolerance(root: Path, policy: AccessPolicy) -> None:
    (root / "solver.py").write_text("a = 1   \nb = 2\t\nc = 3\n")
    apply_edits(root, [EditBlock("solver.py", "a = 1\nb = 2\n", "a = 10\n")], policy)
    assert (root / "solver.py").read_text() == "a = 10\nc = 3\n"


def test_crlf_file_matched_and_preserved(root: Path, policy: AccessPolicy) -> None:
    (root / "solver.py").write_bytes(b"a = 1\r\nb = 2\r\nc = 3\r\n")
    apply_edits(root, [EditBlock("solver.py", "b = 2\n", "b = 20\nb2 = 0\n")], policy)
    assert (root / "solver.py").read_bytes() == b"a = 1\r\nb = 20\r\nb2 = 0\r\nc = 3\r\n"


def test_indent_drift_search_less_indented(root: Path, policy: AccessPolicy) -> None:
    # the model dropped the 4-space function indent from both SEARCH and REPLACE
    block = EditBlock("solver.py", "for i in range(len(xs)):\n    total += xs[i]\n",
                      "for x in xs:\n    total += x\n")
    apply_edits(root, [block], policy)
    assert (root / "solver.py").read_text() == (
        "def solve(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n")


def test_indent_drift_search_more_indented(root: Path, policy: AccessPolicy) -> None:
    (root / "kernels/a.py").write_text("if x:\n  a = 1\n  b = 2\n")
    block = EditBlock("kernels/a.py", "      a = 1\n      b = 2\n", "      a = 1\n\n      c = 3\n")
    apply_edits(root, [block], policy)
    assert (root / "kernels/a.py").read_text() == "if x:\n  a = 1\n\n  c = 3\n"


def test_non_uniform_indent_is_not_matched(root: Path, policy: AccessPolicy) -> None:
    block = EditBlock("solver.py", "for i in range(len(xs)):\n        total += xs[i]\n", "x\n")
    with pytest.raises(SearchNotFound):
        apply_edits(root, [block], policy)


def test_blank_lines_at_block_edges_tolerated(root: Path, policy: AccessPolicy) -> None:
    block = EditBlock("kernels/a.py", "\nA = 1\n\n", "\nA = 7\n\n")
    apply_edits(root, [block], policy)
    assert (root / "kernels/a.py").read_text() == "A = 7\nB = 2\n"


def test_keeps_mode_and_missing_trailing_newline(root: Path, policy: AccessPolicy) -> None:
    f = root / "solver.py"
    f.write_text("a = 1\nb = 2")
    os.chmod(f, 0o755)
    apply_edits(root, [EditBlock("solver.py", "a = 1\n", "a = 3\n")], policy)
    assert f.read_text() == "a = 3\nb = 2"
    assert stat.S_IMODE(f.stat().st_mode) == 0o755


def test_whole_file_replace_keeps_trailing_newline_and_mode(root: Path, policy: AccessPolicy) -> None:
    f = root / "solver.py"
    os.chmod(f, 0o700)
    apply_edits(root, [WholeFile("solver.py", "def solve(xs):\n    return sum(xs)")], policy)
    assert f.read_text() == "def solve(xs):\n    return sum(xs)\n"
    assert stat.S_IMODE(f.stat().st_mode) == 0o700


def test_whole_file_creates(root: Path, policy: AccessPolicy) -> None:
    res = apply_edits(root, [WholeFile("kernels/w.py", "W = 1\n")], policy)
    assert res.created_files == ["kernels/w.py"]
    assert (root / "kernels/w.py").read_text() == "W = 1\n"


def test_no_op_edit_reports_no_change(root: Path, policy: AccessPolicy) -> None:
    res = apply_edits(root, [EditBlock("kernels/a.py", "A = 1\n", "A = 1\n")], policy)
    assert res.changed_files == [] and res.created_files == []


def test_hidden_file_edit_refused_without_leaking(root: Path, policy: AccessPolicy) -> None:
    (root / "secrets").mkdir()
    (root / "secrets/k.py").write_text("KEY = 'sesame'\n")
    with pytest.raises(EditRejected) as ei:
        apply_edits(root, [EditBlock("secrets/k.py", "KEY = 'x'\n", "KEY = 'y'\n")], policy)
    assert "off limits" in str(ei.value) and "sesame" not in str(ei.value)
    assert (root / "secrets/k.py").read_text() == "KEY = 'sesame'\n"


def test_edit_through_in_tree_symlink_writes_target(root: Path, policy: AccessPolicy) -> None:
    (root / "kernels/link.py").symlink_to(root / "kernels/a.py")
    res = apply_edits(root, [EditBlock("kernels/link.py", "A = 1\n", "A = 9\n")], policy)
    assert res.changed_files == ["kernels/a.py"]
    assert (root / "kernels/link.py").is_symlink()
    assert (root / "kernels/a.py").read_text() == "A = 9\nB = 2\n"


# ---- unified diffs ----------------------------------------------------------------------------------
def test_diff_applies_with_wrong_line_numbers(root: Path, policy: AccessPolicy) -> None:
    text = reply("Use sum.", "```diff", "--- a/solver.py", "+++ b/solver.py", "@@ -40,4 +40,2 @@",
                 "     total = 0", "-    for i in range(len(xs)):", "-        total += xs[i]", "+    total = sum(xs)",
                 "     return total", "```")
    res = run(root, policy, text)
    assert res.changed_files == ["solver.py"]
    assert (root / "solver.py").read_text() == "def solve(xs):\n    total = 0\n    total = sum(xs)\n    return total\n"


def test_diff_multiple_hunks_and_line_number_disambiguation(root: Path, policy: AccessPolicy) -> None:
    (root / "kernels/a.py").write_text("x = 1\ny = 1\nx = 1\ny = 1\nx = 1\nend\n")
    diff = UnifiedDiff("kernels/a.py",
                       "@@ -1,2 +1,2 @@\n-x = 1\n+x = 0\n y = 1\n@@ -5,2 +5,2 @@\n-x = 1\n+x = 5\n end\n")
    apply_edits(root, [diff], policy)
    assert (root / "kernels/a.py").read_text() == "x = 0\ny = 1\nx = 1\ny = 1\nx = 5\nend\n"


def test_diff_fuzz_drops_stale_context(root: Path, policy: AccessPolicy) -> None:
    diff = UnifiedDiff("solver.py", "@@ -3,3 +3,3 @@\n # a comment that is not there\n-        total += xs[i]\n"
                                    "+        total += 2 * xs[i]\n     return total\n")
    apply_edits(root, [diff], policy)
    assert "        total += 2 * xs[i]\n" in (root / "solver.py").read_text()


def test_diff_not_found(root: Path, policy: AccessPolicy) -> None:
    diff = UnifiedDiff("solver.py", "@@ -1,2 +1,2 @@\n-def solve(ys, zs, ws):\n+def solve(xs):\n-    total = -1\n")
    with pytest.raises(SearchNotFound, match=r"solver\.py.*'def solve\(ys, zs, ws\):'.*closest region is lines 1-2"):
        apply_edits(root, [diff], policy)
    assert (root / "solver.py").read_text() == SOLVER


def test_diff_new_file_from_dev_null(root: Path, policy: AccessPolicy) -> None:
    res = run(root, policy, reply("New.", "--- /dev/null", "+++ b/kernels/n.py", "@@ -0,0 +1 @@", "+N = 1"))
    assert res.created_files == ["kernels/n.py"] and (root / "kernels/n.py").read_text() == "N = 1\n"
