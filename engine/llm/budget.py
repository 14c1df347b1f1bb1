"""The hard token (and optional USD) cap, enforced by reservation before every call.

Why reservations: with 16 calls in flight, checking "spent < cap" before each one lets all 16
start on the last few tokens and overshoot by 16 replies. Instead each call first reserves its
worst case — estimated prompt tokens plus the `max_tokens` it passes to the API — and only
starts when that fits in cap − spent − reserved. When it ends, the reservation is replaced by
what the server actually reported (`settle`) or dropped (`release`, the call failed and reported
nothing). So `spent` can only pass the cap if a server reports more than it was allowed to
generate (or prompts tokenize denser than chars/3.5), which we count anyway and log.
"""

from __future__ import annotations

import itertools
import logging
import asyncio
import threading
from dataclasses import dataclass

from looptree.engine.errors import BudgetExhausted
from looptree.engine.llm.pricing import PriceTable
from looptree.engine.llm.types import (
    LLMBackend,
    LLMError,
    LLMRequest,
    LLMResponse,
    estimate_prompt_tokens,
)

log = logging.getLogger("looptree.llm.budget")

_ids = itertools.count(1)


@dataclass
class Reservation:
    """A slice of the budget held by one call (its retries included)."""

    id: int
    tokens: int
    cost_usd: float
    done: bool = False


def estimate_request_tokens(request: LLMRequest) -> int:
    """Worst-case tokens for `request`: prompt estimate (chars/3.5 + overhead) + max_tokens."""
    return estimate_prompt_tokens(request.messages) + max(0, int(request.max_tokens))


