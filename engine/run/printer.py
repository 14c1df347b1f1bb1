"""Headless output: one human line per event (stderr) or one JSON object per event (stdout).

Why its own module: `--no-tui` is how people run looptree under nohup, in CI and in logs, so the
lines must be greppable and stable; the dashboard is not involved.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from looptree.engine.core.schema import describe
from looptree.engine.core.state import RunState


def format_event(event: dict[str, Any], state: RunState) -> str | None:
    """The headless line of one event (schema.describe's text), or None for GPU samples.

    Node lines start with the node ID in a column of 10, so a log greps and reads as a table.
    """
    line = describe(event, state)
    if line is None:
        return None
    return line.text if line.node is None else f"{line.node:<10} {line.text}"


class Printer:
    """An EventLog listener. Lines are prefixed with the time since the run started."""

    def __init__(self, state: RunState, *, json_mode: bool = False, stream: TextIO | None = None) -> None:
        self.state = state
        self.json_mode = json_mode
        self.stream = stream or (sys.stdout if json_mode else sys.stderr)
        self.started = time.time()

    def __call__(self, event: dict[str, Any]) -> None:
        if self.json_mode:
            self.stream.write(json.dumps(event, separators=(",", ":"), default=str) + "\n")
            self.stream.flush()
            return
        line = format_event(event, self.state)
        if line is None:
            return
        started = self.state.started_ts or self.started
        elapsed = max(0.0, event.get("ts", time.time()) - started)
        minutes, seconds = divmod(elapsed, 60)
        self.stream.write(f"[{int(minutes):02d}:{seconds:04.1f}] {line}\n")
        self.stream.flush()
