"""LLM backends behind one interface (`LLMBackend`), with budget, rate limits and recording.

`build_llm` assembles the usual stack for a run — endpoint → rate limiter → backend (live or
replay) → recorder → budget — so the engine needs one call and one object:

    stack = build_llm("openai", budget=TokenBudget(2_000_000), record_dir=run_dir / "llm")
    response = await stack.backend.complete(request)   # reserves, calls, settles
    await stack.aclose()

`resolve_endpoint` alone is what config validation calls before a run starts (missing key);
`preflight.check_endpoints(config)` (async, imported from its module: it needs the network
stack) is the one-request-per-endpoint check the engine runs before the baseline and
`looptree doctor` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looptree.engine.agents.llm.budget import BudgetedBackend, Reservation, TokenBudget, estimate_request_tokens
from looptree.engine.agents.llm.pricing import APPROX_LIST_PRICES, Price, PriceTable, cost
from looptree.engine.agents.llm.providers import PROVIDERS, Endpoint, resolve_endpoint
from looptree.engine.agents.llm.ratelimit import RateLimiter
from looptree.engine.agents.llm.recorder import CallRecorder, request_hash
from looptree.engine.agents.llm.redact import redact_obj, redact_text, register_secret
from looptree.engine.agents.llm.replay import ReplayBackend
from looptree.engine.agents.llm.types import (
    CassetteExhausted,
    LLMBackend,
    LLMEmptyReply,
    LLMError,
    LLMRequest,
    LLMRequestRejected,
    LLMResponse,
    LLMRetriesExhausted,
    LLMTimeout,
    RetryInfo,
    estimate_prompt_tokens,
    prompt_token_bound,
)

__all__ = [
    "APPROX_LIST_PRICES", "BudgetedBackend", "CallRecorder", "CassetteExhausted", "Endpoint",
    "LLMBackend", "LLMEmptyReply", "LLMError", "LLMRequest", "LLMRequestRejected",
    "LLMResponse", "LLMRetriesExhausted", "LLMStack", "LLMTimeout", "PROVIDERS", "Price",
    "PriceTable", "RateLimiter", "ReplayBackend", "Reservation", "RetryInfo", "TokenBudget",
    "build_llm", "cost", "estimate_prompt_tokens", "estimate_request_tokens", "prompt_token_bound",
    "redact_obj", "redact_text", "register_secret", "request_hash", "resolve_endpoint",
]


@dataclass
class LLMStack:
    """What a run holds: call `backend.complete`; show `budget` and `limiter.backoff_s`."""

    backend: BudgetedBackend
    budget: TokenBudget
    endpoint: Endpoint
    limiter: RateLimiter | None = None
    recorder: CallRecorder | None = None

    async def aclose(self) -> None:
        await self.backend.aclose()


def build_llm(
    provider: str,
    *,
    budget: TokenBudget,
    base_url: str = "",
    api_key_env: str = "",
    cassette: str | Path | None = None,
    record_dir: str | Path | None = None,
    prices: PriceTable | None = None,
    requests_per_minute: float = 0,
    tokens_per_minute: float = 0,
    timeout_s: float = 300.0,
    max_retries: int = 4,
    stream: bool = True,
    **backend_options: Any,
) -> LLMStack:
    """Build the backend stack for `agent.provider`. Raises ConfigError for a missing key, an
    unknown provider or (replay) a missing or malformed cassette — before the run starts.
    `backend_options` go to `OpenAIBackend` (first_token_timeout_s, idle_timeout_s,
    concurrency, max_concurrency, tokenize, ...)."""
    endpoint = resolve_endpoint(provider, base_url, api_key_env)
    recorder = CallRecorder(record_dir) if record_dir is not None else None
    limiter: RateLimiter | None = None
    inner: LLMBackend
    if endpoint.provider == "replay":
        if cassette is None:
            from looptree.engine.errors import ConfigError

            raise ConfigError("agent.provider = 'replay' needs agent.cassette")
        inner = ReplayBackend(cassette, recorder=recorder)
    else:
        from looptree.engine.agents.llm.openai_backend import OpenAIBackend  # imports openai: only when live

        if requests_per_minute or tokens_per_minute:
            limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        inner = OpenAIBackend(
            endpoint,
            timeout_s=timeout_s,
            max_retries=max_retries,
            rate_limiter=limiter,
            recorder=recorder,
            stream=stream,
            **backend_options,
        )
    return LLMStack(
        backend=BudgetedBackend(inner, budget, prices),
        budget=budget,
        endpoint=endpoint,
        limiter=limiter,
        recorder=recorder,
    )
