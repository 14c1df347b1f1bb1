"""The dashboard's domain message: what changed in the run, handed to every widget that shows it.

Why one message and a signal, not the App calling each widget: the feed (the load, the live tail,
the replay; `@work` workers in `dashboard.py`) folds events into the `RunView` and posts one
`RunChanged` per frame to the App. Textual messages bubble up, never down, so the App handles it
by publishing it on its `run_changed` signal, inside one `batch_update()`; each widget subscribed
to that signal in its `on_mount` (`widgets/base.py`) and redraws its own slice from the batch.
A new widget subscribes itself; the App's code does not change.

A frame carries the `Changes` batch (`RunView.take_changes`), so a widget touches only what moved
(a node's label, the rows of the node being benchmarked) and keeps its own cache of what it shows.
The same message with an empty batch says that only time moved (the clock, the spinner, the
engine's lock, the replay's play state), which the header, the budget gauges and the spinners show.
"""

from __future__ import annotations

from textual.message import Message

from looptree.app.model import Changes, RunView


class RunChanged(Message):
    """A frame of the run: the events folded since the last one, and the clock to draw them with."""

    def __init__(self, view: RunView, changes: Changes, *, force: bool = False, reset: bool = False,
                 frame: int | None = None, now: float = 0.0, engine_alive: bool | None = None,
                 replay: str | None = None) -> None:
        super().__init__()
        #: the view the batch was folded into (a backwards seek replaces the App's view)
        self.view = view
        #: what changed since the previous frame
        self.changes = changes
        #: redraw everything shown, caches or not (the first frame, a seek, a replay step)
        self.force = force
        #: the view was rebuilt from scratch (a backwards seek): drop what was drawn from the old one
        self.reset = reset
        #: spinner frame of running nodes; None while the clock is frozen (snapshot tests)
        self.frame = frame
        #: the dashboard's clock: wall time live (frozen in tests), the current event's time in replay
        self.now = now
        #: live: whether an engine holds the run's lock (None: unknown, or a replay)
        self.engine_alive = engine_alive
        #: replay: `▶ replay 120/400 (30%) ×2` for the header; None live
        self.replay = replay

    @property
    def tick(self) -> bool:
        """Only time moved: no event was folded and nothing is to be redrawn from scratch."""
        return not (self.changes.any or self.changes.log_lines or self.force)
