"""Requests-per-minute (and optional tokens-per-minute) limiting for LLM calls.

Why client-side limiting when servers answer 429 anyway: every 429 is a wasted round trip and,
with 16 workers, a thundering herd. A sliding window keeps us under the provider's published
limits, and `penalize` lets one worker's 429 (with its Retry-After) hold back all of them. The
dashboard shows `backoff_s` so a user sees why nothing moves.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """Sliding-window limiter: at most `requests_per_minute` starts and `tokens_per_minute`
    tokens in any `window_s` seconds (0 = no limit). Waiters are served first come, first served.
    """

    def __init__(
        self,
        requests_per_minute: float = 0,
        tokens_per_minute: float = 0,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rpm = max(0, int(requests_per_minute or 0))
        self.tpm = max(0, int(tokens_per_minute or 0))
        self.window_s = float(window_s)
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()  # (start time, tokens)
        self._tokens = 0
        self._not_before = 0.0
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._total_wait_s = 0.0

    # -- dashboard figures --------------------------------------------------------------------
    @property
    def backoff_s(self) -> float:
        """Seconds a request made now would wait (server back-off or a full window)."""
        now = self._clock()
        self._prune(now)
        return max(0.0, self._delay(now, 0))

    @property
    def waiting(self) -> int:
        """Calls currently queued behind the limiter."""
        return self._waiting

    @property
    def total_wait_s(self) -> float:
        """Seconds spent waiting so far, all calls together."""
        return self._total_wait_s

    # -- operations ---------------------------------------------------------------------------
    async def acquire(self, tokens: int = 0) -> float:
        """Wait for a slot for one request of about `tokens` tokens; returns seconds waited."""
        tokens = max(0, int(tokens))
        waited = 0.0
        self._waiting += 1
        try:
            async with self._lock:  # FIFO: asyncio.Lock wakes waiters in arrival order
                while True:
                    now = self._clock()
                    self._prune(now)
                    delay = self._delay(now, tokens)
                    if delay <= 0:
                        self._events.append((now, tokens))
                        self._tokens += tokens
                        return waited
                    await asyncio.sleep(delay)
                    waited += delay
                    self._total_wait_s += delay
        finally:
            self._waiting -= 1

    def penalize(self, seconds: float) -> None:
        """Hold every new request back for `seconds` (a server said 429 / Retry-After)."""
        if seconds > 0:
            self._not_before = max(self._not_before, self._clock() + seconds)

    # -- internals ----------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._events and self._events[0][0] <= horizon:
            _, tokens = self._events.popleft()
            self._tokens -= tokens

    def _delay(self, now: float, tokens: int) -> float:
        delay = self._not_before - now
        if self.rpm and len(self._events) >= self.rpm:
            # The request that must leave the window before one more fits.
            oldest = self._events[len(self._events) - self.rpm][0]
            delay = max(delay, oldest + self.window_s - now)
        if self.tpm and self._events and self._tokens + tokens > self.tpm:
            # Drop the oldest starts until the new one fits; a request larger than the whole
            # allowance goes alone through an empty window rather than never.
            need = self._tokens + tokens - self.tpm
            freed = 0
            for start, used in self._events:
                freed += used
                if freed >= need or freed == self._tokens:
                    delay = max(delay, start + self.window_s - now)
                    break
        return delay
