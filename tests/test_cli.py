"""The `looptree` command as a user runs it: a real subprocess, its exit status, stdout and stderr.

User errors must come back as exit status 2 and exactly one stderr line starting `looptree: error:`
with no traceback; the viewers (`tree`, `show`, `replay`) read a hand-written event log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from looptree.engine.core.config import load_config
from looptree.engine.core.events import RunLock
from looptree.engine.edits.access import check_patterns
from looptree.engine.errors import ConfigError
from looptree.engine.run.control import CONTROL_NAME

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "eng_run2_events.jsonl"
FIXTURE_PROJECT = "/nonexistent/looptree-fixture-project"
CONTRACT_COMMANDS = ("init", "run", "resume", "attach", "replay", "ctl", "tree", "show", "eval", "kernelbench", "gpus")

CONFIG = """\
[project]
goal = "Make solve() faster."
writable = ["solver.py"]

[bench]
command = "python bench.py"
"""


def cli(*args: str, cwd: Path | None = None, exe: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "LOOPTREE_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([*(exe or [sys.executable, "-m", "looptree.engine.cli"]), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def user_error(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the shape of a user error and return its message."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("looptree: error: "), result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    return lines[0].removeprefix("looptree: error: ")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "solver.py").write_text("def solve(xs):\n    return sum(xs)\n")
    (proj / "bench.py").write_text("print('iteration,runtime_ms (lower is better)')\n")
    return proj


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Run 2 of a project, its events.jsonl written by hand (tests/fixtures/eng_run2_events.jsonl)."""
    rdir = tmp_path / "proj" / ".looptree" / "runs" / "2"
    rdir.mkdir(parents=True)
    (rdir / "events.jsonl").write_text(FIXTURE.read_text())
    return rdir


# ---------------------------------------------------------------------------- help


def test_console_script_help_lists_every_contract_command() -> None:
    script = Path(sys.executable).parent / "looptree"
    assert script.exists(), "the `looptree` console script is not installed in this environment"
    result = cli("--help", exe=[str(script)])
    assert result.returncode == 0
    for command in CONTRACT_COMMANDS:
        assert f"\n    {command}" in result.stdout, command
    assert "KEY=VALUE" in result.stdout


def test_run_help_shows_the_contract_options() -> None:
    result = cli("run", "--help")
    assert result.returncode == 0
    for option in ("--config", "--no-tui", "--json", "KEY=VALUE"):
        assert option in result.stdout


def test_no_command_prints_help_and_fails() -> None:
    result = cli()
    assert result.returncode == 2 and "usage: looptree" in result.stdout


# ---------------------------------------------------------------------------- init


def test_init_writes_a_config_guessed_from_the_project(project: Path) -> None:
    (project / "test_solver.py").write_text("assert True\n")
    result = cli("init", str(project))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {project / 'looptree.toml'}")
    config = load_config(project)
    check_patterns(config, project)  # the guessed patterns match real files
    assert config.project.writable == ["solver.py"]
    assert config.project.readonly == ["bench.py", "test_solver.py"]
    assert config.bench.command == "python bench.py"
    assert config.check.command == "python test_solver.py"
    assert config.build.command == "python -m py_compile solver.py"
    assert (project / ".git").is_dir()  # the tree's commits need a repository
    assert "/.looptree/" in (project / ".git" / "info" / "exclude").read_text()


def test_init_refuses_to_overwrite(project: Path) -> None:
    (project / "looptree.toml").write_text("# mine\n")
    result = cli("init", str(project))
    assert user_error(result) == f"{project / 'looptree.toml'} already exists; edit it, or remove it to start over"
    assert (project / "looptree.toml").read_text() == "# mine\n"


def test_init_of_an_empty_directory_fails_later_only_on_the_placeholder(tmp_path: Path) -> None:
    assert cli("init", str(tmp_path)).returncode == 0
    config = load_config(tmp_path)  # the template itself always validates
    assert config.project.writable == ["CHANGE_ME.py"]
    with pytest.raises(ConfigError, match="project.writable pattern 'CHANGE_ME.py' matches no file"):
        check_patterns(config, tmp_path)
    message = user_error(cli("run", str(tmp_path), "--no-tui"))
    assert message == f"looptree.toml: project.writable pattern 'CHANGE_ME.py' matches no file in {tmp_path}"


def test_init_of_a_missing_directory(tmp_path: Path) -> None:
    assert user_error(cli("init", str(tmp_path / "nope"))) == f"{tmp_path / 'nope'} is not a directory"


# ---------------------------------------------------------------------------- run: refusals before anything starts


