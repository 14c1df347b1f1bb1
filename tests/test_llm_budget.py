"""TokenBudget arithmetic, and the cap under 16 concurrent calls over real HTTP."""

from __future__ import annotations

import asyncio
import logging

import pytest

from looptree.engine.agents.llm.budget import BudgetedBackend, TokenBudget, estimate_request_tokens
from looptree.engine.agents.llm.openai_backend import OpenAIBackend
from looptree.engine.agents.llm.pricing import PriceTable
from looptree.engine.agents.llm.providers import Endpoint
from looptree.engine.agents.llm.types import (
    LLMError,
    LLMRequest,
    LLMRequestRejected,
    estimate_prompt_tokens,
    prompt_token_bound,
)
from looptree.engine.errors import BudgetExhausted, ConfigError

try:
    from llm_server import drop, llm_server, reply, status  # noqa: F401
except ImportError:  # tests/ became a package
    from tests.llm_server import drop, llm_server, reply, status  # noqa: F401


def make_request(n: int = 0, max_tokens: int = 100, model: str = "gpt-4.1-mini") -> LLMRequest:
    return LLMRequest(
        role="optimize",
        messages=[
            {"role": "system", "content": "You optimize Python code for speed."},
            {"role": "user", "content": f"Idea {n}: make solve() in solver.py faster. " * 2},
        ],
        model=model,
        max_tokens=max_tokens,
        temperature=0.7,
        node_id=f"1.{n}",
        prompt_hash=str(n),
    )


def test_estimate_is_chars_over_3_5_rounded_up_plus_overhead():
    messages = [{"role": "user", "content": "x" * 8}]  # 8/3.5 = 2.29 → 3
    assert estimate_prompt_tokens(messages) == 3 + 4 + 3
    parts = [{"role": "user", "content": [{"type": "text", "text": "x" * 7}]}]
    assert estimate_prompt_tokens(parts) == 3 + 4 + 2
    request = make_request(max_tokens=500)
    # A reservation counts the prompt at its proven bound, not at this estimate.
    assert estimate_request_tokens(request) == prompt_token_bound(request.messages) + 500


async def test_reserve_settle_release_arithmetic():
    budget = TokenBudget(1000)
    a = await budget.reserve(300)
    b = await budget.reserve(400)
    assert (budget.reserved, budget.spent, budget.remaining) == (700, 0, 300)
    budget.settle(a, 120, prompt_tokens=100, completion_tokens=20)
    assert (budget.reserved, budget.spent, budget.remaining) == (400, 120, 480)
    budget.release(b)
    assert (budget.reserved, budget.spent, budget.remaining) == (0, 120, 880)
    assert (budget.prompt_tokens, budget.completion_tokens) == (100, 20)
    with pytest.raises(RuntimeError):
        budget.release(b)  # a reservation ends once


async def test_reservation_that_does_not_fit_is_refused_with_a_clear_line():
    budget = TokenBudget(1000)
    budget.settle(await budget.reserve(700), 700)
    with pytest.raises(BudgetExhausted) as info:
        await budget.reserve(301)
    message = str(info.value)
    assert "301 tokens" in message and "300 of 1,000 left" in message and "\n" not in message
    assert (await budget.reserve(300)).tokens == 300


async def test_reservation_blocked_only_by_calls_in_flight_waits_for_them():
    """Budget that is held, not spent, is not gone: the next call waits instead of ending the run."""
    budget = TokenBudget(1000)
    held = await budget.reserve(700)
    waiting = asyncio.create_task(budget.reserve(350))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    budget.settle(held, 650)  # the call used less than it reserved: 350 now fit
    assert (await asyncio.wait_for(waiting, 2)).tokens == 350
    held2 = await budget.reserve(0)
    budget.release(held2)
    blocked = asyncio.create_task(budget.reserve(100))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    budget.set_cap(700)  # lowering the cap below spent + the request turns the wait into a refusal
    budget.release(waiting.result())
    with pytest.raises(BudgetExhausted):
        await asyncio.wait_for(blocked, 2)


async def test_set_cap_below_spent_stops_the_next_call():
    budget = TokenBudget(1000)
    budget.settle(await budget.reserve(500), 500)
    budget.set_cap(400)
    assert budget.remaining == 0
    with pytest.raises(BudgetExhausted):
        await budget.reserve(1)
    budget.set_cap(2000)
    assert budget.remaining == 1500


async def test_cost_cap():
    budget = TokenBudget(10**9, max_cost_usd=0.01)
    budget.settle(await budget.reserve(10, 0.008), 10, 0.008)
    with pytest.raises(BudgetExhausted, match="cost budget exhausted"):
        await budget.reserve(10, 0.003)
    r = await budget.reserve(10, 0.002)
    waiting = asyncio.create_task(budget.reserve(10, 0.001))  # held by the call in flight: waits
    await asyncio.sleep(0.05)
    assert not waiting.done()
    budget.settle(r, 10, 0.001)
    await asyncio.wait_for(waiting, 2)
    assert budget.spent_cost_usd == pytest.approx(0.009)


