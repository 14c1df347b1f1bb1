"""Slow and serial servers: per-endpoint concurrency, streamed replies timed out on silence (not
length), every retry announced, and an abandoned attempt charged as billed. Real HTTP through the
real openai client to tests/llm_server.py acting as a one-slot llama.cpp server."""

from __future__ import annotations

import asyncio
import time

import pytest

from looptree.engine.agents.calls import AgentCaller
from looptree.engine.agents.llm.budget import BudgetedBackend, TokenBudget
from looptree.engine.agents.llm.openai_backend import OpenAIBackend
from looptree.engine.agents.llm.providers import Endpoint
from looptree.engine.agents.llm.types import (
    LLMRequest,
    LLMRequestRejected,
    LLMRetriesExhausted,
    RetryInfo,
    prompt_token_bound,
)
from looptree.engine.core.config import validate_config

try:
    from llm_server import hang, llm_server, reply, stall, status
except ImportError:  # tests/ became a package
    from tests.llm_server import hang, llm_server, reply, stall, status  # noqa: F401

KEY = "sk-test-serial-0123456789abcdef"


def request(n: int = 0, max_tokens: int = 64) -> LLMRequest:
    return LLMRequest(role="optimize", messages=[{"role": "system", "content": "You optimize code."},
                                                 {"role": "user", "content": f"Make solve() faster, #{n}."}],
                      model="gemma", max_tokens=max_tokens, temperature=0.2, node_id=f"1.{n}")


def backend_for(server, **kw) -> OpenAIBackend:
    options = {"timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02,
               "stream": True, "first_token_timeout_s": 0.6, "idle_timeout_s": 0.4}
    options.update(kw)
    return OpenAIBackend(Endpoint(server.base_url, KEY, "K", "local"), **options)


async def test_slots_are_discovered_and_queueing_is_not_a_timeout(llm_server):
    """A one-slot server taking 0.3 s per reply, 4 calls at once, a 0.6 s first-token timeout:
    calls wait for the slot here, not in the server, so none times out."""
    llm_server.configure(slots=1, props=True)
    llm_server.set_delay(0.3)
    backend = backend_for(llm_server)
    retries: list[RetryInfo] = []
    backend.retry_listeners.append(lambda req, info: retries.append(info))
    responses = await asyncio.wait_for(
        asyncio.gather(*(backend.complete(request(n)) for n in range(4))), 10)
    await backend.aclose()
    assert backend.concurrency == 1 and "slot count" in backend.concurrency_source
    assert llm_server.max_in_flight == 1
    assert retries == [] and all(r.attempts == 1 for r in responses)
    assert llm_server.paths("/props") == 1  # asked once, remembered


async def test_without_the_limit_the_same_calls_time_out_in_the_server_queue(llm_server):
    """The control for the test above: the limit is what makes it pass."""
    llm_server.configure(slots=1)
    llm_server.set_delay(0.3)
    backend = backend_for(llm_server, concurrency=4, max_retries=0)
    results = await asyncio.wait_for(
        asyncio.gather(*(backend.complete(request(n)) for n in range(4)), return_exceptions=True), 10)
    await backend.aclose()
    failed = [r for r in results if isinstance(r, LLMRetriesExhausted)]
    assert failed and all("no first token within 0.6 s" in str(f) for f in failed)
    assert llm_server.max_in_flight > 1


async def test_local_default_is_one_at_a_time_and_config_wins(llm_server):
    backend = backend_for(llm_server)  # no /props: the default for provider local
    await backend.complete(request())
    assert (backend.concurrency, backend.concurrency_source) == (1, "the default for provider 'local'")
    await backend.aclose()
    llm_server.configure(slots=8, props=True)
    capped = backend_for(llm_server, max_concurrency=3)
    await capped.complete(request())
    assert capped.concurrency == 3 and "capped at search.num_workers" in capped.concurrency_source
    await capped.aclose()
    llm_server.configure(props=False, owned_by="vllm")  # vLLM batches: every worker may send
    batching = backend_for(llm_server, max_concurrency=6)
    await batching.complete(request())
    assert batching.concurrency == 6 and batching.concurrency_source == "vllm batches requests itself"
    await batching.aclose()
    hosted = OpenAIBackend(Endpoint(llm_server.base_url, KEY, "K", "openai"), stream=True)
    await hosted.complete(request())
    assert hosted.concurrency == 0 and hosted.prompt_counter is None  # no probing a hosted API
    await hosted.aclose()


async def test_a_long_stream_is_not_cut_by_its_total_length(llm_server):
    llm_server.configure(token_delay_s=0.05)
    text = "x" * 7 * 30  # 30 chunks, 1.5 s in all: far past every timeout, never silent for long
    llm_server.script(reply(text, prompt_tokens=10, completion_tokens=30))
    backend = backend_for(llm_server, timeout_s=0.5)
    started = time.monotonic()
    response = await backend.complete(request())
    await backend.aclose()
    assert response.text == text and response.attempts == 1
    assert time.monotonic() - started > 1.4