@pytest.mark.parametrize("config, overrides, expected", [
    (None, [], "no looptree.toml in {p} (run `looptree init {p}` to write one)"),
    (CONFIG + "[search\n", [], "looptree.toml: invalid TOML: Expected ']' at the end of a table declaration "
                                "(at line 7, column 8)"),
    (CONFIG + "[search]\nnum_sample = 3\n", [], "looptree.toml: unknown key 'search.num_sample'"),
    (CONFIG.replace("[bench]\ncommand", "[bench]\nnot_command"), [],
     "looptree.toml: missing required key 'bench.command' (the command that benchmarks a candidate)"),
    (CONFIG.replace('goal = "Make solve() faster."\n', ""), [], "looptree.toml: missing required key 'project.goal'"),
    (CONFIG, ["search.num_samples"], "override 'search.num_samples' is not KEY=VALUE (e.g. search.num_samples=10)"),
    (CONFIG, ["search.num_sample=3"], "looptree.toml: unknown key 'search.num_sample'"),
    (CONFIG, ["search.num_samples=0"], "looptree.toml: search.num_samples: input should be greater than or equal to 1, got 0"),
    (CONFIG, ['project.writable=["solvr.py"]'], "looptree.toml: project.writable pattern 'solvr.py' matches no file in {p}"),
], ids=["no-config", "bad-toml", "unknown-key", "no-bench-command", "no-goal", "bad-override", "unknown-override",
        "bad-override-value", "unmatched-writable"])
def test_run_refuses_with_one_line(project: Path, config: str | None, overrides: list[str], expected: str) -> None:
    if config is not None:
        (project / "looptree.toml").write_text(config)
    result = cli("run", str(project), *overrides, "--no-tui")
    assert user_error(result) == expected.format(p=project)
    assert not (project / ".looptree").exists()  # nothing was started


def test_run_with_a_missing_config_file_option(project: Path) -> None:
    message = user_error(cli("run", str(project), "--config", str(project / "other.toml"), "--no-tui"))
    assert message == f"no other.toml in {project} (run `looptree init {project}` to write one)"


def test_run_on_a_missing_directory(tmp_path: Path) -> None:
    assert user_error(cli("run", str(tmp_path / "nope"), "--no-tui")) == f"{tmp_path / 'nope'} is not a directory"


def test_run_accepts_overrides_after_options(project: Path) -> None:
    (project / "looptree.toml").write_text(CONFIG)
    message = user_error(cli("run", str(project), "--no-tui", "search.num_samples=0"))
    assert message.startswith("looptree.toml: search.num_samples: ")


def test_run_in_the_project_with_only_overrides(project: Path) -> None:
    (project / "looptree.toml").write_text(CONFIG)
    message = user_error(cli("run", "search.num_samples=0", "--no-tui", cwd=project))
    assert message.startswith("looptree.toml: search.num_samples: ")