async def test_overreport_is_counted_and_logged(caplog):
    budget = TokenBudget(1000)
    r = await budget.reserve(100)
    with caplog.at_level(logging.WARNING, logger="looptree.llm.budget"):
        budget.settle(r, 130)
    assert budget.spent == 130
    assert "more than the 100 reserved" in caplog.text


async def test_server_reporting_beyond_max_tokens_is_charged_in_full(llm_server):
    # A misbehaving server ignores max_tokens: we still charge what it billed.
    llm_server.script(reply("long", prompt_tokens=10, completion_tokens=5000))
    backend = OpenAIBackend(Endpoint(llm_server.base_url, "k" * 20, "K", "local"), timeout_s=2)
    budget = TokenBudget(100_000)
    response = await BudgetedBackend(backend, budget).complete(make_request(max_tokens=100))
    await backend.aclose()
    assert response.completion_tokens == 5000
    assert budget.spent == 5010 == llm_server.reported_total


async def test_cost_is_priced_and_cost_cap_needs_a_known_price(llm_server):
    llm_server.script(reply("a", prompt_tokens=1_000_000, completion_tokens=0))
    backend = OpenAIBackend(Endpoint(llm_server.base_url, "k" * 20, "K", "local"), timeout_s=2)
    budget = TokenBudget(10**9, max_cost_usd=5)
    prices = PriceTable({"gpt-4.1-mini": {"input": 0.5, "output": 2.0}})
    budgeted = BudgetedBackend(backend, budget, prices)
    response = await budgeted.complete(make_request())
    assert response.cost_usd == pytest.approx(0.5)
    assert budget.spent_cost_usd == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="no price is known for model 'mystery-model'"):
        await budgeted.complete(make_request(model="mystery-model"))
    await backend.aclose()
    assert len(llm_server.requests) == 1  # the unpriced call never left


async def test_rejected_call_releases_its_reservation(llm_server):
    llm_server.script(status(400, message="bad request"))
    backend = OpenAIBackend(Endpoint(llm_server.base_url, "k" * 20, "K", "local"), timeout_s=2)
    budget = TokenBudget(10_000)
    with pytest.raises(LLMRequestRejected):
        await BudgetedBackend(backend, budget).complete(make_request())
    await backend.aclose()
    assert (budget.spent, budget.reserved) == (0, 0)


async def test_sixteen_workers_never_pass_the_cap(llm_server):
    """16 concurrent workers, a tight cap: spent stays under the cap and equals exactly what
    the server reported for the calls it answered; retried calls are charged once."""
    cap = 5000
    llm_server.set_delay(0.02)
    llm_server.script(status(500), drop(), status(429, retry_after="0"), status(502))
    backend = OpenAIBackend(
        Endpoint(llm_server.base_url, "k" * 20, "K", "local"),
        timeout_s=3,
        max_retries=4,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        concurrency=16,
    )
    abandoned: list[int] = []  # the dropped connection may have been billed: charged in full
    backend.retry_listeners.append(lambda request, info: abandoned.append(info.billed_tokens))
    budget = TokenBudget(cap)
    budgeted = BudgetedBackend(backend, budget)
    successes = []
    max_reserved = 0

    async def worker(w: int) -> None:
        nonlocal max_reserved
        n = 0
        while True:
            n += 1
            try:
                response = await budgeted.complete(make_request(w * 100 + n, max_tokens=120))
            except BudgetExhausted:
                return
            except LLMError as exc:  # pragma: no cover - would fail the equality below
                pytest.fail(f"unexpected LLM error: {exc}")
            successes.append(response)
            max_reserved = max(max_reserved, budget.reserved)
            assert budget.spent <= cap

    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(16))), timeout=15)
    await backend.aclose()

    assert budget.spent <= cap
    assert budget.reserved == 0
    assert budget.spent == llm_server.reported_total + sum(abandoned)
    assert llm_server.reported_total == sum(r.total_tokens for r in successes)
    assert len(successes) == len(llm_server.reported)
    assert len(abandoned) == 4 and sum(1 for t in abandoned if t) == 1  # only the drop
    # The four scripted failures were retried, each inside its own call's reservation.
    assert len(llm_server.requests) == len(successes) + 4
    # Every request belongs to an answered call, except (at most) the dropped attempt of a call
    # whose retry found no room left once the drop was charged in full.
    assert 0 <= len(llm_server.requests) - sum(r.attempts for r in successes) <= 1
    assert llm_server.max_in_flight > 1 and len(successes) > 16
    assert budget.spent > cap // 2  # the budget was really used, not refused early