def _resolve(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


class TokenBudget:
    """A token cap (and a USD cap when `max_cost_usd` > 0) shared by every call of a run.

    `reserve` is async so callers may later wait for room instead of failing; today it fails at
    once. `settle`/`release` are synchronous on purpose: they run in `finally` blocks while a
    call is being cancelled, where awaiting is fragile. A threading lock (never held across an
    await) also lets a UI thread read the figures safely.
    """

    def __init__(self, max_tokens: int, max_cost_usd: float = 0) -> None:
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        self._lock = threading.Lock()
        self._cap = int(max_tokens)
        self._cost_cap = float(max_cost_usd or 0)
        self._spent = 0
        self._reserved = 0
        self._spent_cost = 0.0
        self._reserved_cost = 0.0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._waiters: list[asyncio.Future[None]] = []

    # -- figures ------------------------------------------------------------------------------
    @property
    def cap(self) -> int:
        return self._cap

    @property
    def max_cost_usd(self) -> float:
        return self._cost_cap

    @property
    def spent(self) -> int:
        return self._spent

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def remaining(self) -> int:
        """Tokens a new reservation could still take (never negative)."""
        with self._lock:
            return max(0, self._cap - self._spent - self._reserved)

    @property
    def spent_cost_usd(self) -> float:
        return self._spent_cost

    @property
    def reserved_cost_usd(self) -> float:
        return self._reserved_cost

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._completion_tokens

    # -- operations ---------------------------------------------------------------------------
    async def reserve(self, estimate_tokens: int, estimate_cost: float = 0.0) -> Reservation:
        """Hold `estimate_tokens` (and `estimate_cost` USD), or raise BudgetExhausted.

        A call that would fit in what is not yet *spent* but is blocked only by reservations of
        calls in flight waits for them to settle (they usually use far less than reserved),
        rather than ending the run while budget is left.
        """
        tokens = max(0, int(estimate_tokens))
        usd = max(0.0, float(estimate_cost))
        while True:
            with self._lock:
                free = self._cap - self._spent - self._reserved
                free_usd = self._cost_cap - self._spent_cost - self._reserved_cost
                if tokens > self._cap - self._spent or tokens > free and not self._reserved:
                    raise BudgetExhausted(
                        f"token budget exhausted: the next call needs up to {tokens:,} tokens, "
                        f"{max(0, free):,} of {self._cap:,} left ({self._spent:,} spent, "
                        f"{self._reserved:,} held by calls in flight)"
                    )
                if self._cost_cap > 0 and (usd > self._cost_cap - self._spent_cost + 1e-12
                                           or usd > free_usd + 1e-12 and not self._reserved_cost):
                    raise BudgetExhausted(
                        f"cost budget exhausted: the next call may cost up to ${usd:.4f}, "
                        f"${max(0.0, free_usd):.4f} of ${self._cost_cap:.2f} left "
                        f"(${self._spent_cost:.4f} spent)"
                    )
                fits = tokens <= free and (self._cost_cap <= 0 or usd <= free_usd + 1e-12)
                if fits:
                    self._reserved += tokens
                    self._reserved_cost += usd
                    return Reservation(next(_ids), tokens, usd)
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
            try:
                await waiter  # woken when a reservation settles or is released, or the cap changes
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def _wake(self) -> None:
        """Called with the lock held: let every waiting reservation look again."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)
        self._waiters.clear()

    def settle(
        self,
        reservation: Reservation,
        actual_tokens: int,
        actual_cost: float = 0.0,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Replace the reservation by what the call really used (server-reported usage)."""
        actual_tokens = max(0, int(actual_tokens))
        with self._lock:
            self._drop(reservation)
            self._spent += actual_tokens
            self._spent_cost += max(0.0, float(actual_cost))
            if prompt_tokens is not None:
                self._prompt_tokens += prompt_tokens
            if completion_tokens is not None:
                self._completion_tokens += completion_tokens
            over = actual_tokens > reservation.tokens
        if over:
            log.warning(
                "LLM call used %d tokens, more than the %d reserved for it; counted in full",
                actual_tokens,
                reservation.tokens,
            )

    def release(self, reservation: Reservation) -> None:
        """The call failed and reported no usage: give its reservation back, spend nothing."""
        with self._lock:
            self._drop(reservation)

    def set_cap(self, max_tokens: int) -> None:
        """Change the token cap (`looptree ctl budget`). Below `spent` means no further call."""
        with self._lock:
            self._cap = max(0, int(max_tokens))
            self._wake()

    def restore(self, tokens: int, cost_usd: float = 0.0, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """A resumed run starts from what its event log says was already spent."""
        with self._lock:
            self._spent += max(0, int(tokens))
            self._spent_cost += max(0.0, float(cost_usd))
            self._prompt_tokens += max(0, int(prompt_tokens))
            self._completion_tokens += max(0, int(completion_tokens))

    def set_cost_cap(self, max_cost_usd: float) -> None:
        """Change the USD cap; 0 removes it."""
        with self._lock:
            self._cost_cap = max(0.0, float(max_cost_usd))

    def _drop(self, reservation: Reservation) -> None:
        if reservation.done:
            raise RuntimeError(f"reservation {reservation.id} was already settled or released")
        reservation.done = True
        self._wake()
        self._reserved -= reservation.tokens
        self._reserved_cost -= reservation.cost_usd
        if self._reserved_cost < 1e-12:
            self._reserved_cost = max(0.0, self._reserved_cost)


class BudgetedBackend:
    """Wraps any `LLMBackend` so every call is reserved, settled or released — whatever the
    backend (live, local, replay) — and fills `cost_usd` from the price table.
    """

    def __init__(
        self, inner: LLMBackend, budget: TokenBudget, prices: PriceTable | None = None
    ) -> None:
        self.inner = inner
        self.budget = budget
        self.prices = prices if prices is not None else PriceTable()

    async def complete(self, request: LLMRequest) -> LLMResponse:
        if self.budget.max_cost_usd > 0:
            self.prices.require(request.model)
        prompt_estimate = estimate_prompt_tokens(request.messages)
        tokens = prompt_estimate + max(0, int(request.max_tokens))
        usd = self.prices.cost(request.model, prompt_estimate, max(0, int(request.max_tokens)))
        reservation = await self.budget.reserve(tokens, usd)
        try:
            response = await self.inner.complete(request)
        except LLMError as err:
            billed = err.reported_tokens
            if billed is None:
                self.budget.release(reservation)
            else:  # e.g. an empty reply: useless, but the server charged for it
                p, c = err.prompt_tokens or 0, err.completion_tokens or 0
                self.budget.settle(
                    reservation,
                    billed,
                    self.prices.cost(request.model, p, c),
                    prompt_tokens=p,
                    completion_tokens=c,
                )
            raise
        except BaseException:  # cancelled, or a bug: nothing was reported, so nothing is spent
            self.budget.release(reservation)
            raise
        # Price by the model the server says it used when we know it (a dated snapshot, an
        # OpenRouter prefix), else by the model we asked for.
        priced = response.model if self.prices.known(response.model or "") else request.model
        response.cost_usd = self.prices.cost(
            priced, response.prompt_tokens, response.completion_tokens
        )
        self.budget.settle(
            reservation,
            response.total_tokens,
            response.cost_usd,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
        )
        return response

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()