HEAVY = ("scipy", "openai", "textual", "torch", "pandas", "numba")
FAST_PROBE = """\
import json, sys, time
t = time.perf_counter()
from looptree.app.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "s": time.perf_counter() - t, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.mark.parametrize("config, overrides, expected", [
    (CONFIG + '[agent]\nprovider = "openai"\n', [], "agent.provider = 'openai' needs an API key in $OPENAI_API_KEY"),
    (CONFIG, ["agent.provider=deepseek"], "agent.provider = 'deepseek' needs an API key in $DEEPSEEK_API_KEY"),
    (CONFIG + "[search]\nnum_sample = 3\n", [], "looptree.toml: unknown key 'search.num_sample'"),
    (CONFIG, ['project.writable=["solvr.py"]'], "looptree.toml: project.writable pattern 'solvr.py' matches no file"),
], ids=["no-api-key", "no-api-key-override", "unknown-key", "unmatched-writable"])
def test_config_errors_come_before_any_heavy_import(project: Path, config: str, overrides: list[str],
                                                    expected: str) -> None:
    """The issue's user waited 13-21 s for "needs an API key": configuration imported scipy first."""
    (project / "looptree.toml").write_text(config)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "LOOPTREE_")) and not k.endswith("_API_KEY")}
    result = subprocess.run([sys.executable, "-c", FAST_PROBE, "run", str(project), *overrides, "--no-tui"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert expected in result.stderr, result.stderr
    probe = json.loads(result.stdout)
    assert probe["rc"] == 2 and probe["heavy"] == [], probe
    assert probe["s"] < 3.0, probe  # about 0.2 s on an idle 2-core machine (0.75 s with scipy)


def test_unreachable_significance_is_still_refused(project: Path) -> None:
    """The scipy check comes later, not never."""
    (project / "looptree.toml").write_text(CONFIG)
    message = user_error(cli("run", str(project), "bench.repeats=2", "bench.max_repeats=2", "--no-tui"))
    assert "can never call a candidate better" in message


# ---------------------------------------------------------------------------- tree / show / replay


@pytest.mark.parametrize("command", [["tree"], ["tree", "--json"], ["show", "@", "1"], ["ctl", "@", "pause"],
                                     ["replay", "--no-tui"], ["resume", "--no-tui"]])
def test_viewers_on_a_directory_that_is_not_a_run(tmp_path: Path, command: list[str]) -> None:
    args = [str(tmp_path) if a == "@" else a for a in command]
    if "@" not in command:
        args.insert(1, str(tmp_path))
    message = user_error(cli(*args))
    assert message == f"{tmp_path} is not a run directory (expected <project>/.looptree/runs/<N> with an events.jsonl)"


def test_tree_json_of_a_hand_written_run(run_dir: Path) -> None:
    result = cli("tree", str(run_dir), "--json")
    assert result.returncode == 0, result.stderr
    tree = json.loads(result.stdout)
    assert (tree["run"], tree["finished"], tree["best"]) == (2, "phases done", "2.1")
    assert (tree["tokens_spent"], tree["max_tokens"]) == (2000, 50000)
    assert tree["metrics"] == [{"column": "runtime_ms (lower is better)", "name": "runtime_ms", "higher_is_better": False}]
    nodes = {n["id"]: n for n in tree["nodes"]}
    assert list(nodes) == ["2", "2.1", "2.2"]
    assert nodes["2"]["children"] == ["2.1", "2.2"] and nodes["2.1"]["parent"] == "2"
    assert nodes["2.1"]["status"] == "done" and nodes["2.1"]["ratio_vs_baseline"] == pytest.approx(2.0)
    assert nodes["2.1"]["branch"] == "looptree/2.1" and nodes["2.1"]["tokens"] == 1000
    assert nodes["2.2"]["status"] == "failed"
    assert (nodes["2.2"]["failure_stage"], nodes["2.2"]["failure_reason"]) == ("build", "SyntaxError: invalid syntax")


def test_tree_text_of_a_hand_written_run(run_dir: Path) -> None:
    result = cli("tree", str(run_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"run 2: {FIXTURE_PROJECT}"
    assert lines[1] == "status: finished: phases done"
    assert lines[2] == "nodes: 3 (2 evaluated), tokens: 2,000 of 50,000"
    assert lines[3] == "best: 2.1 (2.00x the baseline on runtime_ms)"
    body = "\n".join(lines[5:])
    assert lines[5].startswith("2  ok") and "runtime_ms=100" in lines[5]
    assert "├── 2.1  ok       *best* runtime_ms=50  (2.00x)" in body
    assert "└── 2.2  FAILED   build: SyntaxError: invalid syntax" in body


def test_tree_of_a_project_reads_its_latest_run(run_dir: Path) -> None:
    runs = run_dir.parent
    (runs / "10").mkdir()
    (runs / "10" / "events.jsonl").write_text(FIXTURE.read_text().replace('"run":2', '"run":10'))
    (runs / "11").mkdir()  # allocated but never started: no events.jsonl
    result = cli("tree", str(runs.parent.parent), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run"] == 10


def test_tree_of_an_empty_log(tmp_path: Path) -> None:
    (tmp_path / "events.jsonl").write_text("")
    assert user_error(cli("tree", str(tmp_path))) == "the event log has no run_started event"


def test_tree_of_a_damaged_log(run_dir: Path) -> None:
    lines = (run_dir / "events.jsonl").read_text().splitlines(keepends=True)
    lines[3] = lines[3][:20] + "\n"
    (run_dir / "events.jsonl").write_text("".join(lines))
    message = user_error(cli("tree", str(run_dir)))
    assert message == f"{run_dir / 'events.jsonl'}: line 4 is not valid JSON (the event log is damaged)"


def test_show_a_baseline_node(run_dir: Path) -> None:
    (run_dir / "nodes" / "2").mkdir(parents=True)
    (run_dir / "nodes" / "2" / "bench.log").write_text("".join(f"line {i}\n" for i in range(30)))
    result = cli("show", str(run_dir), "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "kind: baseline   parent: None   phase: -1   status: done" in out
    assert "## description\nbaseline" in out
    assert "runtime_ms (lower is better): 100   (n=1, min 100, max 100)" in out
    assert "## diff against parent\n(no change)" in out
    assert "line 29" in out and "line 9\n" not in out  # the last 20 lines of the log


def test_show_an_unknown_node(run_dir: Path) -> None:
    assert user_error(cli("show", str(run_dir), "2.9")) == f"no node 2.9 in run 2 (see `looptree tree {run_dir}`)"


def test_show_prints_the_diff_against_the_parent(run_dir: Path, git_repo: Path, git_run) -> None:
    base = git_run(git_repo, "rev-parse", "HEAD").strip()
    (git_repo / "solver.py").write_text("def solve(xs):\n    return sum(xs)  # faster\n")
    git_run(git_repo, "commit", "-q", "-am", "agent")
    change = git_run(git_repo, "rev-parse", "HEAD").strip()
    text = FIXTURE.read_text().replace(FIXTURE_PROJECT, str(git_repo)).replace("1" * 40, base).replace("2" * 40, change)
    (run_dir / "events.jsonl").write_text(text)
    result = cli("show", str(run_dir), "2.1")
    assert result.returncode == 0, result.stderr
    assert "+    return sum(xs)  # faster" in result.stdout
    assert "idea: use sum()" in result.stdout and "branch: looptree/2.1" in result.stdout


def test_show_when_the_project_has_moved(run_dir: Path) -> None:
    result = cli("show", str(run_dir), "2.1")
    assert "Traceback" not in result.stderr
    assert result.returncode == 0 and "diff unavailable" in result.stdout


def test_replay_headless_prints_one_line_per_event(run_dir: Path) -> None:
    result = cli("replay", str(run_dir), "--no-tui", "--speed", "1000")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].endswith("run 2 started on /nonexistent/looptree-fixture-project (base 1111111111)")
    assert any("2.1" in line and "evaluated #1: runtime_ms=50  (2.00x vs baseline)" in line for line in lines)
    assert any("2.2" in line and "FAILED at build: SyntaxError: invalid syntax" in line for line in lines)
    assert lines[-1].endswith("run finished: phases done (2 evaluated, 2,000 tokens); best 2.1: runtime_ms=50")


def test_replay_refuses_a_zero_speed(run_dir: Path) -> None:
    assert user_error(cli("replay", str(run_dir), "--no-tui", "--speed", "0")) == "--speed must be greater than 0"


# ---------------------------------------------------------------------------- ctl


def unfinish(run_dir: Path) -> None:
    """Drop the fixture run's `run_finished` (phases done): `ctl` refuses a run that finished its work."""
    path = run_dir / "events.jsonl"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if '"run_finished"' not in line))


def control_records(run_dir: Path) -> list[dict]:
    path = run_dir / CONTROL_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_ctl_pause_on_a_run_no_engine_drives(run_dir: Path) -> None:
    unfinish(run_dir)
    result = cli("ctl", str(run_dir), "pause")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sent pause to run 2 (no engine is running it now; it takes effect on `looptree resume`)"
    assert [r["cmd"] for r in control_records(run_dir)] == ["pause"]


def test_ctl_on_a_live_run(run_dir: Path) -> None:
    unfinish(run_dir)
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        result = cli("ctl", str(run_dir), "prune", "2.2")
    finally:
        lock.release()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sent prune 2.2 to run 2"
    assert [(r["cmd"], r["id"]) for r in control_records(run_dir)] == [("prune", "2.2")]


def test_ctl_fork_and_budget_records(run_dir: Path) -> None:
    unfinish(run_dir)
    assert cli("ctl", str(run_dir), "fork", "2.1", "--hint", "try numpy").returncode == 0
    assert cli("ctl", str(run_dir), "budget", "+500k").returncode == 0
    records = control_records(run_dir)
    assert (records[0]["cmd"], records[0]["id"], records[0]["hint"]) == ("fork", "2.1", "try numpy")
    assert (records[1]["cmd"], records[1]["tokens"]) == ("budget", "+500k")


def test_ctl_budget_accepts_negative_amounts(run_dir: Path) -> None:
    """`-1e4` and `-5k` look like options to argparse; the help promises them (the run's cap is 50,000)."""
    unfinish(run_dir)
    assert cli("ctl", str(run_dir), "budget", "-1e4").returncode == 0
    assert cli("ctl", str(run_dir), "budget", "-5k").returncode == 0
    assert [r["tokens"] for r in control_records(run_dir)] == ["-1e4", "-5k"]


@pytest.mark.parametrize("args, expected", [
    (["paws"], "unknown command 'paws'; one of: pause, resume, stop, prune, pin, unpin, fork, budget, kill"),
    (["prune"], "`prune` needs a node ID like 3.2.1, got None"),
    (["pin", "2.x"], "`pin` needs a node ID like 3.2.1, got '2.x'"),
    (["prune", "2.9"], "no node 2.9 in run 2 (see `looptree tree {run_dir}`)"),
    (["budget"], "`budget` needs a token count: budget 2000000 | +500000 | -100000"),
    (["budget", "lots"], "budget 'lots' is not a token count like 2000000, +500k or -1e5"),
])
def test_ctl_refuses_with_one_line(run_dir: Path, args: list[str], expected: str) -> None:
    unfinish(run_dir)
    assert user_error(cli("ctl", str(run_dir), *args)) == expected.format(run_dir=run_dir)
    assert control_records(run_dir) == []  # nothing was sent


def test_ctl_budget_overflow_is_a_user_error(run_dir: Path) -> None:
    unfinish(run_dir)
    user_error(cli("ctl", str(run_dir), "budget", "1e400"))
