"""The two header lines: run, project, state, elapsed / node counts, best against the baseline, tokens.

Why it keeps a key of what it shows: the header hears every frame (ten a second under load, and
each tick of the clock and the spinner) but its text changes far less often; it is rebuilt only
when the plain text or the spans differ, and without a relayout (its height is fixed).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from looptree.app.labels import header_text
from looptree.app.messages import RunChanged
from looptree.app.widgets.base import RunWidget


class RunHeader(RunWidget, Static):
    """`header_text` of the last frame, redrawn on change and when the terminal is resized."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(Text(" looptree  loading…"), id=id)
        self._key: Any = None
        self._last: RunChanged | None = None

    def draw(self, frame: RunChanged) -> None:
        self._last = frame
        self._show(frame)

    def on_resize(self) -> None:
        if self._last is not None:
            self._show(self._last)  # below 120 columns the words shrink

    def _show(self, frame: RunChanged) -> None:
        text = header_text(frame.view, now=frame.now, engine_alive=frame.engine_alive, replay=frame.replay,
                           width=self.app.size.width)
        key = (text.plain, len(text.spans))
        if key != self._key:
            self._key = key
            self.update(text, layout=False)  # fixed height: no relayout
