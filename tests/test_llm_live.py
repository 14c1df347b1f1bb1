"""One short call against a real endpoint, only when LOOPTREE_TEST_* are set.

LOOPTREE_TEST_BASE_URL, LOOPTREE_TEST_MODEL and LOOPTREE_TEST_API_KEY name the endpoint; the
test spends a few dozen tokens.
"""

from __future__ import annotations

import os

import pytest

from looptree.engine.agents.llm.budget import BudgetedBackend, TokenBudget
from looptree.engine.agents.llm.openai_backend import OpenAIBackend
from looptree.engine.agents.llm.providers import resolve_endpoint
from looptree.engine.agents.llm.recorder import CallRecorder
from looptree.engine.agents.llm.types import LLMRequest

pytestmark = pytest.mark.live_llm

BASE_URL = os.environ.get("LOOPTREE_TEST_BASE_URL", "")
MODEL = os.environ.get("LOOPTREE_TEST_MODEL", "")


@pytest.mark.skipif(not (BASE_URL and MODEL), reason="LOOPTREE_TEST_BASE_URL/MODEL not set")
async def test_one_short_real_call(tmp_path):
    key_present = bool(os.environ.get("LOOPTREE_TEST_API_KEY"))
    endpoint = resolve_endpoint(
        "openai" if key_present else "local", BASE_URL, "LOOPTREE_TEST_API_KEY" if key_present else ""
    )
    backend = OpenAIBackend(
        endpoint, timeout_s=60, max_retries=2, recorder=CallRecorder(tmp_path / "llm")
    )
    budget = TokenBudget(2000)
    request = LLMRequest(
        role="ideas",
        messages=[{"role": "user", "content": "Reply with the single word: pong"}],
        model=MODEL,
        max_tokens=256,
        temperature=0.0,
        node_id=None,
        prompt_hash="live",
    )
    try:
        response = await BudgetedBackend(backend, budget).complete(request)
    finally:
        await backend.aclose()
    assert response.text.strip()
    assert response.prompt_tokens > 0 and response.completion_tokens > 0
    assert budget.spent == response.total_tokens <= 2000
    recorded = (tmp_path / "llm" / "calls.jsonl").read_text()
    if key_present:
        assert os.environ["LOOPTREE_TEST_API_KEY"] not in recorded


@pytest.mark.skipif(not (BASE_URL and MODEL), reason="LOOPTREE_TEST_BASE_URL/MODEL not set")
async def test_one_short_real_run(tmp_path):
    """A whole run (ideas, one agent, build, bench) against the real endpoint, a small budget."""
    from looptree.engine.core.config import validate_config
    from looptree.engine.core.state import RunState
    from looptree.engine.run.engine import Engine

    project = tmp_path / "proj"
    project.mkdir()
    (project / "solver.py").write_text(
        "def total(n):\n    s = 0\n    for i in range(n):\n        s += i\n    return s\n")
    (project / "bench.py").write_text(
        "import time, solver\n"
        "t = time.perf_counter(); assert solver.total(300000) == sum(range(300000))\n"
        "ms = (time.perf_counter() - t) * 1000\n"
        "open('metrics.csv', 'w').write(f'iteration,runtime_ms (lower is better)\\n1,{ms}\\n')\n")
    key_present = bool(os.environ.get("LOOPTREE_TEST_API_KEY"))
    config = validate_config({
        "project": {"goal": "Make total() in solver.py faster, same results.", "writable": ["solver.py"],
                    "readonly": ["bench.py"]},
        "bench": {"command": "python bench.py", "repeats": 1, "compare": "off"},
        "agent": {"provider": "openai" if key_present else "local", "base_url": BASE_URL, "model": MODEL,
                  "api_key_env": "LOOPTREE_TEST_API_KEY" if key_present else "", "max_tokens": 2000},
        "search": {"num_samples": 1, "num_phases": 1, "max_fix_attempts": 1},
        "budget": {"max_tokens": 40000},
    })
    engine = await Engine.create(project, config)
    reason = await engine.run()
    assert reason in ("phases done", "early stop", "budget spent")
    state = RunState.from_events(
        __import__("looptree.engine.core.events", fromlist=["read_events"]).read_events(engine.run_dir / "events.jsonl"))
    assert state.tokens_spent > 0 and state.tokens_spent <= 40000
    assert state.baseline is not None and state.baseline.ok
