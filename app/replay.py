"""Replay position and timing: which events are due, and how a seek is carried out.

Why a separate, clock-free class: the timing rules (original gaps divided by the speed, long
idle gaps capped, seeking backwards means re-folding from the start) are the part of replay
that is easy to get subtly wrong, and here they are tested with plain numbers instead of a
running terminal. The App feeds it elapsed wall seconds and folds whatever it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: A replay never makes the viewer wait longer than this (wall seconds) between two events.
GAP_CAP_S = 2.0
SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


@dataclass
class Seek:
    """What the App must do to reach a position: re-fold from scratch or apply more events."""

    refold: bool
    events: list[dict[str, Any]]


@dataclass
class ReplayCursor:
    events: list[dict[str, Any]]
    speed: float = 1.0
    playing: bool = True
    position: int = 0  # events[:position] have been applied
    _waited: float = field(default=0.0, repr=False)

    @property
    def total(self) -> int:
        return len(self.events)

    @property
    def at_end(self) -> bool:
        return self.position >= self.total

    @property
    def percent(self) -> float:
        return 100.0 * self.position / self.total if self.total else 100.0

    def gap_before(self, index: int) -> float:
        """Wall seconds to wait before event `index` at the current speed (capped)."""
        if index <= 0 or index >= self.total:
            return 0.0
        a = self.events[index - 1].get("ts", 0.0)
        b = self.events[index].get("ts", 0.0)
        try:
            gap = max(0.0, float(b) - float(a))
        except (TypeError, ValueError):
            gap = 0.0
        return min(gap / self.speed, GAP_CAP_S)

    def advance(self, wall_dt: float) -> list[dict[str, Any]]:
        """Events that became due during `wall_dt` seconds of playing."""
        if not self.playing or self.at_end:
            return []
        self._waited += max(0.0, wall_dt)
        start = self.position
        while self.position < self.total:
            need = self.gap_before(self.position)
            if self._waited < need:
                break
            self._waited -= need
            self.position += 1
        if self.at_end:
            self.playing = False
            self._waited = 0.0
        return self.events[start:self.position]

    def step(self) -> list[dict[str, Any]]:
        """Apply exactly one more event (paused stepping)."""
        self._waited = 0.0
        if self.at_end:
            return []
        self.position += 1
        return self.events[self.position - 1:self.position]

    def seek(self, target: int) -> Seek:
        """Move to `target` events applied; backwards means re-folding events[:target]."""
        target = max(0, min(self.total, int(target)))
        self._waited = 0.0
        if target >= self.position:
            out = Seek(False, self.events[self.position:target])
        else:
            out = Seek(True, self.events[:target])
        self.position = target
        if self.at_end:
            self.playing = False
        return out

    def seek_percent(self, percent: float) -> Seek:
        return self.seek(round(self.total * max(0.0, min(100.0, percent)) / 100.0))

    def change_speed(self, factor: float) -> float:
        """Multiply the speed by `factor`, snapping to the SPEEDS ladder's range."""
        speed = self.speed * factor
        self.speed = max(SPEEDS[0], min(SPEEDS[-1], speed))
        return self.speed

    def toggle(self) -> bool:
        if self.at_end and not self.playing:
            return False  # nothing left to play; the App says so
        self.playing = not self.playing
        return self.playing


def parse_seek(text: str, total: int) -> int:
    """The seek modal's text → a position: `50%` is half-way, `1234` is "after event 1234".

    Raises ValueError with the one-line message the modal shows under its input.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("type a percentage like 50% or an event number")
    try:
        if raw.endswith("%"):
            percent = float(raw[:-1])
            if not 0.0 <= percent <= 100.0:
                raise ValueError
            return round(total * percent / 100.0)
        number = int(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is neither a percentage (0–100%) nor an event number") from None
    if not 0 <= number <= total:
        raise ValueError(f"event number {number} is outside 0–{total}")
    return number
