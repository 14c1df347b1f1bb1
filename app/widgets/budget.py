"""The Budget tab: tokens, dollars and requests per minute against their caps, as gauges.

Why a widget of its own: the gauges depend on the clock as well as on the events (requests per
minute slide with time), so they are redrawn on every frame, ticks included, but the Static is
updated only when the text changed.
"""

from __future__ import annotations

from typing import Any

from textual.widgets import Static

from looptree.app.labels import budget_text
from looptree.app.messages import RunChanged
from looptree.app.widgets.base import RunWidget


class BudgetGauges(RunWidget, Static):
    """`budget_text` of the last frame."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__("", id=id)
        self._key: Any = None

    def draw(self, frame: RunChanged) -> None:
        text = budget_text(frame.view, now=frame.now)
        if text.plain != self._key:
            self._key = text.plain
            self.update(text, layout=False)
