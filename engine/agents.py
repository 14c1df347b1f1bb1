"""Agent calls: one place where a prompt becomes tokens spent and a reply.

Why here and not in each backend: the budget must hold whatever the backend (live endpoint or
recorded cassette), so reservation and settlement (`BudgetedBackend`), the `tokens_spent` event
and the recording of every call happen around `LLMBackend.complete`, once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from looptree.engine.config import Config
from looptree.engine.errors import ConfigError
from looptree.engine.llm.budget import BudgetedBackend, TokenBudget
from looptree.engine.llm.pricing import PriceTable
from looptree.engine.llm.types import LLMBackend, LLMError, LLMRequest, LLMResponse


def model_for(config: Config, role: str) -> str:
    return getattr(config.agent.models, role, "") or config.agent.model


def make_backend(config: Config, project_dir: Path, run_dir: Path) -> LLMBackend:
    """The configured backend; every call it makes is recorded under the run's `llm/`."""
    from looptree.engine.llm.recorder import CallRecorder

    recorder = CallRecorder(run_dir / "llm")
    if config.agent.provider == "replay":
        from looptree.engine.llm.replay import ReplayBackend

        cassette = Path(config.agent.cassette)
        if not cassette.is_absolute():
            cassette = project_dir / cassette
        if not cassette.exists():
            raise ConfigError(f"agent.cassette {config.agent.cassette!r} not found (provider 'replay' plays it back)")
        return ReplayBackend(cassette, recorder=recorder)
    from looptree.engine.llm.openai_backend import OpenAIBackend
    from looptree.engine.llm.providers import resolve_endpoint
    from looptree.engine.llm.ratelimit import RateLimiter

    endpoint = resolve_endpoint(config.agent.provider, config.agent.base_url, config.agent.api_key_env)
    limiter = RateLimiter(config.budget.requests_per_minute, config.budget.tokens_per_minute)
    return OpenAIBackend(endpoint, timeout_s=config.agent.request_timeout, max_retries=config.agent.max_retries,
                         rate_limiter=limiter, recorder=recorder)


@dataclass
class AgentCaller:
    """Budgeted calls. A call that cannot fit raises BudgetExhausted before anything is sent."""

    backend: LLMBackend
    budget: TokenBudget
    config: Config
    emit: Callable[..., Any]
    prices: PriceTable = field(default_factory=PriceTable)

    def __post_init__(self) -> None:
        self._budgeted = BudgetedBackend(self.backend, self.budget, self.prices)

    async def call(self, role: str, node_id: str | None, messages: list[dict[str, str]], prompt_hash: str) -> LLMResponse:
        request = LLMRequest(role=role, messages=messages, model=model_for(self.config, role),
                             max_tokens=self.config.agent.max_tokens, temperature=self.config.agent.temperature,
                             node_id=node_id, prompt_hash=prompt_hash)
        started = time.monotonic()
        try:
            response = await self._budgeted.complete(request)
        except LLMError as err:
            if err.reported_tokens is not None:  # billed although unusable (e.g. an empty reply)
                self._spent(role, node_id, err.prompt_tokens or 0, err.completion_tokens or 0, 0.0, started)
            raise
        self._spent(role, node_id, response.prompt_tokens, response.completion_tokens, response.cost_usd, started)
        return response

    def _spent(self, role: str, node_id: str | None, prompt: int, completion: int, cost: float, started: float) -> None:
        self.emit("tokens_spent", id=node_id, role=role, prompt_tokens=prompt, completion_tokens=completion,
                  total_tokens=prompt + completion, cost_usd=round(cost or 0.0, 6),
                  duration_s=round(time.monotonic() - started, 3), spent=self.budget.spent)

    async def aclose(self) -> None:
        await self._budgeted.aclose()