async def test_silence_is_retried_announced_and_charged_as_maybe_billed(llm_server):
    llm_server.script(stall(after_chunks=2, seconds=5), hang(5),
                      reply("finally", prompt_tokens=11, completion_tokens=3))
    backend = backend_for(llm_server)
    budget = TokenBudget(100_000)
    retries: list[tuple[str | None, RetryInfo]] = []
    backend.retry_listeners.append(lambda req, info: retries.append((req.node_id, info)))
    response = await BudgetedBackend(backend, budget).complete(request(7))
    await backend.aclose()
    assert response.text == "finally" and response.attempts == 3
    assert [r.reason for _, r in retries] == ["stream went silent for 0.4 s after 2 chunk(s)",
                                              "no first token within 0.6 s"]
    assert all(node == "1.7" and r.billed_maybe and r.delay_s > 0 for node, r in retries)
    whole = prompt_token_bound(request().messages) + 64
    assert [r.billed_tokens for _, r in retries] == [whole, whole]
    assert budget.spent == 2 * whole + 14 and budget.reserved == 0


async def test_agent_caller_turns_retries_into_events_the_fold_counts(llm_server):
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"]}, "bench": {"command": "true"},
                              "agent": {"provider": "local", "max_tokens": 64}})
    events: list[tuple[str, dict]] = []
    backend = backend_for(llm_server)
    caller = AgentCaller(backend, TokenBudget(100_000), config, lambda t, **f: events.append((t, f)))
    llm_server.script(hang(5), reply("ok", prompt_tokens=5, completion_tokens=2))
    await caller.call("optimize", "1.1", request().messages, "h")
    await caller.aclose()
    kinds = [t for t, _ in events]
    assert kinds == ["agent_retry", "tokens_spent", "tokens_spent"]
    retry = events[0][1]
    assert retry["id"] == "1.1" and retry["role"] == "optimize" and retry["attempt"] == 1
    assert retry["reason"] == "no first token within 0.6 s" and retry["billed_maybe"] is True
    assert events[1][1]["billed_maybe"] is True
    assert sum(f["total_tokens"] for t, f in events if t == "tokens_spent") == caller.budget.spent
    assert caller.no_call_succeeded() is None


async def test_a_call_that_never_succeeds_is_reported(llm_server):
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"]}, "bench": {"command": "true"},
                              "agent": {"provider": "local", "max_tokens": 64}})
    backend = backend_for(llm_server, max_retries=0)
    caller = AgentCaller(backend, TokenBudget(100_000), config, lambda t, **f: None)
    llm_server.script(hang(5))
    with pytest.raises(LLMRetriesExhausted):
        await caller.call("ideas", None, request().messages, "h")
    await caller.aclose()
    reason = caller.no_call_succeeded()
    assert reason is not None and "no agent call succeeded (1 failed)" in reason
    assert "no first token within 0.6 s" in reason


async def test_a_budget_warning_is_an_event_not_a_bare_log_line(llm_server, caplog):
    """A server that bills more than the call reserved: counted in full, and said through the
    event log (so the headless line carries the run's [mm:ss]) rather than an unprefixed log."""
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"]}, "bench": {"command": "true"},
                              "agent": {"provider": "local", "max_tokens": 64}})
    events: list[tuple[str, dict]] = []
    backend = backend_for(llm_server)
    caller = AgentCaller(backend, TokenBudget(100_000), config, lambda t, **f: events.append((t, f)))
    llm_server.script(reply("ok", prompt_tokens=5_000, completion_tokens=2))
    with caplog.at_level("WARNING", logger="looptree.llm.budget"):
        await caller.call("optimize", "1.1", request().messages, "h")
    await caller.aclose()
    [message] = [f for t, f in events if t == "message"]
    assert message["text"].startswith("budget: an LLM call used 5,002 tokens, more than the ")
    assert caller.budget.spent == 5_002
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


async def test_a_server_that_cannot_stream_gets_whole_replies(llm_server):
    llm_server.script(status(400, message="Streaming is not supported by this server"))
    backend = backend_for(llm_server, max_retries=0)
    response = await backend.complete(request())
    assert response.attempts == 2 and not llm_server.requests[1].body.get("stream")
    # "upstream" is not "stream": no quirk is learnt from it, the 400 stands.
    backend2 = backend_for(llm_server, max_retries=0)
    llm_server.script(status(400, message="upstream provider returned an error"))
    with pytest.raises(LLMRequestRejected, match="upstream provider"):
        await backend2.complete(request())
    await backend.aclose()
    await backend2.aclose()
