"""The engine driving the real openai client over HTTP (tests/llm_server.py), end to end in-process.

Why here and not in test_llm_backend.py: the backend tests prove one call is retried, timed out
and charged right; these prove the *run* keeps those promises — the budget the engine reports is
what the server billed, a transient 500 costs nothing extra, a stop cancels a hung request, and
no API key reaches the run directory, which users share as a cassette and a bug report.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from looptree.engine.core.config import Config, validate_config
from looptree.engine.core.events import read_events
from looptree.engine.core.state import RunState
from looptree.engine.errors import ConfigError, LooptreeError
from looptree.engine.run.control import append_control, make_command
from looptree.engine.run.engine import Engine

try:
    from llm_server import hang, length, llm_server, reply, status  # noqa: F401 - llm_server is a fixture
except ImportError:  # tests/ became a package
    from tests.llm_server import hang, length, llm_server, reply, status  # noqa: F401

SECRET = "sk-test-SECRET123"
KEY_ENV = "LOOPTREE_TEST_ENGINE_KEY"
COMPLETION = 30  # completion tokens the server bills for every reply

SOLVER = "VALUE = 100\n# knob\n"
BENCH = """\
import os
import solver

with open(os.environ.get("LOOPTREE_METRICS", "metrics.csv"), "w") as fh:
    fh.write("iteration,runtime_ms (lower is better)\\n")
    fh.write(f"0,{float(solver.VALUE)}\\n")
