"""Text from a run, shown on a terminal: control characters made visible, never obeyed.

Why: nearly everything looptree shows comes from code it does not trust. Bench and build logs,
failure reasons, metric column names, agent replies and descriptions, even a model name, are
written by the candidate's code or an LLM. A terminal obeys escape sequences in what it is
given: one in a log line can retitle the window, rewrite the screen, or set the clipboard (OSC
52: a command planted for the user's next paste), and a bidirectional override can make a line
read as another. Measured, not guessed: a window title set by a log line shown in the dashboard
(tests/test_terminal_text.py). So every path from run data to a terminal goes through here: the
CLI's standard streams (`SafeStream`), the headless printer (through them), and the dashboard's
inputs (events as they are folded, logs and diffs as they are read).

Shown, not dropped: `\\x1b` in a reason tells the user something odd was printed.
"""

from __future__ import annotations

import io
from typing import Any, TextIO

#: What multi-line text keeps as is: line ends and tabs.
KEEP_LAYOUT = "\n\t"


def _visible(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe_text(text: str, *, keep: str = KEEP_LAYOUT) -> str:
    """`text` with every non-printable character (C0/C1 controls, ESC, DEL, bidirectional and other
    format characters, line separators) written as `\\xNN`/`\\uNNNN`, except those in `keep`."""
    if text.isprintable():
        return text
    return "".join(c if c in keep or c.isprintable() else _visible(c) for c in text)


def safe_value(value: Any) -> Any:
    """An event (or any JSON value) with every string in it made safe, keys included."""
    if isinstance(value, str):
        return value if value.isprintable() else safe_text(value)
    if isinstance(value, dict):
        return {safe_value(k): safe_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [safe_value(v) for v in value]
    return value


class SafeStream(io.TextIOBase):
    """A text stream that writes `safe_text` of what it is given (the CLI's stdout and stderr)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(safe_text(text))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")

    def writable(self) -> bool:
        return True
