"""The hard token (and optional USD) cap, enforced by reservation before every call.

Why reservations: with 16 calls in flight, checking "spent < cap" before each one lets all 16
start on the last few tokens and overshoot by 16 replies. Instead each call first reserves its
worst case — prompt tokens plus the `max_tokens` it passes to the API — and only starts when
that fits in cap − spent − reserved. When it ends, the reservation is replaced by what the
server actually reported (`settle`) or dropped (`release`, the call failed and reported nothing).

Why the cap is hard: the prompt is counted with a PROVEN upper bound (`prompt_token_bound`:
UTF-8 bytes plus chat-template allowances; no tokenizer makes more tokens than that), or near
the end of the budget with the server's own tokenizer where it has one, and each call's
`max_tokens` is clipped to what is left — so what a server can bill never exceeds what was
reserved. While the budget is far from spent the bound costs nothing (no tokenize request);
near its end a call that does not fit waits for calls in flight to settle rather than overshoot.
A call abandoned after the server may have billed it (a timeout mid-reply) is charged its whole
reservation before it is retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from looptree.engine.agents.llm.pricing import PriceTable
from looptree.engine.agents.llm.types import (
    LLMBackend,
    LLMError,
    LLMRequest,
    LLMResponse,
    prompt_token_bound,
)
from looptree.engine.errors import BudgetExhausted

log = logging.getLogger("looptree.llm.budget")

_ids = itertools.count(1)


@dataclass
class Reservation:
    """A slice of the budget held by one call (its retries included)."""

    id: int
    tokens: int
    cost_usd: float
    done: bool = False
    completion_tokens: int = 0  # the completion limit this reservation allows (reserve_call)


# A reply clipped below this many tokens is almost surely useless (cut off before its first
# edit): near the end of the budget a call waits for room for at least this much.
MIN_REPLY_TOKENS = 256


def estimate_request_tokens(request: LLMRequest) -> int:
    """Worst-case tokens for `request`: the proven prompt bound + max_tokens."""
    return prompt_token_bound(request.messages) + max(0, int(request.max_tokens))


class PromptCounting(Protocol):
    """A server-side tokenizer (`serverinfo.PromptCounter`): an upper-bound count or None."""

    async def count(self, messages: list[dict], model: str) -> int | None: ...


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class TokenBudget:
    """A token cap (and a USD cap when `max_cost_usd` > 0) shared by every call of a run.

    `reserve`/`reserve_call` are async: a call blocked only by calls in flight waits for them to
    settle, and fails only when what is unspent could never hold it. `settle`/`release` are
    synchronous on purpose: they run in `finally` blocks while a
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
        # Called with a one-line text when the budget sees something the user must know (a call
        # billed more than it reserved): the engine turns it into an event, so the headless
        # line carries the run's [mm:ss] like every other line.
        self.warning_listeners: list[Callable[[str], None]] = []

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

    async def reserve_call(
        self,
        prompt_tokens: int,
        max_completion: int,
        min_completion: int,
        usd_for: Callable[[int, int], float] | None = None,
    ) -> Reservation:
        """Hold `prompt_tokens` plus as much of `max_completion` as is left (at least
        `min_completion`); the reservation's `completion_tokens` is the limit to send.

        Waits while calls in flight hold the room it needs (they usually settle for less);
        raises BudgetExhausted when even all of what is unspent could not hold it.
        """
        prompt = max(0, int(prompt_tokens))
        want = max(0, int(max_completion))
        least = max(0, min(int(min_completion), want))
        while True:
            with self._lock:
                unspent = self._cap - self._spent
                free = unspent - self._reserved
                if prompt + least > unspent or (prompt + least > free and not self._reserved):
                    raise BudgetExhausted(
                        f"token budget exhausted: the next call needs at least {prompt + least:,} "
                        f"tokens ({prompt:,} prompt + {least:,} reply), {max(0, free):,} of "
                        f"{self._cap:,} left ({self._spent:,} spent, {self._reserved:,} held by "
                        f"calls in flight)"
                    )
                completion = min(want, free - prompt)
                if completion >= least:
                    usd = max(0.0, float(usd_for(prompt, completion))) if usd_for else 0.0
                    free_usd = self._cost_cap - self._spent_cost - self._reserved_cost
                    if self._cost_cap > 0 and usd > free_usd + 1e-12:
                        if usd > self._cost_cap - self._spent_cost + 1e-12 or not self._reserved_cost:
                            raise BudgetExhausted(
                                f"cost budget exhausted: the next call may cost up to ${usd:.4f}, "
                                f"${max(0.0, free_usd):.4f} of ${self._cost_cap:.2f} left "
                                f"(${self._spent_cost:.4f} spent)"
                            )
                    else:
                        self._reserved += prompt + completion
                        self._reserved_cost += usd
                        return Reservation(next(_ids), prompt + completion, usd,
                                           completion_tokens=completion)
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
            try:
                await waiter
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
            self._warn(f"an LLM call used {actual_tokens:,} tokens, more than the "
                       f"{reservation.tokens:,} reserved for it; counted in full")

    def charge(self, tokens: int, cost_usd: float = 0.0, *, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
        """Count tokens billed outside any reservation (a retry that could not reserve again)."""
        with self._lock:
            self._spent += max(0, int(tokens))
            self._spent_cost += max(0.0, float(cost_usd))
            self._prompt_tokens += max(0, int(prompt_tokens))
            self._completion_tokens += max(0, int(completion_tokens))
        self._warn(f"an LLM call billed {tokens:,} tokens outside any reservation; counted in full")

    def _warn(self, text: str) -> None:
        # With a listener (a run) the event is the user's line; a bare log line would repeat it
        # without the run's [mm:ss].
        (log.info if self.warning_listeners else log.warning)("%s", text)
        for listener in list(self.warning_listeners):
            try:
                listener(text)
            except Exception:  # a broken listener must not lose the settlement
                log.exception("budget warning listener failed")

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


class CallTicket:
    """The budget side of one call, handed to a backend that retries (`accepts_ticket`).

    Why: the budget holds ONE reservation per call, which covers one attempt. When an attempt is
    abandoned after the server may already have billed it (no first token in time, a stream
    gone silent, a connection lost mid-reply), that attempt is charged in full — its prompt and
    the whole completion limit, a conservative estimate since the server reported nothing — and
    the retry must first reserve again, waiting or ending the run like any new call.
    """

    def __init__(self, budget: TokenBudget, reservation: Reservation, prompt_tokens: int,
                 usd_for: Callable[[int, int], float]) -> None:
        self.budget = budget
        self.reservation: Reservation | None = reservation
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = reservation.completion_tokens
        self._usd_for = usd_for

    def charge_abandoned(self) -> tuple[int, int]:
        """Charge the abandoned attempt its whole reservation; returns its (prompt, completion)
        estimate. `reserve_again` must follow before the next attempt."""
        held = self.reservation
        prompt, completion = self.prompt_tokens, self.completion_tokens
        usd = self._usd_for(prompt, completion)
        if held is not None and not held.done:
            self.budget.settle(held, prompt + completion, usd, prompt_tokens=prompt,
                               completion_tokens=completion)
        else:
            self.budget.charge(prompt + completion, usd, prompt_tokens=prompt,
                               completion_tokens=completion)
        self.reservation = None
        return prompt, completion

    async def reserve_again(self) -> None:
        """Room for the retry, as for any new call: waits, or raises BudgetExhausted."""
        self.reservation = await self.budget.reserve_call(
            self.prompt_tokens, self.completion_tokens, self.completion_tokens, self._usd_for)

    def release(self) -> None:
        if self.reservation is not None and not self.reservation.done:
            self.budget.release(self.reservation)

    def settle(self, tokens: int, usd: float, prompt: int, completion: int) -> None:
        if self.reservation is not None and not self.reservation.done:
            self.budget.settle(self.reservation, tokens, usd, prompt_tokens=prompt,
                               completion_tokens=completion)
        else:  # the retry could not reserve again; the tokens were billed all the same
            self.budget.charge(tokens, usd, prompt_tokens=prompt, completion_tokens=completion)


class BudgetedBackend:
    """Wraps any `LLMBackend` so every call is counted, clipped, reserved, and settled or
    released — whatever the backend (live, local, replay) — and fills `cost_usd` from the prices.

    `counter` (optional) is the server's tokenizer: asked only when the bound does not fit in
    what is left, so a budget far from its end never pays for a tokenize request.
    """

    def __init__(
        self,
        inner: LLMBackend,
        budget: TokenBudget,
        prices: PriceTable | None = None,
        *,
        counter: PromptCounting | None = None,
        min_reply_tokens: int = MIN_REPLY_TOKENS,
    ) -> None:
        self.inner = inner
        self.budget = budget
        self.prices = prices if prices is not None else PriceTable()
        self.counter = counter if counter is not None else getattr(inner, "prompt_counter", None)
        self.min_reply_tokens = int(min_reply_tokens)

    async def prompt_tokens(self, request: LLMRequest) -> int:
        """The prompt's upper bound: bytes, or the server's tokenizer near the end of the budget."""
        bound = prompt_token_bound(request.messages)
        if self.counter is None or bound + max(0, int(request.max_tokens)) <= self.budget.remaining:
            return bound
        exact = await self.counter.count(request.messages, request.model)
        return bound if exact is None else min(bound, exact)

    async def complete(self, request: LLMRequest) -> LLMResponse:
        if self.budget.max_cost_usd > 0:
            self.prices.require(request.model)
        prompt = await self.prompt_tokens(request)
        want = max(0, int(request.max_tokens))

        def usd_for(p: int, c: int) -> float:
            return self.prices.cost(request.model, p, c)

        reservation = await self.budget.reserve_call(
            prompt, want, min(want, self.min_reply_tokens), usd_for)
        if reservation.completion_tokens != want:
            log.info("max_tokens clipped from %d to %d: that is what the budget has left",
                     want, reservation.completion_tokens)
            request = dataclasses.replace(request, max_tokens=reservation.completion_tokens)
        ticket = CallTicket(self.budget, reservation, prompt, usd_for)
        try:
            if getattr(self.inner, "accepts_ticket", False):
                response = await self.inner.complete(request, ticket=ticket)  # type: ignore[call-arg]
            else:
                response = await self.inner.complete(request)
        except LLMError as err:
            billed = err.reported_tokens
            if billed is not None:  # e.g. an empty reply: useless, but the server charged for it
                p, c = err.prompt_tokens or 0, err.completion_tokens or 0
                ticket.settle(billed, usd_for(p, c), p, c)
            elif err.billed_maybe:  # abandoned mid-reply: charge the whole attempt
                p, c = ticket.prompt_tokens, ticket.completion_tokens
                err.prompt_tokens, err.completion_tokens = p, c
                ticket.settle(p + c, usd_for(p, c), p, c)
            else:
                ticket.release()
            raise
        except BaseException:  # cancelled, or a bug: nothing was reported, so nothing is spent
            ticket.release()
            raise
        response.max_tokens = request.max_tokens
        # Price by the model the server says it used when we know it (a dated snapshot, an
        # OpenRouter prefix), else by the model we asked for.
        priced = response.model if self.prices.known(response.model or "") else request.model
        response.cost_usd = self.prices.cost(
            priced, response.prompt_tokens, response.completion_tokens
        )
        ticket.settle(response.total_tokens, response.cost_usd, response.prompt_tokens,
                      response.completion_tokens)
        return response

    async def aclose(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()
