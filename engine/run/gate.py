"""The run's pause/stop switch: what every step checks before it starts something new.

Why its own object: the search loop, the node runner and the control commands all need the
same two facts (is the run paused? is it stopping, and why?). Keeping them here, rather than
as attributes of the engine that each part reaches into, lets each part depend on this small
switch alone.
"""

from __future__ import annotations

import asyncio


class Stop(Exception):
    """Raised inside the search when the run must end (budget spent, user stop)."""


class RunGate:
    """Paused or running, and the reason the run is stopping (None while it is not)."""

    def __init__(self, *, paused: bool = False) -> None:
        self.stop_reason: str | None = None
        self._unpaused = asyncio.Event()
        if not paused:  # a run paused before a crash or stop stays paused on resume
            self._unpaused.set()

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def pause(self) -> None:
        self._unpaused.clear()

    def unpause(self) -> None:
        self._unpaused.set()

    def stop(self, reason: str) -> bool:
        """Mark the run as stopping; False when it already was (the first reason stands)."""
        if self.stop_reason:
            return False
        self.stop_reason = reason
        self._unpaused.set()  # a paused run must wake up to stop
        return True

    async def check(self) -> None:
        """Wait while paused; raise `Stop` when the run is stopping."""
        if self.stop_reason:
            raise Stop()
        if not self._unpaused.is_set():
            await self._unpaused.wait()
        if self.stop_reason:
            raise Stop()
