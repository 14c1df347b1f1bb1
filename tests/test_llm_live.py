"""One short call against a real endpoint, only when LOOPTREE_TEST_* are set.

LOOPTREE_TEST_BASE_URL, LOOPTREE_TEST_MODEL and LOOPTREE_TEST_API_KEY name the endpoint; the
test spends a few dozen tokens.
"""

from __future__ import annotations

import os

import pytest

from engine.llm.budget import BudgetedBackend, TokenBudget
from engine.llm.openai_backend import OpenAIBackend
from engine.llm.providers import resolve_endpoint
from engine.llm.recorder import CallRecorder
from engine.llm.types import LLMRequest

pytestmark = pytest.mark.live_llm

BASE_URL = os.environ.get("LOOPTREE_TEST_BASE_URL", "")
MODEL = os.environ.get("LOOPTREE_TEST_MODEL", "")


@pytest.mark.skipif(not (BASE_URL and MODEL), reason="LOOPTREE_TEST_BASE_URL/MODEL not set")
async def test_one_short_real_call(tmp_path):
    key_present = bool(os.environ.get("LOOPTREE_TEST_API_KEY"))
    endpoint = resolve_endpoint(
        "openai" if key_present else "local", BASE_URL, "LOOPTREE_TEST_API_KEY"
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
