"""Agent calls: one place where a prompt becomes tokens spent and a reply.

Why here and not in each backend: the budget must hold whatever the backend (live endpoint or
recorded cassette), so reservation, settlement, the `tokens_spent` event and the recording of
every call happen around `LLMBackend.complete`, once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.config import Config
from engine.errors import BudgetExhausted, ConfigError
from engine.llm.budget import TokenBudget
from engine.llm.pricing import cost as price_cost
from engine.llm.types import LLMBackend, LLMRequest, LLMResponse


def estimate_prompt_tokens(messages: list[dict[str, str]]) -> int:
    """Conservative: ~3.5 characters a token plus a per-message overhead."""
    return sum(math.ceil(len(m.get("content", "")) / 3.5) + 8 for m in messages) + 4


def model_for(config: Config, role: str) -> str:
    return getattr(config.agent.models, role, "") or config.agent.model


def make_backend(config: Config, project_dir: Path, run_dir: Path) -> LLMBackend:
    """The configured backend; every call it makes is recorded under the run's `llm/`."""
    from engine.llm.recorder import CallRecorder

    recorder = CallRecorder(run_dir / "llm")
    if config.agent.provider == "replay":
        from engine.llm.replay import ReplayBackend

        cassette = Path(config.agent.cassette)
        if not cassette.is_absolute():
            cassette = project_dir / cassette
        if not cassette.exists():
            raise ConfigError(f"agent.cassette {config.agent.cassette!r} not found (provider 'replay' plays it back)")
        return ReplayBackend(cassette, recorder=recorder)
    from engine.llm.openai_backend import OpenAIBackend
    from engine.llm.providers import resolve_endpoint
    from engine.llm.ratelimit import RateLimiter

    endpoint = resolve_endpoint(config.agent.provider, config.agent.base_url, config.agent.api_key_env)
    limiter = RateLimiter(config.budget.requests_per_minute, config.budget.tokens_per_minute)
    return OpenAIBackend(endpoint, timeout_s=config.agent.request_timeout, max_retries=config.agent.max_retries,
                         rate_limiter=limiter, recorder=recorder)


@dataclass
class AgentCaller:
    """Budgeted calls. `emit` writes events; a call that cannot fit raises BudgetExhausted before sending."""

    backend: LLMBackend
    budget: TokenBudget
    config: Config
    emit: Callable[..., Any]

    async def call(self, role: str, node_id: str | None, messages: list[dict[str, str]], prompt_hash: str) -> LLMResponse:
        model = model_for(self.config, role)
        max_tokens = self.config.agent.max_tokens
        estimate = estimate_prompt_tokens(messages) + max_tokens
        reservation = await self.budget.reserve(estimate, price_cost(model, estimate - max_tokens, max_tokens))
        request = LLMRequest(role=role, messages=messages, model=model, max_tokens=max_tokens,
                             temperature=self.config.agent.temperature, node_id=node_id, prompt_hash=prompt_hash)
        started = time.monotonic()
        try:
            response = await self.backend.complete(request)
        except BaseException:
            self.budget.release(reservation)
            raise
        total = response.prompt_tokens + response.completion_tokens
        cost = response.cost_usd or price_cost(response.model or model, response.prompt_tokens, response.completion_tokens)
        self.budget.settle(reservation, total, cost)
        self.emit("tokens_spent", id=node_id, role=role, prompt_tokens=response.prompt_tokens,
                  completion_tokens=response.completion_tokens, total_tokens=total, cost_usd=round(cost, 6),
                  duration_s=round(time.monotonic() - started, 3), spent=self.budget.spent)
        return response


__all__ = ["AgentCaller", "BudgetExhausted", "make_backend", "estimate_prompt_tokens"]