"""
IDEAS = json.dumps(["Lower VALUE by one", "Lower VALUE a little", "Shave VALUE", "Trim VALUE",
                    "Cut VALUE", "Drop VALUE", "Reduce VALUE", "Decrease VALUE"])
CHANGE = ("Lower VALUE by one.\n\nsolver.py\n<<<<<<< SEARCH\n# knob\n=======\nVALUE -= 1\n# knob\n"
          ">>>>>>> REPLACE\n")


# ----------------------------------------------------------------------------------- helpers


def make_project(tmp_path: Path) -> Path:
    """A git-less project: Engine.create initialises the repository."""
    project = tmp_path / "proj"
    project.mkdir()
    (project / "solver.py").write_text(SOLVER)
    (project / "bench.py").write_text(BENCH)
    return project


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def make_config(**sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "project": {"goal": "Make runtime_ms lower by lowering VALUE in solver.py.",
                    "writable": ["solver.py"], "readonly": ["bench.py"]},
        "bench": {"command": f"{sys.executable} bench.py", "repeats": 1, "compare": "off", "timeout": 60,
                  "device": "cpu"},
        # concurrency: the test server computes requests in parallel (a local server would get 1).
        "agent": {"provider": "local", "base_url": "", "api_key_env": KEY_ENV, "max_tokens": 400,
                  "request_timeout": 20, "max_retries": 3, "concurrency": 4},
        "search": {"num_samples": 2, "num_phases": 1, "num_workers": 4, "max_fix_attempts": 0,
                   "early_stop_patience": 0},
        "budget": {"max_tokens": 1_000_000, "requests_per_minute": 0},
        "gpu": {"devices": "none", "telemetry": "none"},
    }
    return validate_config(_merge(data, sections))


def live_config(server: Any, **sections: dict[str, Any]) -> Config:
    return make_config(**_merge({"agent": {"base_url": server.base_url}}, sections))


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    return list(read_events(run_dir / "events.jsonl"))


def of_type(events: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == type_]


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def run_engine(engine: Engine, timeout: float = 60) -> str:
    """Run to the end; on a test timeout, stop the engine rather than leak its processes."""
    task = asyncio.create_task(engine.run())
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise


def tree_shape(state: RunState) -> set[tuple[str, str | None, str, str]]:
    """Nodes without their run number: (.1.2, parent, kind, status)."""
    def strip(node_id: str | None) -> str | None:
        return None if node_id is None else node_id.partition(".")[2] or "<base>"

    return {(strip(n.id), strip(n.parent), n.kind, n.status) for n in state.nodes.values()}


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


# ----------------------------------------------------------------------------------- tests


async def test_live_run_counts_server_usage_records_no_secret_and_replays(
        tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.script(reply(IDEAS, completion_tokens=COMPLETION),
                      *[reply(CHANGE, completion_tokens=COMPLETION) for _ in range(6)])
    config = live_config(llm_server, search={"num_samples": 2, "num_phases": 2, "expand_top": 2})
    engine = await Engine.create(project, config)
    run_dir = engine.run_dir
    assert await run_engine(engine) == "phases done"

    events = events_of(run_dir)
    state = RunState.from_events(events)
    assert state.finished == "phases done"
    # Baseline + 2 ideas + 2 improvements, every one evaluated on the real bench.
    evaluated = {e["id"] for e in of_type(events, "node_evaluated")}
    assert evaluated == {"1", "1.1", "1.2", "1.1.1", "1.2.1"}, evaluated
    assert state.nodes["1.1.1"].metrics["runtime_ms (lower is better)"] == 98.0

    # Tokens: exactly what the server billed, counted once per call, in events, fold and finish.
    spent = of_type(events, "tokens_spent")
    assert len(spent) == len(llm_server.requests) == len(llm_server.reported) == 5
    assert sum(e["total_tokens"] for e in spent) == llm_server.reported_total
    assert all(e["completion_tokens"] == COMPLETION for e in spent)
    assert state.tokens_spent == llm_server.reported_total == engine.budget.spent
    assert of_type(events, "run_finished")[-1]["tokens"] == llm_server.reported_total

    # The key really was sent to the server ...
    assert all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in llm_server.requests)
    # ... and appears nowhere in the run directory, nor does any bearer header.
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert run_dir / "llm" / "calls.jsonl" in files and len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert SECRET.encode() not in data, f"the API key leaked into {path}"
        assert b"Bearer" not in data, f"a bearer token header leaked into {path}"

    # The run's llm/calls.jsonl is a cassette: a replayed run grows the same tree, offline.
    calls = [json.loads(line) for line in (run_dir / "llm" / "calls.jsonl").read_text().splitlines()]
    assert Counter(c["role"] for c in calls) == {"ideas": 1, "optimize": 4}
    served = len(llm_server.requests)
    replay_config = make_config(agent={"provider": "replay", "cassette": str(run_dir / "llm" / "calls.jsonl")},
                                search={"num_samples": 2, "num_phases": 2, "expand_top": 2})
    replayed = await Engine.create(project, replay_config)
    assert replayed.run_dir.name == "2"
    assert await run_engine(replayed) == "phases done"
    state2 = RunState.from_events(events_of(replayed.run_dir))
    assert tree_shape(state2) == tree_shape(state)
    assert state2.tokens_spent == state.tokens_spent  # the cassette's usage is charged again
    assert len(llm_server.requests) == served, "replay must not touch the network"


async def test_tight_budget_ends_budget_spent_without_overshoot(tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.set_delay(0.2)  # replies overlap, so several reservations are held at once
    llm_server.script(reply(IDEAS, completion_tokens=COMPLETION),
                      *[reply(CHANGE, completion_tokens=COMPLETION) for _ in range(20)])
    # Each call reserves its prompt estimate + agent.max_tokens (~1000 + 2000) and spends a few
    # hundred: calls blocked only by reservations in flight wait for them, and the run ends when
    # what is left unspent cannot hold one more reservation — well inside phase 0.
    cap = 4500
    config = live_config(llm_server, agent={"max_tokens": 2000},
                         search={"num_samples": 8, "num_workers": 16, "num_phases": 2},
                         budget={"max_tokens": cap})
    engine = await Engine.create(project, config)
    assert await run_engine(engine) == "budget spent"

    events = events_of(engine.run_dir)
    finished = of_type(events, "run_finished")[-1]
    assert finished["reason"] == "budget spent"
    spent = of_type(events, "tokens_spent")
    assert 2 <= len(spent) < 1 + 8, "the budget should run out inside phase 0"
    assert all(e["spent"] <= cap for e in spent)
    assert finished["tokens"] == engine.budget.spent == sum(e["total_tokens"] for e in spent) <= cap
    # No request was sent without a reservation: every request the server saw was charged.
    assert len(llm_server.requests) == len(spent)
    assert sum(e["total_tokens"] for e in spent) == llm_server.reported_total
    assert engine.budget.reserved == 0
    assert not of_type(events, "phase_finished")
    # Replies already paid for are not thrown away: each was applied and benchmarked.
    paid = {e["id"] for e in spent if e["role"] == "optimize"}
    assert paid and paid <= {e["id"] for e in of_type(events, "node_evaluated")}


async def test_no_node_is_left_generating_after_the_budget_runs_out(
        tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.script(reply(IDEAS, completion_tokens=COMPLETION),
                      *[reply(CHANGE, completion_tokens=COMPLETION) for _ in range(8)])
    config = live_config(llm_server, agent={"max_tokens": 2000},
                         search={"num_samples": 4, "num_workers": 16}, budget={"max_tokens": 4000})
    engine = await Engine.create(project, config)
    assert await run_engine(engine) == "budget spent"
    state = RunState.from_events(events_of(engine.run_dir))
    started = {e["id"] for e in of_type(events_of(engine.run_dir), "agent_started") if e["id"]}
    answered = {e["id"] for e in of_type(events_of(engine.run_dir), "agent_finished")}
    assert started - answered, "the cap should refuse some optimize calls"
    stuck = sorted(n.id for n in state.nodes.values() if n.status == "generating")
    assert stuck == [], f"finished run shows agents still generating for {stuck}"


async def test_two_server_errors_then_success_are_retried_and_counted_once(
        tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.script(status(500, message="upstream overloaded"), status(500, message="upstream overloaded"),
                      reply(IDEAS, completion_tokens=COMPLETION),
                      *[reply(CHANGE, completion_tokens=COMPLETION) for _ in range(2)])
    engine = await Engine.create(project, live_config(llm_server))
    assert await run_engine(engine) == "phases done"

    events = events_of(engine.run_dir)
    assert {e["id"] for e in of_type(events, "node_evaluated")} == {"1", "1.1", "1.2"}
    spent = of_type(events, "tokens_spent")
    assert len(llm_server.requests) == 5 and len(llm_server.reported) == 3 == len(spent)
    assert [e["role"] for e in spent].count("ideas") == 1
    assert sum(e["total_tokens"] for e in spent) == llm_server.reported_total == engine.budget.spent
    assert not of_type(events, "agent_failed")
    ideas_call = next(json.loads(line) for line in (engine.run_dir / "llm" / "calls.jsonl").read_text().splitlines()
                      if json.loads(line)["role"] == "ideas")
    assert ideas_call["meta"]["attempts"] == 3
    assert all("HTTP 500" in reason for reason in ideas_call["meta"]["retried"])


async def test_stop_while_the_server_hangs_cancels_the_call_promptly(
        tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.script(reply(IDEAS, completion_tokens=COMPLETION), hang(60), hang(60))
    engine = await Engine.create(project, live_config(llm_server))
    run_dir = engine.run_dir
    task = asyncio.create_task(engine.run())
    try:
        # Both optimize calls have reached the server and hang there.
        await wait_until(lambda: len(llm_server.requests) == 3 or task.done(), 30,
                         "two optimize calls hanging in the server")
        assert not task.done(), f"the run ended early: {task.result()!r}"
        started = time.monotonic()
        append_control(run_dir, make_command("stop"))
        reason = await asyncio.wait_for(asyncio.shield(task), 10)
        elapsed = time.monotonic() - started
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert reason == "stopped by user"
    assert elapsed < 10, f"stop took {elapsed:.1f} s"

    events = events_of(run_dir)
    assert of_type(events, "stop_requested")[0]["reason"] == "stopped by user"
    assert of_type(events, "run_finished")[-1]["reason"] == "stopped by user"
    # The hung calls were cancelled: no reply, no charge, no reservation left behind.
    assert [e["role"] for e in of_type(events, "tokens_spent")] == ["ideas"]
    assert [e["role"] for e in of_type(events, "agent_finished")] == []
    assert engine.budget.reserved == 0
    assert engine.budget.spent == llm_server.reported_total
    assert not list((run_dir / "worktrees").glob("*")), "a stopped run left worktrees behind"
    # The client closed its connections although the server still holds the requests open.
    assert llm_server.pending_script == 0
    open_to_server = [c for c in psutil.Process().net_connections(kind="tcp")
                      if c.raddr and c.raddr.port == llm_server.port]
    assert open_to_server == [], f"connections to the hung server still open: {open_to_server}"


async def test_missing_api_key_is_refused_before_the_run_starts(
        tmp_path: Path, llm_server, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path)
    monkeypatch.delenv("LOOPTREE_TEST_MISSING_KEY", raising=False)
    config = live_config(llm_server, agent={"provider": "openai", "api_key_env": "LOOPTREE_TEST_MISSING_KEY"})
    with pytest.raises(ConfigError) as info:
        await Engine.create(project, config)
    assert "$LOOPTREE_TEST_MISSING_KEY" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (project / ".looptree" / "runs").exists(), "a refused start must not allocate a run"
    assert llm_server.requests == []


async def test_local_provider_with_named_but_unset_key_env_is_refused(
        tmp_path: Path, llm_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The user named the variable on purpose (a vLLM/LiteLLM server started with --api-key):
    sending a dummy key instead only fails at the first call, after the baseline has run."""
    project = make_project(tmp_path)
    monkeypatch.delenv("LOOPTREE_TEST_MISSING_KEY", raising=False)
    config = live_config(llm_server, agent={"api_key_env": "LOOPTREE_TEST_MISSING_KEY"})
    try:
        engine = await Engine.create(project, config)
    except ConfigError as exc:
        assert "$LOOPTREE_TEST_MISSING_KEY" in str(exc)
        return
    engine.log.close()  # it started: give back what it took before failing the test
    engine.lock.release()
    pytest.fail("Engine.create accepted agent.api_key_env naming an unset variable")


