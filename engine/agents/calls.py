"""Agent calls: one place where a prompt becomes tokens spent and a reply.

Why here and not in each backend: the budget must hold whatever the backend (live endpoint or
recorded cassette), so reservation and settlement (`BudgetedBackend`), the `tokens_spent` and
`agent_retry` events and the recording of every call happen around `LLMBackend.complete`, once.
This is also where the run learns whether any call ever got through: a run whose every call
failed must not end "phases done" with exit 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looptree.engine.agents.llm.budget import BudgetedBackend, TokenBudget
from looptree.engine.agents.llm.pricing import PriceTable
from looptree.engine.agents.llm.types import (
    LLMBackend,
    LLMError,
    LLMRequest,
    LLMResponse,
    RetryInfo,
)
from looptree.engine.core.config import Config
from looptree.engine.errors import ConfigError


def model_for(config: Config, role: str) -> str:
    return getattr(config.agent.models, role, "") or config.agent.model


def make_backend(config: Config, project_dir: Path, run_dir: Path) -> LLMBackend:
    """The configured backend; every call it makes is recorded under the run's `llm/`.

    Live endpoints stream (timeouts on silence, usage from the final chunk) and get at most
    `agent.concurrency` requests at once (0: the server's own slot count, else 1 for `local`).
    """
    from looptree.engine.agents.llm.recorder import CallRecorder

    recorder = CallRecorder(run_dir / "llm")
    if config.agent.provider == "replay":
        from looptree.engine.agents.llm.replay import ReplayBackend

        cassette = Path(config.agent.cassette)
        if not cassette.is_absolute():
            cassette = project_dir / cassette
        if not cassette.exists():
            raise ConfigError(f"agent.cassette {config.agent.cassette!r} not found (provider 'replay' plays it back)")
        return ReplayBackend(cassette, recorder=recorder)
    from looptree.engine.agents.llm.openai_backend import OpenAIBackend
    from looptree.engine.agents.llm.providers import resolve_endpoint
    from looptree.engine.agents.llm.ratelimit import RateLimiter

    agent = config.agent
    endpoint = resolve_endpoint(agent.provider, agent.base_url, agent.api_key_env)
    limiter = RateLimiter(config.budget.requests_per_minute, config.budget.tokens_per_minute)
    return OpenAIBackend(endpoint, timeout_s=agent.request_timeout, max_retries=agent.max_retries,
                         rate_limiter=limiter, recorder=recorder, stream=True,
                         first_token_timeout_s=agent.first_token_timeout, idle_timeout_s=agent.idle_timeout,
                         concurrency=agent.concurrency, max_concurrency=config.search.num_workers)


def cut_off_reason(response: LLMResponse, configured_max_tokens: int) -> str | None:
    """'reply cut off at max_tokens=N …' when the model hit its completion limit, else None."""
    if response.finish_reason != "length":
        return None
    limit = response.max_tokens or configured_max_tokens
    why = ("agent.max_tokens" if limit >= configured_max_tokens
           else f"clipped from agent.max_tokens={configured_max_tokens} to what the budget had left")
    return f"reply cut off at max_tokens={limit} ({why}) after {response.completion_tokens} tokens"


def ideas_failure(response: LLMResponse, configured_max_tokens: int, path: Path) -> str:
    """Why an ideas reply gave no ideas: its first line, the file that holds it, and a cut-off."""
    first = next((line.strip() for line in response.text.splitlines() if line.strip()), "")
    if len(first) > 120:
        first = first[:119] + "…"
    cut = cut_off_reason(response, configured_max_tokens)
    return (f"{cut + '; ' if cut else ''}no ideas could be read from the reply (expected a JSON array "
            f"or a numbered list; first line: {first!r}); the reply is in {path}")


@dataclass
class AgentCaller:
    """Budgeted calls. A call that cannot fit raises BudgetExhausted before anything is sent."""

    backend: LLMBackend
    budget: TokenBudget
    config: Config
    emit: Callable[..., Any]
    prices: PriceTable = field(default_factory=PriceTable)
    succeeded: int = 0  # calls that returned a reply
    failed: int = 0  # calls that finally failed (LLMError)
    last_failure: str = ""
    cut_off: dict[str, str] = field(default_factory=dict)  # node id → why its reply was cut off

    def __post_init__(self) -> None:
        self._budgeted = BudgetedBackend(self.backend, self.budget, self.prices)
        listeners = getattr(self.backend, "retry_listeners", None)
        if listeners is not None:
            listeners.append(self._retried)
        self.budget.warning_listeners.append(self._budget_warning)

    async def call(self, role: str, node_id: str | None, messages: list[dict[str, str]], prompt_hash: str) -> LLMResponse:
        request = LLMRequest(role=role, messages=messages, model=model_for(self.config, role),
                             max_tokens=self.config.agent.max_tokens, temperature=self.config.agent.temperature,
                             node_id=node_id, prompt_hash=prompt_hash)
        started = time.monotonic()
        try:
            response = await self._budgeted.complete(request)
        except LLMError as err:
            self.failed += 1
            self.last_failure = str(err)
            if err.reported_tokens is not None:  # billed (or maybe billed) although unusable
                p, c = err.prompt_tokens or 0, err.completion_tokens or 0
                self._spent(role, node_id, p, c, self.prices.cost(request.model, p, c), started,
                            billed_maybe=err.billed_maybe)
            raise
        self.succeeded += 1
        cut = cut_off_reason(response, self.config.agent.max_tokens)
        if cut and node_id is not None:
            self.cut_off[node_id] = cut
        self._spent(role, node_id, response.prompt_tokens, response.completion_tokens, response.cost_usd, started)
        return response

    def no_call_succeeded(self) -> str | None:
        """The reason to end the run as an error when calls were made and none got a reply."""
        if self.succeeded or not self.failed:
            return None
        return f"no agent call succeeded ({self.failed} failed); last: {self.last_failure}"

    def _retried(self, request: LLMRequest, info: RetryInfo) -> None:
        self.emit("agent_retry", id=request.node_id, role=request.role, attempt=info.attempt, reason=info.reason,
                  delay_s=info.delay_s, billed_maybe=info.billed_maybe, billed_tokens=info.billed_tokens)
        if info.billed_tokens:  # charged by the budget already: the fold must count it too
            self._spent(request.role, request.node_id, info.billed_prompt_tokens, info.billed_completion_tokens,
                        self.prices.cost(request.model, info.billed_prompt_tokens, info.billed_completion_tokens),
                        time.monotonic(), billed_maybe=True)

    def _budget_warning(self, text: str) -> None:
        self.emit("message", text=f"budget: {text}")

    def _spent(self, role: str, node_id: str | None, prompt: int, completion: int, cost: float, started: float,
               *, billed_maybe: bool = False) -> None:
        extra = {"billed_maybe": True} if billed_maybe else {}
        self.emit("tokens_spent", id=node_id, role=role, prompt_tokens=prompt, completion_tokens=completion,
                  total_tokens=prompt + completion, cost_usd=round(cost or 0.0, 6),
                  duration_s=round(time.monotonic() - started, 3), spent=self.budget.spent, **extra)

    async def aclose(self) -> None:
        await self._budgeted.aclose()
