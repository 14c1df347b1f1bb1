"""RateLimiter: requests and tokens per window, server back-off, FIFO waiting."""

from __future__ import annotations

import asyncio
import time

from looptree.engine.agents.llm.ratelimit import RateLimiter


async def test_requests_per_window_are_capped():
    limiter = RateLimiter(requests_per_minute=3, window_s=0.4)
    started = time.monotonic()
    waits = [await limiter.acquire() for _ in range(4)]
    elapsed = time.monotonic() - started
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] > 0.3 and 0.35 <= elapsed < 1.0


async def test_tokens_per_window_are_capped_and_huge_requests_go_alone():
    limiter = RateLimiter(tokens_per_minute=100, window_s=0.3)
    assert await limiter.acquire(60) == 0.0
    started = time.monotonic()
    await limiter.acquire(60)  # 120 > 100: waits for the first to leave the window
    assert time.monotonic() - started >= 0.25
    started = time.monotonic()
    await limiter.acquire(500)  # larger than the whole allowance: waits for an empty window
    assert 0.25 <= time.monotonic() - started < 1.0


async def test_penalize_holds_everyone_back_and_is_visible():
    limiter = RateLimiter(requests_per_minute=0)
    assert limiter.backoff_s == 0.0
    limiter.penalize(0.3)
    assert 0.2 < limiter.backoff_s <= 0.3
    started = time.monotonic()
    results = await asyncio.gather(*(limiter.acquire() for _ in range(3)))
    assert time.monotonic() - started >= 0.28
    assert results[0] > 0.2  # the first waiter slept out the penalty
    assert limiter.backoff_s == 0.0


async def test_waiters_are_served_in_arrival_order():
    limiter = RateLimiter(requests_per_minute=1, window_s=0.1)
    order: list[int] = []

    async def call(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(call(i)))
        await asyncio.sleep(0)  # arrive in this order
    await asyncio.sleep(0.05)
    assert limiter.waiting == 3
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3]
    assert limiter.total_wait_s > 0.25
