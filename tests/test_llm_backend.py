"""OpenAIBackend through the real openai client over real HTTP (tests/llm_server.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from looptree.engine.agents.llm.budget import BudgetedBackend, TokenBudget
from looptree.engine.agents.llm.openai_backend import OpenAIBackend
from looptree.engine.agents.llm.providers import Endpoint
from looptree.engine.agents.llm.ratelimit import RateLimiter
from looptree.engine.agents.llm.types import (
    LLMEmptyReply,
    LLMRequest,
    LLMRequestRejected,
    LLMRetriesExhausted,
    LLMTimeout,
    prompt_token_bound,
)

try:
    from llm_server import drop, empty, hang, length, llm_server, no_usage, reply, status  # noqa: F401 - llm_server is a fixture
except ImportError:  # tests/ became a package
    from tests.llm_server import drop, empty, hang, length, llm_server, no_usage, reply, status  # noqa: F401

KEY = "sk-test-0123456789abcdefghijklmnop"


def make_request(text: str = "Make solve() faster.", max_tokens: int = 64) -> LLMRequest:
    return LLMRequest(
        role="optimize",
        messages=[
            {"role": "system", "content": "You optimize code."},
            {"role": "user", "content": text},
        ],
        model="gpt-4.1-mini",
        max_tokens=max_tokens,
        temperature=0.3,
        node_id="1.1",
        prompt_hash="abc",
    )


def make_backend(server, **kw) -> OpenAIBackend:
    options = {"timeout_s": 2.0, "max_retries": 4, "backoff_base_s": 0.02, "backoff_max_s": 0.1}
    options.update(kw)
    return OpenAIBackend(Endpoint(server.base_url, KEY, "TEST_KEY", "local"), **options)


async def test_normal_reply_sends_key_and_params(llm_server):
    backend = make_backend(llm_server)
    llm_server.script(reply("Use sum().", prompt_tokens=20, completion_tokens=5))
    response = await backend.complete(make_request())
    await backend.aclose()

    assert response.text == "Use sum()."
    assert (response.prompt_tokens, response.completion_tokens) == (20, 5)
    assert response.finish_reason == "stop" and not response.truncated
    assert response.attempts == 1 and not response.usage_estimated
    [seen] = llm_server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers.get("x-stainless-retry-count") in (None, "0")
    assert seen.body["model"] == "gpt-4.1-mini"
    assert seen.body["max_tokens"] == 64
    assert seen.body["temperature"] == 0.3
    assert seen.body["messages"][1]["content"] == "Make solve() faster."
    assert "stream" not in seen.body or seen.body["stream"] is False


async def test_base_url_without_v1_hits_chat_completions(llm_server):
    backend = OpenAIBackend(
        Endpoint(f"http://127.0.0.1:{llm_server.port}", KEY, "K", "cborg"), timeout_s=2
    )
    response = await backend.complete(make_request())
    await backend.aclose()
    assert response.text.startswith("reply number")
    assert llm_server.requests[0].path == "/chat/completions"


async def test_429_honours_retry_after_and_limiter_shows_backoff(llm_server):
    limiter = RateLimiter(requests_per_minute=1000)
    backend = make_backend(llm_server, rate_limiter=limiter)
    llm_server.script(
        status(429, retry_after="1"), reply("ok", prompt_tokens=7, completion_tokens=3)
    )
    budget = TokenBudget(10_000)
    budgeted = BudgetedBackend(backend, budget)

    started = time.monotonic()
    task = asyncio.create_task(budgeted.complete(make_request()))
    await asyncio.sleep(0.3)
    assert limiter.backoff_s > 0.5  # the dashboard sees the server-imposed back-off
    response = await task
    elapsed = time.monotonic() - started
    await backend.aclose()

    assert elapsed >= 1.0
    assert response.attempts == 2 and len(llm_server.requests) == 2
    assert budget.spent == 10 == llm_server.reported_total  # one call, charged once
    assert budget.reserved == 0


async def test_5xx_and_dropped_connection_are_retried(llm_server):
    backend = make_backend(llm_server)
    llm_server.script(status(500), status(503), drop(), reply("fine"))
    response = await backend.complete(make_request())
    await backend.aclose()
    assert response.text == "fine"
    assert response.attempts == 4
    assert len(llm_server.requests) == 4


async def test_retries_are_bounded(llm_server):
    backend = make_backend(llm_server, max_retries=2)
    llm_server.script(status(500), status(502), status(500), reply("never reached"))
    budget = TokenBudget(10_000)
    with pytest.raises(LLMRetriesExhausted) as info:
        await BudgetedBackend(backend, budget).complete(make_request())
    await backend.aclose()
    assert "failed 3 time(s)" in str(info.value) and "HTTP 500" in str(info.value)
    assert info.value.attempts == 3
    assert len(llm_server.requests) == 3
    assert budget.spent == 0 and budget.reserved == 0  # nothing reported, nothing charged


async def test_non_retryable_4xx_fails_at_once_with_server_message(llm_server):
    backend = make_backend(llm_server)
    llm_server.script(status(404, message="The model `gpt-9` does not exist"))
    with pytest.raises(LLMRequestRejected) as info:
        await backend.complete(make_request())
    await backend.aclose()
    assert "HTTP 404: The model `gpt-9` does not exist" in str(info.value)
    assert "\n" not in str(info.value)
    assert len(llm_server.requests) == 1


async def test_quota_429_and_huge_retry_after_are_not_waited_for(llm_server):
    backend = make_backend(llm_server, max_retry_after_s=30)
    llm_server.script(status(429, message="You exceeded your current quota",
                             error_code="insufficient_quota"))
    with pytest.raises(LLMRequestRejected, match="exceeded your current quota"):
        await backend.complete(make_request())
    llm_server.script(status(429, retry_after="3600"))
    started = time.monotonic()
    with pytest.raises(LLMRetriesExhausted, match="wait 3600 s"):
        await backend.complete(make_request())
    await backend.aclose()
    assert time.monotonic() - started < 1
    assert len(llm_server.requests) == 2


async def test_hanging_attempt_times_out_and_is_retried(llm_server):
    backend = make_backend(llm_server, timeout_s=0.3)
    llm_server.script(hang(5), reply("after the hang"))
    started = time.monotonic()
    response = await backend.complete(make_request())
    await backend.aclose()
    assert response.text == "after the hang" and response.attempts == 2
    assert 0.3 <= time.monotonic() - started < 2


async def test_whole_call_deadline_stops_a_hanging_server(llm_server):
    backend = make_backend(llm_server, timeout_s=5, call_timeout_s=0.5)
    llm_server.script(hang(5))
    budget = TokenBudget(10_000)
    started = time.monotonic()
    with pytest.raises(LLMTimeout, match="gave up after 0.5 s") as info:
        await BudgetedBackend(backend, budget).complete(make_request())
    await backend.aclose()
    assert time.monotonic() - started < 1.5
    # The request reached the server, which may bill it: the whole attempt is charged.
    assert info.value.billed_maybe
    assert budget.reserved == 0 and budget.spent == prompt_token_bound(make_request().messages) + 64


async def test_cancellation_propagates_and_releases_the_reservation(llm_server):
    backend = make_backend(llm_server, timeout_s=5)
    llm_server.script(hang(5))
    budget = TokenBudget(10_000)
    task = asyncio.create_task(BudgetedBackend(backend, budget).complete(make_request()))
    await asyncio.sleep(0.3)
    assert budget.reserved > 0
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await backend.aclose()
    assert time.monotonic() - started < 0.5
    assert budget.reserved == 0 and budget.spent == 0


async def test_streaming_accumulates_deltas_and_usage(llm_server):
    backend = make_backend(llm_server, stream=True)
    text = "A streamed reply that spans several chunks of seven characters."
    llm_server.script(reply(text, prompt_tokens=30, completion_tokens=12))
    response = await backend.complete(make_request())
    await backend.aclose()
    assert response.text == text
    assert (response.prompt_tokens, response.completion_tokens) == (30, 12)
    assert not response.usage_estimated
    body = llm_server.requests[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


async def test_stream_dropped_before_reply_is_retried(llm_server):
    backend = make_backend(llm_server, stream=True)
    llm_server.script(drop(), reply("second try"))
    response = await backend.complete(make_request())
    await backend.aclose()
    assert response.text == "second try" and response.attempts == 2


@pytest.mark.parametrize("stream", [False, True])
async def test_missing_usage_is_estimated_and_charged(llm_server, stream):
    backend = make_backend(llm_server, stream=stream)
    text = "x" * 70  # 70 chars → 20 tokens at 3.5 chars/token
    llm_server.script(no_usage(text))
    budget = TokenBudget(10_000)
    request = make_request()
    response = await BudgetedBackend(backend, budget).complete(request)
    await backend.aclose()
    assert response.usage_estimated
    assert response.completion_tokens == 20
    # The prompt is charged at its proven bound (bytes + template allowance): never below the truth.
    assert response.prompt_tokens == prompt_token_bound(request.messages)
    assert budget.spent == response.total_tokens > 0
    assert llm_server.reported == []


@pytest.mark.parametrize("stream", [False, True])
async def test_finish_reason_length_returns_truncated_text(llm_server, stream):
    backend = make_backend(llm_server, stream=stream)
    llm_server.script(length("def solve(xs):\n    return su", completion_tokens=64))
    response = await backend.complete(make_request())
    await backend.aclose()
    assert response.text == "def solve(xs):\n    return su"
    assert response.finish_reason == "length" and response.truncated


@pytest.mark.parametrize("stream", [False, True])
async def test_empty_reply_is_an_error_but_still_charged(llm_server, stream):
    backend = make_backend(llm_server, stream=stream)
    llm_server.script(empty(prompt_tokens=40, completion_tokens=8))
    budget = TokenBudget(10_000)
    with pytest.raises(LLMEmptyReply, match="empty reply") as info:
        await BudgetedBackend(backend, budget).complete(make_request())
    await backend.aclose()
    assert info.value.attempts == 1
    assert budget.spent == 48 == llm_server.reported_total
    assert budget.reserved == 0


async def test_reasoning_model_parameter_quirks_are_learnt(llm_server):
    backend = make_backend(llm_server)
    llm_server.script(
        status(400, message="Unsupported parameter: 'max_tokens' is not supported with this "
                            "model. Use 'max_completion_tokens' instead."),
        status(400, message="Unsupported value: 'temperature' does not support 0.3 with this "
                            "model. Only the default (1) value is supported."),
        reply("ok"),
        reply("ok again"),
    )
    first = await backend.complete(make_request())
    second = await backend.complete(make_request())
    await backend.aclose()
    assert (first.text, second.text) == ("ok", "ok again")
    bodies = [r.body for r in llm_server.requests]
    assert len(bodies) == 4
    assert "max_tokens" in bodies[0]
    assert bodies[1]["max_completion_tokens"] == 64 and "max_tokens" not in bodies[1]
    for body in bodies[2:]:  # learnt once, applied to later calls of the model
        assert body["max_completion_tokens"] == 64
        assert "max_tokens" not in body and "temperature" not in body
