"""The control channel against a live engine: each `looptree ctl` command, written to control.jsonl
while the run goes on, and what the run does about it.

Why live: test_control.py checks how commands are written and read; what a user relies on is the
effect on a running search — a pause that really holds agents and benchmarks, a prune that the
next phase respects, a kill that ends the process at once. The engine runs as a task in the
test's event loop, with recorded agent replies (a replay cassette) and a real benchmark whose
duration each reply controls through `SLEEP` in solver.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from looptree.engine.core.config import validate_config
from looptree.engine.core.events import read_events
from looptree.engine.core.state import RunState
from looptree.engine.evaluation.procs import find_job_pids
from looptree.engine.run.control import append_control, make_command
from looptree.engine.run.engine import Engine, job_prefix

RT = "runtime_ms (lower is better)"
BENCH = """\
import os
import time
import solver

time.sleep(solver.SLEEP)
with open(os.environ.get("LOOPTREE_METRICS", "metrics.csv"), "w") as fh:
    fh.write("iteration,runtime_ms (lower is better)\\n")
    fh.write(f"0,{float(solver.VALUE)}\\n")
"""


def change(*lines: str, description: str = "Tune VALUE.") -> str:
    """A reply that adds `lines` (after earlier changes) to solver.py."""
    body = "".join(line + "\n" for line in lines)
    return f"{description}\n\nsolver.py\n<<<<<<< SEARCH\n# knob\n=======\n{body}# knob\n>>>>>>> REPLACE\n"


def record(role: str, text: str, when: str | None = None) -> dict[str, Any]:
    return {"role": role, "node_id": None, "request_hash": None, "when": when, "request": None,
            "response": {"text": text, "usage": {"prompt_tokens": 100, "completion_tokens": 20},
                         "finish_reason": "stop", "model": "test-model"}}


def cassette_for(ideas: dict[str, str], improve: list[str]) -> list[dict[str, Any]]:
    """One ideas reply; one optimize reply per idea (picked by the idea's text); improve replies in order."""
    return ([record("ideas", json.dumps(list(ideas)))]
            + [record("optimize", text, when=idea) for idea, text in ideas.items()]
            + [record("optimize", text) for text in improve])


async def start_engine(tmp_path: Path, records: list[dict[str, Any]], *, base_sleep: float = 0.0,
                       bench_concurrency: int = 1, **search: Any) -> Live:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "solver.py").write_text(f"VALUE = 100\nSLEEP = {base_sleep}\n# knob\n")
    (project / "bench.py").write_text(BENCH)
    cassette = tmp_path / "cassette.jsonl"
    cassette.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = validate_config({
        "project": {"goal": "Lower runtime_ms.", "writable": ["solver.py"], "readonly": ["bench.py"]},
        "bench": {"command": f"{sys.executable} bench.py", "repeats": 1, "compare": "off", "timeout": 60,
                  "device": "cpu", "concurrency": bench_concurrency},
        "agent": {"provider": "replay", "cassette": str(cassette)},
        "search": {"num_phases": 1, "num_workers": 8, "max_fix_attempts": 0, "early_stop_patience": 0,
                   "expand_top": 1, **search},
        "budget": {"max_tokens": 1_000_000},
        "gpu": {"devices": "none", "telemetry": "none"},
    })
    engine = await Engine.create(project, config)
    return Live(engine)


class Live:
    """A running engine: its events as they happen, and the control channel to it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.run_dir = engine.run_dir
        self.events: list[dict[str, Any]] = list(read_events(engine.log.path))  # run_started
        engine.listeners.append(self.events.append)
        self.task: asyncio.Task[str] | None = None

    async def __aenter__(self) -> Live:
        self.task = asyncio.create_task(self.engine.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if not self.task.done():  # the test failed mid-run: end it without leaking processes
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    @property
    def state(self) -> RunState:
        return self.engine.state

    def ctl(self, cmd: str, node_id: str | None = None, **kw: Any) -> None:
        append_control(self.run_dir, make_command(cmd, node_id, **kw))

    async def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20,
                   what: str = "an event") -> dict[str, Any]:
        """The first event (already seen or to come) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            assert self.task is not None
            if self.task.done():
                raise AssertionError(f"the run ended ({self.task.result()!r}) before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.02)

    async def event(self, type_: str, timeout: float = 20, **fields: Any) -> dict[str, Any]:
        return await self.wait(lambda e: e["type"] == type_ and all(e.get(k) == v for k, v in fields.items()),
                               timeout, f"{type_} {fields}")

    async def finish(self, timeout: float = 30) -> str:
        assert self.task is not None
        return await asyncio.wait_for(asyncio.shield(self.task), timeout)

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]


async def job_pids(run_dir: Path, node_id: str) -> list[int]:
    return await asyncio.to_thread(find_job_pids, job_prefix(run_dir) + node_id, prefix=True)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ----------------------------------------------------------------------------------- tests


