"""`looptree ab` end to end: two real scripted servers, real runs, a SIGKILL and a resume.

One experiment serves every check (each run costs seconds): six tiny CPU tasks, the control
arm's server never improves anything, the test arm's server halves the runtime. The
experiment is killed with SIGKILL in the middle of a pair's run and continued with `--resume`;
it must then call the test arm better before the suite is exhausted, without rerunning a
finished arm, and `pareto`, `runs` and `export` must read what it left.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

try:
    from experiments_helpers import IMPROVING, USELESS, make_suite, write_overlay
    from llm_server import LLMTestServer, reply
except ImportError:  # tests/ became a package
    from tests.experiments_helpers import IMPROVING, USELESS, make_suite, write_overlay
    from tests.llm_server import LLMTestServer, reply

# α = 0.45 (the most the config allows) lets six tasks show an early stop: the speed-up test,
# at α/2, decides after five straight clear wins.
EXPERIMENT = "[experiment]\nalpha = 0.45\n"


def looptree(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "looptree.engine.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout)


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line while the writer is alive
    return out


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"ab exited ({proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_ab_survives_sigkill_resumes_and_calls_the_test_arm_early(tmp_path: Path) -> None:
    control_server, test_server = LLMTestServer().start(), LLMTestServer().start()
    try:
        control_server.script(*[reply(USELESS, completion_tokens=20) for _ in range(400)])
        test_server.script(*[reply(IMPROVING, completion_tokens=20) for _ in range(400)])
        suite = make_suite(tmp_path, 6)
        control = write_overlay(tmp_path / "control.toml", control_server.base_url)
        test = write_overlay(tmp_path / "test.toml", test_server.base_url, EXPERIMENT)
        out = tmp_path / "exp"
        log = out / "events.jsonl"

        proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "ab", "--control", str(control),
                                 "--test", str(test), "--suite", str(suite), "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Kill in the middle of pair 2's first run, once that run has evaluated its baseline.
            def mid_pair_two() -> bool:
                started = [e for e in events(log) if e["type"] == "arm_started" and e["pair"] == 1]
                return bool(started) and any(e["type"] == "node_evaluated"
                                             for e in events(Path(started[0]["run_dir"]) / "events.jsonl"))
            wait_for(mid_pair_two, 120, "pair 2's first run to evaluate its baseline", proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        before = events(log)
        assert [e["pair"] for e in before if e["type"] == "pair_finished"] == [0]
        assert not (out / "verdict.json").exists()
        interrupted = Path(next(e for e in before if e["type"] == "arm_started" and e["pair"] == 1)["run_dir"])
        finished_runs = {p: (p / "events.jsonl").read_bytes() for p in (suite / "task0" / ".looptree" / "runs").iterdir()}

        done = looptree("ab", "--resume", "--out", str(out))
        assert done.returncode == 0, done.stderr
        verdict = json.loads((out / "verdict.json").read_text())
        assert verdict["verdict"] == "test"
        assert verdict["stopped_early"] is True and verdict["pairs"] == 5 < verdict["tasks"] == 6
        assert verdict["arms"]["test"]["successes"] == 5 and verdict["arms"]["control"]["successes"] == 0
        assert verdict["arms"]["test"]["tokens"] > 0 and verdict["arms"]["control"]["gpu_hours"] == 0
        assert verdict["statistics"]["alpha"] == 0.45 and verdict["statistics"]["decided_by"] == "speedup"
        assert "verdict: test after 5 pair(s)" in done.stdout

        # No finished arm ran again; the killed run was continued in its own directory.
        assert {p: (p / "events.jsonl").read_bytes() for p in (suite / "task0" / ".looptree" / "runs").iterdir()} \
            == finished_runs
        assert any(e["type"] == "engine_attached" for e in events(interrupted / "events.jsonl"))
        for i in range(5):
            assert len(list((suite / f"task{i}" / ".looptree" / "runs").iterdir())) == 2
        assert not (suite / "task5" / ".looptree").exists()
        pairs = list(csv.DictReader((out / "pairs.csv").open()))
        assert [p["task"] for p in pairs] == [f"task{i}" for i in range(5)]
        assert [p["first"] for p in pairs] == ["control", "test", "control", "test", "control"]

        # The same experiment seen by pareto, runs and export.
        shown = looptree("pareto", str(out), "--plot", str(tmp_path / "front.svg"))
        assert shown.returncode == 0, shown.stderr
        table = shown.stdout.split("* on the front")[0]
        assert "control" in table and "test" in table
        assert "oo test" in shown.stdout or "test" in shown.stdout.split("* on the front")[1]
        assert (tmp_path / "front.svg").read_text().lstrip().startswith("<?xml")
        front = json.loads(looptree("pareto", str(out), "--json").stdout)["points"]
        by_label = {p["label"]: p for p in front}
        assert by_label["test"]["speedup"] == pytest.approx(2.0) and by_label["test"]["on_front"]
        assert by_label["control"]["success_rate"] == 0

        rows = json.loads(looptree("runs", str(out), "--where", "arm=test", "--json").stdout)
        assert len(rows) == 5 and all(r["success"] and r["prompt_system"] for r in rows)
        assert len(json.loads(looptree("runs", str(suite), "--where", "success=false", "--json").stdout)) == 5

        csv_text = looptree("export", str(out), "--format", "csv").stdout
        jsonl_text = looptree("export", str(out), "--format", "jsonl").stdout
        assert looptree("export", str(out), "--format", "parquet", "--out", str(tmp_path / "n.parquet")).returncode == 0
        frames = [pd.read_csv(io.StringIO(csv_text)), pd.read_json(io.StringIO(jsonl_text), lines=True),
                  pd.read_parquet(tmp_path / "n.parquet")]
        for frame in frames:
            assert len(frame) == 30  # 10 runs x (baseline + 2 candidates)
            assert {"arm", "node", "verdict", "tokens", "cost_usd", "gpu_hours", "metric:runtime_ms (lower is better)"} \
                <= set(frame.columns)
            assert set(frame.loc[frame["credited_better"], "arm"]) == {"test"}
        # Prompt components are hashed one by one and recorded per call.
        ideas = frames[0][frames[0]["kind"] == "idea"]
        assert all(set(json.loads(c)) == {"system", "optimize"} for c in ideas["prompt_components"])
        assert frames[0]["prompt_components"].map(lambda c: json.loads(c).get("system")).dropna().nunique() == 1
        refused = looptree("export", str(out), "--format", "parquet")
        assert refused.returncode == 2 and "needs --out" in refused.stderr
    finally:
        control_server.stop()
        test_server.stop()


@pytest.mark.slow
def test_ab_stops_when_the_experiment_token_budget_is_spent(tmp_path: Path) -> None:
    server = LLMTestServer().start()
    try:
        server.script(*[reply(IMPROVING, completion_tokens=20) for _ in range(50)])
        suite = make_suite(tmp_path, 2)
        control = write_overlay(tmp_path / "control.toml", server.base_url)
        test = write_overlay(tmp_path / "test.toml", server.base_url)
        out = tmp_path / "exp"
        done = looptree("ab", "--control", str(control), "--test", str(test), "--suite", str(suite), "--out", str(out),
                        "--json", "experiment.max_tokens=1")
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert [line.get("pair") for line in lines[:-1]] == [0]
        verdict = lines[-1]
        assert verdict == json.loads((out / "verdict.json").read_text())
        assert verdict["verdict"] == "inconclusive" and verdict["pairs"] == 1 and verdict["stopped_early"] is False
        assert verdict["reason"] == "experiment token budget spent" and verdict["settings"]["max_tokens"] == 1
        assert not (suite / "task1" / ".looptree").exists()
    finally:
        server.stop()
