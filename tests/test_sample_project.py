"""The hotloop sample project: its gate, its benchmark and its recorded agent replies.

Why these tests: the README's first command optimizes this project with no API key by replaying
`cassette.jsonl`, so the demo only works while (1) check.py really rejects wrong solvers, (2)
bench.py speaks the metrics protocol, and (3) the cassette's SEARCH texts still match solver.py
and lead to a correct, much faster solver. Each test runs the project's own scripts in a copy
under tmp_path (never in the checkout) with the interpreter running pytest. The edit blocks are
applied here by plain exact string replacement, independent of engine/edits/blocks.py, so a drift
between the cassette and solver.py shows up as a failure of this file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[1] / "sample_projects" / "hotloop"
HEADER = [
    "iteration",
    "total_ms (lower is better)",
    "rank_ms (lower is better)",
    "pairs_ms (lower is better)",
    "tokens_ms (lower is better)",
    "throughput_kitems_s (higher is better)",
]
BLOCK = re.compile(r"^(\S+)\n<<<<<<< SEARCH\n(.*?)^=======\n(.*?)^>>>>>>> REPLACE$", re.S | re.M)


def copy_project(dest: Path) -> Path:
    """A private copy of the sample project (scripts write metrics.csv next to themselves)."""
    target = dest / "hotloop"
    shutil.copytree(PROJECT, target, ignore=shutil.ignore_patterns("__pycache__", "metrics.csv", ".looptree"))
    return target


def run_py(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the project's interpreter-level command; LOOPTREE_METRICS only when a test sets it."""
    full_env = {k: v for k, v in os.environ.items() if k != "LOOPTREE_METRICS"}
    full_env.update({"PYTHONDONTWRITEBYTECODE": "1", **(env or {})})
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=full_env)


