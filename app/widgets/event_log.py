"""The Events tab: one line per event (the words of `schema.describe`), and the commands sent.

Why a bounded buffer beside the RichLog: a hidden RichLog defers every write in an unbounded queue
until it gets a size, which on a run watched for hours with the tab never opened would grow
without end. The last `LOG_LIMIT` lines are kept in a deque and written only while the tab shows;
opening the tab writes the buffer out in one go.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from rich.text import Text
from textual.widgets import RichLog

from looptree.app.messages import RunChanged
from looptree.app.widgets.base import RunWidget

LOG_LIMIT = 500
LOG_STYLES = {"error": "red", "good": "green", "control": "magenta", "sent": "bold magenta", "": ""}


def log_text(lines: Iterable[tuple[str, str]]) -> Text:
    """Many log lines as one Text: one RichLog.write per frame instead of one per event."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for index, (line, style) in enumerate(lines):
        if index:
            text.append("\n")
        text.append(line, style=LOG_STYLES.get(style, ""))
    return text


class EventLog(RunWidget, RichLog):
    """The run's event lines, newest last; `buffer` holds the last `LOG_LIMIT` (text, style)."""

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id, max_lines=LOG_LIMIT, wrap=False, markup=False, highlight=False)
        self.buffer: deque[tuple[str, str]] = deque(maxlen=LOG_LIMIT)

    def draw(self, frame: RunChanged) -> None:
        if frame.reset:  # a backwards seek: the lines of the old fold are gone
            self.clear()
            self.buffer.clear()
        if frame.changes.log_lines:
            self.add_lines(frame.changes.log_lines)

    def add_lines(self, lines: list[tuple[str, str]]) -> None:
        """Keep the lines; write them out now only if the tab is open."""
        self.buffer.extend(lines)
        if self.shown:
            self.write(log_text(lines[-LOG_LIMIT:]))

    def on_tab_shown(self) -> None:
        self.clear()
        if self.buffer:
            self.write(log_text(self.buffer))
