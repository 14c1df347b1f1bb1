"""Resume carries on what the log says: a paused run stays paused, a fork in flight is finished.

The "crash" is an engine whose log and lock are dropped without `run_finished`, as after kill -9.
Agents are the shipped replay backend playing a small cassette.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from looptree.engine.core.config import validate_config
from looptree.engine.core.events import RunLock, read_events
from looptree.engine.core.state import RunState
from looptree.engine.errors import LooptreeError
from looptree.engine.run.engine import Engine

CHANGE = ("Double the constant.\n\nsolver.py\n<<<<<<< SEARCH\nVALUE = {old}\n=======\nVALUE = {new}\n"
          ">>>>>>> REPLACE\n")


def make_project(tmp_path: Path) -> Path:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "solver.py").write_text("VALUE = 1\n")
    (project / "bench.py").write_text(
        "import solver\nopen('metrics.csv','w').write(f'iteration,score (higher is better)\\n1,{solver.VALUE}\\n')\n")
    records = [{"role": "ideas", "response": {"text": '["double it"]', "usage": {"prompt_tokens": 10, "completion_tokens": 5}}}]
    for old, new in [(1, 2), (1, 3), (2, 4), (3, 6)]:
        records.append({"role": "optimize", "when": f"VALUE = {old}\n",
                        "response": {"text": CHANGE.format(old=old, new=new),
                                     "usage": {"prompt_tokens": 10, "completion_tokens": 5}}})
    (project / "cassette.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return project


def config():
    return validate_config({
        "project": {"goal": "bigger VALUE", "writable": ["solver.py"], "readonly": ["bench.py"],
                    "hidden": ["cassette.jsonl"]},
        "bench": {"command": "python bench.py", "repeats": 1, "compare": "off"},
        "agent": {"provider": "replay", "cassette": "cassette.jsonl"},
        "search": {"num_samples": 1, "num_phases": 1, "early_stop_patience": 0},
        "gpu": {"telemetry": "none"},
        "sandbox": {"mode": "off"},
    })


def crash(engine: Engine) -> None:
    engine.log.close()
    engine.lock.release()


async def test_a_paused_run_stays_paused_after_resume(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    engine = await Engine.create(project, config())
    engine.handle_command({"cmd": "pause"})
    crash(engine)
    again = await Engine.reopen(engine.run_dir)
    try:
        assert again.state.paused and again.gate.paused
        again.handle_command({"cmd": "resume"})
        assert not again.gate.paused and not again.state.paused
    finally:
        crash(again)


async def test_a_fork_in_flight_at_the_crash_is_finished_on_resume(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    engine = await Engine.create(project, config())
    await engine.search.ensure_baseline()
    engine.emit("fork_requested", id="1", hint="make it three")
    engine.emit("node_created", id="1.1", parent="1", phase=0, kind="fork", hint="make it three")
    crash(engine)

    again = await Engine.reopen(engine.run_dir)
    assert await again.run() == "phases done"
    state = RunState.from_events(read_events(engine.run_dir / "events.jsonl"))
    fork = state.nodes["1.1"]
    assert fork.status == "done" and fork.kind == "fork"
    assert "make it three" in (engine.run_dir / "nodes" / "1.1" / "prompt.md").read_text()
    assert all(n.terminal for n in state.nodes.values())


# ------------------------------------------------------------------ which runs may be resumed


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "looptree.engine.cli", *args], check=False, capture_output=True,
                          text=True, timeout=120)


def finished_run(tmp_path: Path, reason: str) -> Path:
    """A run whose log ends with `reason` (a fabricated log: only the fold's verdict matters here)."""
    from conftest import RunEvents

    events = RunEvents()
    events.baseline(10.0)
    events.emit("run_finished", reason=reason, tokens=0, evaluated=1, best="1")
    run_dir = tmp_path / "proj" / ".looptree" / "runs" / "1"
    events.write(run_dir)
    return run_dir


@pytest.mark.parametrize("reason", ["phases done", "early stop"])
async def test_resume_and_ctl_refuse_a_run_that_finished_its_work(tmp_path: Path, reason: str) -> None:
    run_dir = finished_run(tmp_path, reason)
    (run_dir / "engine.lock").touch()  # as every real run leaves it
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(LooptreeError, match=rf"ended \({reason}\); there is nothing to resume"):
        await Engine.reopen(run_dir)
    for args in (["resume", str(run_dir), "--no-tui"], ["ctl", str(run_dir), "pause"],
                 ["ctl", str(run_dir), "budget", "+1000"]):
        result = cli(*args)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("looptree: error: run 1 in ") and reason in lines[0], lines
    assert sorted(p.name for p in run_dir.iterdir()) == before, "a refusal wrote into the run"
    assert not RunLock.is_held(run_dir)


async def test_ctl_budget_below_one_token_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    engine = await Engine.create(project, config())
    crash(engine)
    cap = engine.budget.cap
    for tokens in (f"-{cap}", "0", f"-{cap + 5}"):
        result = cli("ctl", str(engine.run_dir), "budget", tokens)
        assert result.returncode == 2 and "the budget must stay at least 1 token" in result.stderr, result
    assert not (engine.run_dir / "control.jsonl").exists()
    assert cli("ctl", str(engine.run_dir), "budget", f"-{cap - 1}").returncode == 0


async def test_a_run_stopped_by_the_user_resumes_to_the_end(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    engine = await Engine.create(project, config())
    engine.handle_command({"cmd": "stop"})
    assert await engine.run() == "stopped by user"
    again = await Engine.reopen(engine.run_dir)
    assert await again.run() == "phases done"
    state = RunState.from_events(read_events(engine.run_dir / "events.jsonl"))
    assert state.finished == "phases done" and state.nodes["1.1"].ok


async def test_a_run_that_spent_its_budget_resumes_after_ctl_budget(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    cfg = config()
    cfg.budget.max_tokens = 1  # the ideas call cannot even be reserved
    engine = await Engine.create(project, cfg)
    assert await engine.run() == "budget spent"
    assert RunState.from_events(read_events(engine.run_dir / "events.jsonl")).nodes["1"].ok

    # Resumable at once (it stops again: nothing changed) ...
    again = await Engine.reopen(engine.run_dir)
    assert await again.run() == "budget spent"
    # ... and for real after `looptree ctl budget +N`, sent while no engine runs.
    result = cli("ctl", str(engine.run_dir), "budget", "+1000000")
    assert result.returncode == 0 and "takes effect on `looptree resume`" in result.stdout, result
    third = await Engine.reopen(engine.run_dir)
    assert await third.run() == "phases done"
    state = RunState.from_events(read_events(engine.run_dir / "events.jsonl"))
    assert state.max_tokens == 1_000_001 and state.nodes["1.1"].ok


@pytest.mark.slow
def test_a_headless_run_stopped_by_a_signal_resumes(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    (project / "bench.py").write_text("import time\ntime.sleep(2)\n" + (project / "bench.py").read_text())
    (project / "looptree.toml").write_text(tomli_w.dumps(config().to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = project / ".looptree" / "runs" / "1"
    deadline = time.monotonic() + 60
    while not ((run_dir / "events.jsonl").exists() and "stage_started" in (run_dir / "events.jsonl").read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode in (0, 128 + signal.SIGTERM)  # a clean stop, reported with the signal's status
    assert RunState.from_events(read_events(run_dir / "events.jsonl")).finished.startswith("stopped by")
    result = cli("resume", str(run_dir), "--no-tui")
    assert result.returncode == 0, result.stderr
    assert RunState.from_events(read_events(run_dir / "events.jsonl")).finished == "phases done"


async def test_a_run_from_before_signing_gets_a_key_on_resume_and_refuses_its_old_unsigned_lines(
        tmp_path: Path) -> None:
    from looptree.engine.run.control import append_control, make_command

    project = make_project(tmp_path)
    engine = await Engine.create(project, config())
    crash(engine)
    (engine.run_dir / "control.key").unlink()  # as a run started by an older looptree
    # An old `ctl` line, unsigned:
    (engine.run_dir / "control.jsonl").write_text(json.dumps({"ts": 1.0, "cmd": "budget", "tokens": "+5000000"}) + "\n")
    again = await Engine.reopen(engine.run_dir)
    try:
        assert (engine.run_dir / "control.key").stat().st_mode & 0o777 == 0o600
        old = again.control.poll()
        assert [r.get("_refused") for r in old] == ["not signed"]
        append_control(engine.run_dir, make_command("pause"))
        assert [r["cmd"] for r in again.control.poll()] == ["pause"]
    finally:
        crash(again)


async def test_the_engine_refuses_a_budget_below_one_token_and_keeps_the_cap(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    engine = await Engine.create(project, config())
    try:
        cap = engine.budget.cap
        with pytest.raises(LooptreeError, match="the budget must stay at least 1 token"):
            engine.handle_command({"cmd": "budget", "tokens": f"-{cap}"})
        assert engine.budget.cap == cap
        engine.handle_command({"cmd": "budget", "tokens": f"-{cap - 1}"})
        assert engine.budget.cap == 1 == engine.state.max_tokens
    finally:
        crash(engine)
