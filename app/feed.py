"""Where the dashboard's events come from, and when it looks for more.

Why a module of its own, with no Textual in it: reading the run directory is the one part of the
dashboard that touches the outside world, and the part worth measuring on its own
(`benchmarks/tail_bench.py` drives these very functions). The App's feed workers fold what
`RunSource` reads and publish it (`looptree.app.messages.RunChanged`); the experiment view tails
its log with the same `looks`.

Why polling (every `period`, the refresh rate: 10 Hz) and not watchfiles/inotify, measured side
by side (benchmarks/README.md, "tail_bench.py"): a watchfiles tail folds a line about 22 ms
sooner at the median (31 ms against 53 ms; p95 40 against 96 ms) but is no cheaper when idle
(0.36% of a core against 0.29%: its watcher thread wakes every step to check for a stop) and
costs 4x the CPU at 200 events/s (2.4% of a core against 0.6%). The screen is redrawn at most
`refresh_hz` times a second anyway, so under load the gain never reaches it, and when it would,
22 ms is below what a person notices. Polling also works unchanged on NFS or Lustre (HPC
login nodes), where inotify sees no other machine's writes and a watcher would need a polling
fallback of its own. A look with nothing new is one `open` and `read` of each file.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from looptree.engine.core.events import EVENTS_NAME, TELEMETRY_NAME, EventTail, samples_and_offset

Events = list[dict[str, Any]]


class RunSource:
    """A run's event log and its telemetry, read incrementally (complete lines only)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.events = EventTail(run_dir / EVENTS_NAME)
        self.samples = EventTail(run_dir / TELEMETRY_NAME)

    def load(self) -> Events:
        """Everything so far, for the first fold: the whole event log and the newest GPU samples.

        Only the newest samples matter to a viewer, so the telemetry tail starts at the file's
        end. Blocking (it reads the whole log): call it from a thread worker.
        """
        events = self.events.poll()
        samples, self.samples.offset = samples_and_offset(self.run_dir)
        return events + samples

    def poll(self) -> Events:
        """The complete lines appended since the last look: events first, then samples."""
        return self.events.poll() + self.samples.poll()


async def looks(poll: Callable[[], Events], period: float) -> AsyncIterator[Events]:
    """Every `period` seconds, what `poll` read (an empty list when nothing was appended).

    Each look is yielded, empty or not, so a consumer can count them (the dashboard's
    `timer_firings["events"]`) and notice when it is shutting down.
    """
    while True:
        await asyncio.sleep(period)
        yield poll()