# -- a cap that is hard ------------------------------------------------------------------------

DENSE = "déf sölve(xs): → return sum(x·x for x in xs)  # ≤ ∑ 漢字\n"  # many bytes per character


def dense_request(n: int, max_tokens: int = 1000) -> LLMRequest:
    return LLMRequest(role="optimize", model="gemma", max_tokens=max_tokens, temperature=0.7, node_id=f"1.{n}",
                      messages=[{"role": "system", "content": "You optimize code. " * 5},
                                {"role": "user", "content": f"Call {n}. " + DENSE * 6}])


@pytest.mark.parametrize("tokenize", [True, False], ids=["server-tokenizer", "byte-bound"])
async def test_sixteen_calls_in_flight_never_cross_a_tiny_cap(llm_server, tokenize):
    """A server whose tokenizer makes one token per UTF-8 byte — far more than the old
    chars/3.5 estimate — 16 calls in flight, a cap a few calls wide: what the server billed
    never passes the cap, with or without a tokenize endpoint to ask."""
    cap = 6000
    llm_server.configure(tokenizer="bytes", props=True, slots=16)
    if not tokenize:
        llm_server.configure(tokenize_dialect="none")  # /tokenize answers 400 to both dialects
    llm_server.set_delay(0.05)
    backend = OpenAIBackend(Endpoint(llm_server.base_url, "k" * 20, "K", "local"), timeout_s=5, stream=True,
                            first_token_timeout_s=5, idle_timeout_s=5)
    budget = TokenBudget(cap)
    budgeted = BudgetedBackend(backend, budget)
    in_flight = max_in_flight = 0

    async def worker(w: int) -> int:
        nonlocal in_flight, max_in_flight
        calls = 0
        for n in range(1000):
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                await budgeted.complete(dense_request(w * 1000 + n))
            except BudgetExhausted:
                return calls
            finally:
                in_flight -= 1
            calls += 1
            assert llm_server.reported_total <= cap
        return calls

    calls = await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(16))), timeout=30)
    await backend.aclose()

    billed = llm_server.reported
    assert sum(calls) == len(billed) >= 4
    assert sum(p + c for p, c in billed) <= cap, "the cap was crossed"
    assert budget.spent == llm_server.reported_total and budget.reserved == 0
    assert max_in_flight == 16 and llm_server.max_in_flight > 1
    # The old estimate would not have held: the server billed far more prompt than it predicted.
    prompt_billed = billed[0][0]
    assert prompt_billed > 1.5 * estimate_prompt_tokens(dense_request(0).messages)
    assert prompt_billed <= prompt_token_bound(dense_request(0).messages)
    # Near the end calls were clipped to what was left rather than refused or let through.
    sent = [r.body["max_tokens"] for r in llm_server.requests]
    assert min(sent) < 1000 == max(sent)
    assert (backend.prompt_counter.calls > 0) is True  # near the end the server was asked to count
    if tokenize:
        assert backend.prompt_counter.dialect == "llama.cpp"
    else:
        assert backend.prompt_counter.dialect == "none" and llm_server.paths("/tokenize") == 2


async def test_far_from_the_cap_the_bound_costs_nothing(llm_server):
    llm_server.configure(tokenizer="bytes")
    backend = OpenAIBackend(Endpoint(llm_server.base_url, "k" * 20, "K", "local"), timeout_s=5, concurrency=4)
    budget = TokenBudget(2_000_000)
    await asyncio.gather(*(BudgetedBackend(backend, budget).complete(dense_request(n)) for n in range(8)))
    await backend.aclose()
    assert llm_server.paths("/tokenize") == 0 and backend.prompt_counter.calls == 0
    assert all(r.body["max_tokens"] == 1000 for r in llm_server.requests)  # nothing clipped


async def test_exact_count_lets_a_call_fit_that_the_bound_would_refuse(llm_server):
    """vLLM's /tokenize: near the end the exact count (plus the template allowance) replaces the
    byte bound, so the last call still fits."""
    llm_server.configure(tokenizer="chars4", tokenize_dialect="vllm")
    backend = OpenAIBackend(Endpoint(llm_server.base_url, "k" * 20, "K", "local"), timeout_s=5)
    request = LLMRequest(role="optimize", model="m", max_tokens=256, temperature=0.0,
                         messages=[{"role": "user", "content": "abc " * 100}])
    bound = prompt_token_bound(request.messages)
    budget = TokenBudget(bound + 256 - 1)  # the bound alone does not fit
    counted = await BudgetedBackend(backend, budget).prompt_tokens(request)
    assert backend.prompt_counter.dialect == "vllm"
    assert counted == 100 + (bound - 400) < bound  # exact text tokens + the template allowance
    response = await BudgetedBackend(backend, budget).complete(request)
    await backend.aclose()
    assert response.max_tokens == 256 and budget.spent <= budget.cap