async def test_pause_holds_agents_and_benches_until_resume(tmp_path: Path) -> None:
    records = cassette_for({"idea-alpha": change("VALUE -= 5", "SLEEP = 0.0"),
                            "idea-beta": change("VALUE -= 3", "SLEEP = 0.0")}, [])
    live = await start_engine(tmp_path, records, base_sleep=0.4, num_samples=2)
    async with live:
        await live.event("stage_started", id="1", stage="bench")
        live.ctl("pause")
        paused = await live.event("run_paused", timeout=5)
        await asyncio.sleep(1.0)
        held = [e for e in live.events if e["seq"] > paused["seq"] and e["type"] in ("agent_started", "stage_started")]
        assert held == [], f"work started while paused: {held}"
        assert live.state.paused and live.state.finished is None
        live.ctl("resume")
        unpaused = await live.event("run_unpaused", timeout=5)
        assert await live.finish() == "phases done"

    started = [e for e in live.events if e["type"] in ("agent_started", "stage_started")]
    assert all(e["seq"] < paused["seq"] or e["seq"] > unpaused["seq"] for e in started)
    after = [e for e in started if e["seq"] > unpaused["seq"]]
    assert {e.get("role") for e in after if e["type"] == "agent_started"} == {"ideas", "optimize"}
    assert {e["id"] for e in after if e["type"] == "stage_started"} == {"1.1", "1.2"}
    assert after[0]["ts"] - paused["ts"] >= 1.0
    assert live.state.evaluated == 3


async def test_prune_skips_the_node_next_phase_and_kills_its_running_subtree(tmp_path: Path) -> None:
    records = cassette_for(
        {"idea-alpha": change("VALUE -= 50"),                 # 1.1: the best of phase 0
         "idea-beta": change("VALUE -= 10"),                  # 1.2: second best
         "idea-gamma": change("VALUE -= 1", "SLEEP = 1.5")},  # 1.3: slow, keeps phase 0 open
        [change("VALUE -= 1", "SLEEP = 30") for _ in range(3)])  # phase 1: benches that hang
    # Benches run side by side, so 1.3's slow one keeps phase 0 open whatever order they start in.
    live = await start_engine(tmp_path, records, num_samples=3, num_phases=2, max_fix_attempts=1,
                              bench_concurrency=3)
    async with live:
        await live.event("node_evaluated", id="1.1")
        await live.event("node_evaluated", id="1.2")
        assert live.state.nodes["1.3"].status != "done", "phase 0 should still be running"
        live.ctl("prune", "1.1")
        await live.event("node_pruned", id="1.1", timeout=5)

        phase1 = await live.event("phase_started", phase=1)
        assert phase1["parents"] == ["1.2", "1.2", "1.2"]
        assert live.state.ranked()[0].id == "1.1", "1.1 is still the best, so only the prune kept it out"

        await live.wait(lambda e: e["type"] == "stage_started" and e["stage"] == "bench"
                        and e["id"].startswith("1.2."), what="a phase-1 bench under 1.2")
        pids = await job_pids(live.run_dir, "1.2.")
        assert pids
        pruned_at = time.monotonic()
        live.ctl("prune", "1.2")
        assert await live.finish(timeout=15) == "phases done"
        assert time.monotonic() - pruned_at < 8, "the pruned subtree's 30 s benches were not cut short"

    state = RunState.from_events(live.events)
    children = [n for n in state.nodes.values() if n.parent == "1.2"]
    assert len(children) == 3
    for node in children:
        assert (node.status, node.failure_stage, node.pruned) == ("failed", "killed", True), node.id
        assert node.failure_reason.startswith("killed by user during"), node.failure_reason
        assert not node.children, f"{node.id} was fixed although pruned"
    assert state.nodes["1.2"].ok and state.nodes["1.2"].pruned
    assert all(gone(pid) for pid in pids)
    assert await job_pids(live.run_dir, "") == []


async def test_pin_forces_a_weak_node_to_be_expanded(tmp_path: Path) -> None:
    records = cassette_for(
        {"idea-alpha": change("VALUE -= 50"),
         "idea-beta": change("VALUE -= 10", "SLEEP = 0.6"),  # keeps phase 0 open for the pin
         "idea-gamma": change("VALUE -= 1")},                # 1.3: the worst of phase 0
        [change("VALUE -= 1") for _ in range(3)])
    live = await start_engine(tmp_path, records, num_samples=3, num_phases=2)
    async with live:
        await live.event("node_created", id="1.3")
        live.ctl("pin", "1.3")
        await live.event("node_pinned", id="1.3", timeout=5)
        phase1 = await live.event("phase_started", phase=1)
        assert await live.finish() == "phases done"

    state = RunState.from_events(live.events)
    assert [n.id for n in state.ranked() if n.phase == 0] == ["1.1", "1.2", "1.3"]
    assert "1.3" in phase1["parents"] and "1.1" in phase1["parents"]  # pinned, plus the expand_top=1 best
    assert "1.2" not in phase1["parents"]
    expanded = [n for n in state.nodes.values() if n.parent == "1.3"]
    assert expanded and all(n.kind == "improve" and n.ok for n in expanded)