def read_metrics(path: Path) -> tuple[list[str], list[list[float]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [[float(cell) for cell in row] for row in rows[1:]]


def load_cassette() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (PROJECT / "cassette.jsonl").read_text(encoding="utf-8").splitlines()]


def edit_blocks(text: str) -> list[tuple[str, str, str]]:
    return BLOCK.findall(text)


def apply_blocks(source: str, text: str) -> str:
    """Apply a reply's blocks to solver.py text; every SEARCH must occur exactly once."""
    blocks = edit_blocks(text)
    assert blocks, "reply has no SEARCH/REPLACE block"
    for path, search, replace in blocks:
        assert path == "solver.py", f"block edits {path}"
        assert source.count(search) == 1, f"SEARCH occurs {source.count(search)} times:\n{search}"
        source = source.replace(search, replace)
    return source


def pick(records: list[dict[str, Any]], used: set[int], role: str, message: str) -> dict[str, Any]:
    """The replay rule for hand-written cassettes: first unused record of the role whose `when`
    occurs in the message (records without `when` only when none fits)."""
    fitting = [i for i, r in enumerate(records) if r["role"] == role and i not in used and r["when"] and r["when"] in message]
    fallback = [i for i, r in enumerate(records) if r["role"] == role and i not in used and not r["when"]]
    chosen = (fitting or fallback)[0]
    used.add(chosen)
    return records[chosen]


@pytest.fixture(scope="module")
def baseline_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One benchmark run of the unmodified project (about two seconds), shared by the tests."""
    project = copy_project(tmp_path_factory.mktemp("baseline"))
    out = project / "out" / "bench.csv"
    out.parent.mkdir()
    return run_py(project, "bench.py", str(out)), out


def test_check_passes_on_the_baseline(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    result = run_py(project, "check.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"check: all \d+ cases match", result.stdout)


def test_check_fails_and_names_the_difference_when_solver_is_wrong(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    solver = project / "solver.py"
    text = solver.read_text()
    assert "if values[j] < current:" in text
    solver.write_text(text.replace("if values[j] < current:", "if values[j] <= current:"))  # counts ties
    result = run_py(project, "check.py")
    assert result.returncode == 1
    assert "MISMATCH count_smaller_right [seed 0]" in result.stdout
    assert "MISMATCH count_smaller_right [holdout all equal]" in result.stdout  # the hidden cases count


def test_check_fails_when_a_helper_raises(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    solver = project / "solver.py"
    solver.write_text(solver.read_text().replace("    tokens = _tokenize(text)\n", "    tokens = _tokenize(text)\n    raise KeyError(k)\n"))
    result = run_py(project, "check.py")
    assert result.returncode == 1
    assert re.search(r"MISMATCH top_k_tokens \[seed \d\]: raised KeyError", result.stdout)


def test_check_refuses_to_pass_without_the_holdout(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    (project / "hidden" / "holdout.json").unlink()
    result = run_py(project, "check.py")
    assert result.returncode != 0
    assert "holdout.json is missing" in result.stderr


def test_bench_writes_the_metrics_protocol(baseline_bench: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, out = baseline_bench
    assert result.returncode == 0, result.stderr
    header, rows = read_metrics(out)
    assert header == HEADER
    assert [row[0] for row in rows] == [1.0, 2.0, 3.0]
    for row in rows:
        assert all(math.isfinite(x) and x > 0 for x in row[1:])
        assert row[1] == pytest.approx(row[2] + row[3] + row[4], abs=0.01)  # total = the three helpers
    assert "iteration 3: total" in result.stdout


def test_bench_reads_the_path_from_the_environment_and_fails_loudly_when_solver_raises(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    solver = project / "solver.py"
    solver.write_text(solver.read_text().replace("    n = len(values)\n", "    n = len(values)\n    raise ValueError('boom')\n", 1))
    out = tmp_path / "env_metrics.csv"
    result = run_py(project, "bench.py", env={"LOOPTREE_METRICS": str(out)})
    assert result.returncode == 1
    assert "bench: solver.count_smaller_right raised ValueError: boom" in result.stderr
    header, rows = read_metrics(out)  # the header is written before any timing, no row after
    assert header == HEADER and rows == []
    assert not (project / "metrics.csv").exists()


def test_config_keeps_the_cassette_and_holdout_away_from_agents() -> None:
    config = tomllib.loads((PROJECT / "looptree.toml").read_text())
    assert config["project"]["writable"] == ["solver.py"]
    assert set(config["project"]["readonly"]) == {"bench.py", "check.py", "reference.py"}
    assert {"hidden/**", config["agent"]["cassette"]} <= set(config["project"]["hidden"])
    assert config["agent"]["provider"] == "replay"
    assert (PROJECT / config["agent"]["cassette"]).is_file()


def test_every_cassette_line_is_a_complete_record() -> None:
    lines = (PROJECT / "cassette.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines
    for number, line in enumerate(lines, start=1):
        record = json.loads(line)
        assert set(record) == {"role", "node_id", "request_hash", "when", "request", "response"}, number
        assert record["role"] in {"ideas", "optimize", "fix"}, number
        assert record["when"] is None or (isinstance(record["when"], str) and record["when"]), number
        response = record["response"]
        assert isinstance(response["text"], str) and response["text"].strip(), number
        assert response["finish_reason"] == "stop" and isinstance(response["model"], str), number
        usage = response["usage"]  # replay charges the budget with these: keep them plausible
        assert 3000 <= usage["prompt_tokens"] <= 8000, number  # the prompts show ~17-20 kB of code
        assert 50 <= usage["completion_tokens"] <= 2000, number
        assert usage["completion_tokens"] >= len(response["text"]) // 6, number


def test_cassette_has_enough_records_of_each_role() -> None:
    roles = [r["role"] for r in load_cassette()]
    assert roles.count("ideas") >= 1
    assert roles.count("optimize") >= 8
    assert roles.count("fix") >= 1
    ideas = json.loads(next(r for r in load_cassette() if r["role"] == "ideas")["response"]["text"])
    assert len(ideas) >= 4 and all(isinstance(i, str) and i for i in ideas)


def test_each_idea_has_its_own_phase0_reply() -> None:
    records = load_cassette()
    ideas = json.loads(records[0]["response"]["text"])
    used: set[int] = set()
    for idea in ideas:
        record = pick(records, used, "optimize", f"Idea to implement: {idea}\n")
        assert record["when"] and record["when"] in idea


def test_only_the_refused_candidate_touches_a_read_only_file() -> None:
    offenders = [r for r in load_cassette() if any(p != "solver.py" for p, _, _ in edit_blocks(r["response"]["text"]))]
    assert len(offenders) == 1
    assert offenders[0]["role"] == "optimize"
    assert {p for p, _, _ in edit_blocks(offenders[0]["response"]["text"])} == {"solver.py", "bench.py"}


def test_broken_candidate_fails_to_compile_and_its_fix_repairs_it(tmp_path: Path) -> None:
    records = load_cassette()
    ideas = json.loads(records[0]["response"]["text"])
    project = copy_project(tmp_path)
    solver = project / "solver.py"
    used: set[int] = set()
    fenwick = next(i for i in ideas if "Fenwick" in i)
    solver.write_text(apply_blocks(solver.read_text(), pick(records, used, "optimize", f"Idea to implement: {fenwick}\n")["response"]["text"]))
    build = run_py(project, "-m", "py_compile", "solver.py")
    assert build.returncode != 0 and "SyntaxError" in build.stderr
    fix = pick(records, used, "fix", f"Failure: build failed\n{build.stderr}\n{solver.read_text()}")
    assert fix["when"] == "SyntaxError"
    solver.write_text(apply_blocks(solver.read_text(), fix["response"]["text"]))
    assert run_py(project, "-m", "py_compile", "solver.py").returncode == 0
    assert run_py(project, "check.py").returncode == 0


def test_cassette_replays_into_a_correct_and_much_faster_solver(
    tmp_path: Path, baseline_bench: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    """Phase 0 takes the grid idea, each later phase the first reply that fits the code."""
    records = load_cassette()
    ideas = json.loads(records[0]["response"]["text"])
    project = copy_project(tmp_path)
    solver = project / "solver.py"
    used: set[int] = set()
    text = apply_blocks(solver.read_text(), pick(records, used, "optimize", f"Idea to implement: {ideas[0]}\n")["response"]["text"])
    assert "grid" in text and "math.sqrt((x1 - x2)" in text  # the grid, not yet tightened
    for _phase in (1, 2):
        text = apply_blocks(text, pick(records, used, "optimize", f"Improve node X.\n{text}")["response"]["text"])
    assert "tokens.count(token)" not in text and "if values[j] < current" not in text
    solver.write_text(text)
    check = run_py(project, "check.py")
    assert check.returncode == 0, check.stdout
    out = tmp_path / "fast.csv"
    assert run_py(project, "bench.py", str(out)).returncode == 0
    _, fast = read_metrics(out)
    _, slow = read_metrics(baseline_bench[1])
    fastest = min(row[1] for row in fast)
    slowest_baseline = min(row[1] for row in slow)
    assert slowest_baseline / fastest >= 3.0, (slowest_baseline, fastest)