# ----------------------------------------------------------- fail fast, say what happened


@pytest.mark.parametrize("mistake", ["wrong port", "no /v1"])
async def test_an_unreachable_endpoint_is_refused_before_the_baseline(
        tmp_path: Path, llm_server, api_key: str, mistake: str) -> None:
    import socket

    project = make_project(tmp_path)
    if mistake == "wrong port":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url, expected = f"http://127.0.0.1:{port}/v1", f"nothing listening at 127.0.0.1:{port}"
    else:
        llm_server.configure(require_v1=True)
        url = f"http://127.0.0.1:{llm_server.port}"
        expected = f"did you mean agent.base_url = '{url}/v1'"
    started = time.monotonic()
    with pytest.raises(LooptreeError) as info:
        await Engine.create(project, make_config(agent={"base_url": url}))
    assert time.monotonic() - started < 5
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (project / ".looptree" / "runs").exists(), "no run, no baseline"
    assert llm_server.requests == []


async def test_a_run_whose_every_call_failed_ends_as_an_error(tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.script(*[status(400, message="context length exceeded") for _ in range(3)])
    engine = await Engine.create(project, live_config(llm_server))
    reason = await run_engine(engine)
    assert reason.startswith("error: no agent call succeeded (3 failed); last: ")
    assert "context length exceeded" in reason
    assert of_type(events_of(engine.run_dir), "run_finished")[-1]["reason"] == reason


async def test_silence_is_retried_with_an_event_and_the_run_goes_on(
        tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.script(hang(10), reply(IDEAS, completion_tokens=COMPLETION),
                      *[reply(CHANGE, completion_tokens=COMPLETION) for _ in range(2)])
    engine = await Engine.create(project, live_config(llm_server, agent={"first_token_timeout": 0.5}))
    assert await run_engine(engine) == "phases done"
    events = events_of(engine.run_dir)
    [retry] = of_type(events, "agent_retry")
    assert (retry["id"], retry["role"], retry["attempt"]) == (None, "ideas", 1)
    assert retry["reason"] == "no first token within 0.5 s" and retry["billed_maybe"] is True
    assert retry["delay_s"] >= 0 and retry["billed_tokens"] > 0
    # The abandoned attempt is in the budget and in the fold, flagged as an estimate.
    state = RunState.from_events(events)
    assert state.tokens_spent == engine.budget.spent == llm_server.reported_total + retry["billed_tokens"]
    assert [e.get("billed_maybe") for e in of_type(events, "tokens_spent")].count(True) == 1


async def test_cut_off_and_unreadable_replies_say_so(tmp_path: Path, llm_server, api_key: str) -> None:
    project = make_project(tmp_path)
    llm_server.script(reply("I would rather not list ideas.\nSorry.", completion_tokens=COMPLETION),
                      length("Lower VALUE by one.\n\nsolver.py\n<<<<<<< SEARCH\n# kn", completion_tokens=400),
                      reply(CHANGE, completion_tokens=COMPLETION))
    engine = await Engine.create(project, live_config(llm_server))
    assert await run_engine(engine) == "phases done"
    events = events_of(engine.run_dir)
    [ideas] = of_type(events, "ideas_generated")
    assert ideas["ideas"] == []
    assert "first line: 'I would rather not list ideas.'" in ideas["reason"]
    assert str(engine.run_dir / "ideas.md") in ideas["reason"]
    assert (engine.run_dir / "ideas.md").read_text().startswith("I would rather not")
    [failed] = [e for e in of_type(events, "node_failed") if e["stage"] == "edit"]
    assert failed["reason"].startswith("reply cut off at max_tokens=400 (agent.max_tokens) after 400 tokens: ")
    cut = [e for e in of_type(events, "agent_finished") if e.get("cut_off")]
    assert [e["id"] for e in cut] == [failed["id"]]


@pytest.mark.slow
def test_cli_exit_status_says_what_happened(tmp_path: Path, llm_server, api_key: str) -> None:
    """Through the real command: an unreachable endpoint is exit 2 before anything runs, a run
    whose every call failed is exit 1 with the reason — never "phases done" and 0."""
    import socket
    import subprocess

    import tomli_w

    project = make_project(tmp_path)
    config = make_config(agent={"base_url": llm_server.base_url}).to_dict()
    (project / "looptree.toml").write_text(tomli_w.dumps(config))

    def looptree(*overrides: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui",
                               *overrides], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = looptree(f"agent.base_url=http://127.0.0.1:{port}/v1")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"looptree: error: agent endpoint check failed: nothing listening at 127.0.0.1:{port} (connection "
        f"refused); is the server running? (agent.base_url = 'http://127.0.0.1:{port}/v1')")
    assert not (project / ".looptree" / "runs").exists()

    llm_server.script(*[status(401, message="key revoked") for _ in range(3)])
    failed = looptree()
    assert failed.returncode == 1, failed.stderr
    assert "finished: error: no agent call succeeded (3 failed); last: " in failed.stderr
    assert "key revoked" in failed.stderr
