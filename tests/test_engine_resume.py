"""Resume carries on what the log says: a paused run stays paused, a fork in flight is finished.

The "crash" is an engine whose log and lock are dropped without `run_finished`, as after kill -9.
Agents are the shipped replay backend playing a small cassette.
"""

from __future__ import annotations

import json
from pathlib import Path

from looptree.engine.config import validate_config
from looptree.engine.engine import Engine
from looptree.engine.events import read_events
from looptree.engine.state import RunState

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
        assert again.state.paused and not again.unpaused.is_set()
        again.handle_command({"cmd": "resume"})
        assert again.unpaused.is_set() and not again.state.paused
    finally:
        crash(again)


async def test_a_fork_in_flight_at_the_crash_is_finished_on_resume(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    engine = await Engine.create(project, config())
    await engine._ensure_baseline()
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