async def test_fork_with_hint_creates_a_fork_child_whose_prompt_has_the_hint(tmp_path: Path) -> None:
    hint = "try the XYZZY lookup table"
    records = cassette_for({"idea-alpha": change("VALUE -= 5", "SLEEP = 0.5"),
                            "idea-beta": change("VALUE -= 3", "SLEEP = 0.5")},
                           [change("VALUE -= 7", description="Apply the user's hint.")])
    live = await start_engine(tmp_path, records, num_samples=2)
    async with live:
        await live.event("node_evaluated", id="1")
        live.ctl("fork", "1", hint=hint)
        requested = await live.event("fork_requested", id="1", timeout=5)
        assert requested["hint"] == hint
        created = await live.wait(lambda e: e["type"] == "node_created" and e.get("kind") == "fork",
                                  timeout=5, what="the fork node")
        assert await live.finish() == "phases done"

    fork_id = created["id"]
    assert (created["parent"], created["hint"]) == ("1", hint)
    prompt = (live.run_dir / "nodes" / fork_id / "prompt.md").read_text()
    assert hint in prompt
    state = RunState.from_events(live.events)
    assert state.nodes[fork_id].ok and state.nodes[fork_id].metrics[RT] == 93.0
    assert state.pending_forks == []


async def test_kill_of_a_running_bench_fails_the_node_at_once_and_kills_the_process(tmp_path: Path) -> None:
    records = cassette_for({"idea-alpha": change("VALUE -= 5", "SLEEP = 5")}, [])
    live = await start_engine(tmp_path, records, num_samples=1, max_fix_attempts=2)
    async with live:
        await live.event("stage_started", id="1.1", stage="bench")
        deadline = time.monotonic() + 5
        while not (pids := await job_pids(live.run_dir, "1.1")) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert pids, "the bench process never showed up"
        killed_at = time.monotonic()
        live.ctl("kill", "1.1")
        failed = await live.event("node_failed", id="1.1", timeout=4)
        elapsed = time.monotonic() - killed_at
        assert await live.finish() == "phases done"

    # "killed" is not a fixable stage: a resume must not pay a fix agent for a node the user killed.
    assert failed["reason"] == "killed by user during bench" and failed["stage"] == "killed"
    assert elapsed < 3, f"kill took {elapsed:.1f} s"
    assert all(gone(pid) for pid in pids), "the bench process outlived the kill"
    assert await job_pids(live.run_dir, "") == []
    state = RunState.from_events(live.events)
    assert state.nodes["1.1"].children == [], "a killed node must not be sent to the fix agent"
    assert not [e for e in live.events if e["type"] == "stage_finished" and e["id"] == "1.1"]


async def test_budget_plus_and_minus_change_the_cap(tmp_path: Path) -> None:
    live = await start_engine(tmp_path, cassette_for({"idea-alpha": change("VALUE -= 1", "SLEEP = 0.0")}, []),
                              base_sleep=0.8, num_samples=1)
    cap = live.engine.budget.cap
    async with live:
        live.ctl("budget", tokens="+5000")
        first = await live.event("budget_changed", timeout=5)
        live.ctl("budget", tokens="-2k")
        second = await live.wait(lambda e: e["type"] == "budget_changed" and e["seq"] > first["seq"],
                                 timeout=5, what="the second budget_changed")
        assert (first["max_tokens"], second["max_tokens"]) == (cap + 5000, cap + 3000)
        assert live.engine.budget.cap == live.state.max_tokens == cap + 3000
        assert await live.finish() == "phases done"
    assert RunState.from_events(live.events).max_tokens == cap + 3000


async def test_commands_on_unknown_nodes_are_refused_without_harm(tmp_path: Path) -> None:
    live = await start_engine(tmp_path, cassette_for({"idea-alpha": change("VALUE -= 1", "SLEEP = 0.0")}, []),
                              base_sleep=0.8, num_samples=1)
    async with live:
        await live.event("stage_started", id="1", stage="bench")
        for cmd in ("prune", "pin", "kill", "fork"):
            live.ctl(cmd, "1.99")
        live.ctl("fork", "1")  # the baseline is still being measured: nothing to fork from yet
        refusals = []
        for cmd in ("prune", "pin", "kill", "fork"):
            refusals.append(await live.event("message", timeout=5, text=f"refused {cmd}: no node 1.99 in run 1"))
        await live.event("message", timeout=5, text="refused fork: node 1 has no successful evaluation to fork from")
        assert await live.finish() == "phases done"

    kinds = {e["type"] for e in live.events}
    assert not kinds & {"node_pruned", "node_pinned", "fork_requested"}
    state = RunState.from_events(live.events)
    assert set(state.nodes) == {"1", "1.1"} and all(n.ok for n in state.nodes.values())
