"""The looptree dashboard: a Textual viewer of `runs/<N>/events.jsonl` that writes `control.jsonl`.

Why it is only a viewer: the engine may run for hours under nohup on another machine's SSH
session; the dashboard folds the same event log every other reader folds and sends commands
through the same file `looptree ctl` uses, so it can be closed, killed or reattached at any
time without the run noticing.

How it keeps up (200 events/s at 10k nodes on a 2-core box): the feed, three `@work` workers,
folds events into the `RunView` as they come (`RunView.apply`, O(1)): `_load` (a thread: the log
so far), then `_tail` (live: what `feed.looks` reads of the run's logs, 10 times a second) or
`_replay` (the replay cursor's advance, as often). After each look that folded something it posts
a frame (`_post_frame`): the view's `Changes` as one `RunChanged`, so at most `refresh_hz` (10)
frames a second however fast events arrive. The App handles it by publishing it on `run_changed`
inside one `batch_update()`, and each widget redraws what the batch touched of its own slice
(messages.py, widgets/base.py): the App names no widget to redraw. Spinners, the clock and the
engine-lock check run on their own slow timers (`_every`) and post frames with an empty batch;
none of them run when the time is frozen (snapshot tests).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from textual import constants, on, work
from textual.app import App, ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.signal import Signal
from textual.timer import Timer
from textual.widgets import TabbedContent, TabPane, Tree
from textual.worker import Worker, WorkerState

from looptree import styles
from looptree.app.actions import BINDINGS, DashboardActions
from looptree.app.commands import LooptreeCommands
from looptree.app.feed import RunSource, looks
from looptree.app.files import DiffCache
from looptree.app.messages import RunChanged
from looptree.app.model import Changes, RunView, now_or_frozen
from looptree.app.replay import ReplayCursor, Seek
from looptree.app.widgets.budget import BudgetGauges
from looptree.app.widgets.detail import DetailPanel
from looptree.app.widgets.event_log import EventLog
from looptree.app.widgets.footer import LeanFooter
from looptree.app.widgets.gpu import GpuPanel
from looptree.app.widgets.header import RunHeader
from looptree.app.widgets.live_rows import LiveRows
from looptree.app.widgets.metric_plot import MetricPlot
from looptree.app.widgets.run_tree import RunTree
from looptree.engine.core.events import RunLock, iter_run
from looptree.engine.core.state import NodeState
from looptree.engine.errors import LooptreeError

Mode = Literal["live", "replay"]
CSS_FILE = Path(styles.__file__).parent / "dashboard.tcss"
FROZEN_ENV = "LOOPTREE_FROZEN_TIME"
FEED_GROUP = "feed"  # the live tail or the replay: one worker that runs as long as the App


@dataclass(frozen=True)
class Periods:
    """Seconds between firings of each periodic task (tests shorten them to see every one fire).

    `events` is not here: the feed looks at the run `refresh_hz` times a second.
    """

    gc_freeze: float = 300.0
    spinner: float = 0.25
    clock: float = 1.0
    engine_lock: float = 2.0


def frozen_from_env() -> float | None:
    raw = os.environ.get(FROZEN_ENV, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise LooptreeError(f"{FROZEN_ENV}={raw!r} is not a unix timestamp") from None


class LooptreeApp(DashboardActions, App[int]):
    """The dashboard. `mode="live"` tails a run; `mode="replay"` plays a finished log back."""

    CSS_PATH = CSS_FILE
    TITLE = "looptree"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]  # typed by App
    COMMANDS = App.COMMANDS | {LooptreeCommands}
    BINDINGS: ClassVar[list[BindingType]] = BINDINGS

    def __init__(self, run_dir: Path | str, *, mode: Mode = "live", speed: float = 1.0, autoplay: bool = True,
                 frozen_time: float | None = None, keymap: dict[str, str] | None = None,
                 refresh_hz: float | None = None, freeze_gc: bool = False,
                 periods: Periods | None = None) -> None:
        super().__init__()
        if mode not in ("live", "replay"):
            raise LooptreeError(f"dashboard mode must be live or replay, not {mode!r}")
        if not speed or speed <= 0:
            raise LooptreeError(f"replay speed must be a positive number, not {speed!r}")
        self.run_dir = Path(run_dir)
        self.mode: Mode = mode
        self.speed = float(speed)
        self.autoplay = autoplay
        self.frozen_time = frozen_time if frozen_time is not None else frozen_from_env()
        self.refresh_hz = min(refresh_hz or 10.0, float(constants.MAX_FPS))
        # A 10k-node run is millions of long-lived objects; a full GC pass over them stalls the
        # UI for 100-300 ms. Freezing them after the load (and every few minutes) keeps the
        # collector on young objects only. Off by default: it is process-wide (tests share one).
        self.freeze_gc = freeze_gc
        self.periods = periods or Periods()
        #: how often each periodic task has run: the long-session test reads it
        self.timer_firings: Counter[str] = Counter()
        #: every frame, to every widget that subscribed (widgets/base.py)
        self.run_changed: Signal[RunChanged] = Signal(self, "run_changed")
        self.view = RunView()
        self.cursor: ReplayCursor | None = None
        self.engine_alive: bool | None = None
        self.diffs = DiffCache()
        self.loaded = False
        self.error: str | None = None
        self._source = RunSource(self.run_dir)
        self._selected_id: str | None = None
        self._frame = 0
        self._frames_waiting = 0  # frames with events posted and not yet drawn
        self._binding_sig: object = None
        self._detail_pending = False
        self._footer_pending = False
        self._last_tick = time.monotonic()
        self._my_timers: list[Timer] = []
        if keymap:
            self.set_keymap(keymap)

    # -- layout --------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        with Horizontal(id="body"):
            with Vertical(id="tree-pane"):
                yield RunTree(id="tree")
            with Vertical(id="right"):
                yield DetailPanel(self.run_dir, diffs=self.diffs, id="detail")
                with TabbedContent(id="panels", initial="tab-live"):
                    with TabPane("Live", id="tab-live"):
                        yield LiveRows(id="rows")
                    with TabPane("Plot", id="tab-plot"):
                        yield MetricPlot(id="plot")
                    with TabPane("GPU", id="tab-gpu"):
                        yield GpuPanel(id="gpu")
                    with TabPane("Budget", id="tab-budget"):
                        yield BudgetGauges(id="budget")
                    with TabPane("Events", id="tab-events"):
                        yield EventLog(id="events")
        yield LeanFooter(compact=True)

    @property
    def run_tree(self) -> RunTree:
        return self.query_one("#tree", RunTree)

    @property
    def detail(self) -> DetailPanel:
        return self.query_one("#detail", DetailPanel)

    def on_mount(self) -> None:
        self.run_tree.focus()
        self.sub_title = f"{self.mode}: {self.run_dir}"
        self._load()

    # -- the feed: load, tail, replay ----------------------------------------------------
    @work(thread=True, exclusive=True, group="load", name="load", exit_on_error=False)
    def _load(self) -> None:
        """Read (and, live, fold) the whole log so far without blocking the UI."""
        if self.mode == "replay":
            events = list(iter_run(self.run_dir))  # events and GPU samples, in time order
            self.cursor = ReplayCursor(events, speed=self.speed, playing=self.autoplay)
        else:
            self.view.apply_all(self._source.load())
            try:
                self.engine_alive = RunLock.is_held(self.run_dir)
            except OSError:
                self.engine_alive = None

    @work(exclusive=True, group=FEED_GROUP, name="tail", exit_on_error=False)
    async def _tail(self) -> None:
        """Live: fold what each look at the run's logs found, and ask for a frame."""
        async for events in looks(self._source.poll, 1.0 / self.refresh_hz):
            if not self._alive():
                return
            self.timer_firings["events"] += 1
            if events:
                self.view.apply_all(events)
            self._post_frame()  # also what a look skipped while the screen was busy

    @work(exclusive=True, group=FEED_GROUP, name="replay", exit_on_error=False)
    async def _replay(self) -> None:
        """Replay: advance the cursor by the time that passed (scaled), fold, ask for a frame."""
        self._last_tick = time.monotonic()
        while True:
            await asyncio.sleep(1.0 / self.refresh_hz)
            if not self._alive():
                return
            self.timer_firings["events"] += 1
            self._advance()

    def _advance(self) -> None:
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        cursor = self.cursor
        if cursor is None or not cursor.playing:
            self._post_frame()  # a step or a seek may have left changes
            return
        events = cursor.advance(dt)
        if events:
            self.view.apply_all(events)
        self._post_frame()
        if not cursor.playing:
            self._tick()
            self.notify("end of the replay", timeout=3)

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if worker.group not in ("load", FEED_GROUP):
            return
        if event.state == WorkerState.SUCCESS and worker.group == "load":
            self._post_frame(force=True)  # the first frame; `_start` follows once it is drawn
        elif event.state == WorkerState.ERROR:
            error = worker.error
            what = "read" if worker.group == "load" else "follow"
            self.error = str(error) if isinstance(error, LooptreeError) else f"could not {what} the run: {error!r}"
            self.exit(2, return_code=2, message=self.error)

    def _start(self) -> None:
        """After the first frame is on screen: the feed and the periodic tasks."""
        self.loaded = True
        if self.freeze_gc:
            gc.freeze()
            self._every(self.periods.gc_freeze, self._freeze_gc, "gc-freeze")
        if self.mode == "live":
            self._tail()
        else:
            self._replay()
        if self.frozen_time is None:
            self._every(self.periods.spinner, self._spin, "spinner")
            self._every(self.periods.clock, self._clock, "clock")
        if self.mode == "live":
            self._every(self.periods.engine_lock, self._check_engine, "engine-lock")

    def _every(self, period: float, callback: Callable[[], object], name: str) -> None:
        """Run `callback` every `period` seconds, counted in `timer_firings`.

        Why a wrapper: Textual's timer inspects its callback (`__func__`), so a builtin such as
        `gc.freeze` handed to `set_interval` crashed every session when it first fired (after
        300 s). Every periodic task goes through this one Python function instead.
        """

        def fire() -> object:
            self.timer_firings[name] += 1
            return callback()

        self._my_timers.append(self.set_interval(period, fire, name=name))

    def _freeze_gc(self) -> None:
        # Collect first: a cycle that is garbage when frozen is never collected, so freezing
        # without it leaks whatever garbage the last few minutes left. Only the objects made
        # since the previous freeze are traversed (the frozen ones are not), so this is cheap.
        gc.collect()
        gc.freeze()

    def _spin(self) -> None:
        if not self._alive() or not self.view.running:
            return
        self._frame += 1
        self._tick()

    def _clock(self) -> None:
        if self._alive():
            self._tick()

    def _check_engine(self) -> None:
        if not self._alive():
            return
        try:
            alive: bool | None = RunLock.is_held(self.run_dir)
        except OSError:
            alive = None  # unreadable lock (permissions, a flaky network filesystem): say nothing
        if alive != self.engine_alive:
            self.engine_alive = alive
            self._tick()

    def _alive(self) -> bool:
        """False while the app shuts down: a timer tick can still arrive after the screens are gone."""
        return self.is_running and not self._exit and bool(self.screen_stack)

    def now(self) -> float:
        """Wall time live (frozen in tests); the current event's time in replay."""
        if self.mode == "replay":
            return self.view.state.last_ts or 0.0
        return now_or_frozen(self.frozen_time)

    # -- frames --------------------------------------------------------------------------
    def _post_frame(self, *, force: bool = False, reset: bool = False) -> None:
        """Post what the view folded since the last frame as one `RunChanged` (nothing if nothing).

        The feed calls it once per look, and looks once per refresh period, so frames never come
        faster than `refresh_hz` however fast events arrive: a look folds all of them. While the
        last frame is still waiting to be drawn (a slow terminal, a huge first tree) the changes
        stay in the view and go with a later look's frame, so frames never queue up.
        """
        if self._frames_waiting and not (force or reset):
            return
        changes = self.view.take_changes()
        if changes.any or force:
            self._frames_waiting += 1
            self.post_message(self._frame_of(changes, force=force, reset=reset))

    def _tick(self) -> None:
        """Only time moved (clock, spinner, engine lock, replay state): a frame with an empty batch."""
        self.post_message(self._frame_of(Changes()))

    def _frame_of(self, changes: Changes, *, force: bool = False, reset: bool = False) -> RunChanged:
        replay = None
        cursor = self.cursor
        if cursor is not None:
            replay = (f"{'▶' if cursor.playing else '⏸'} replay {cursor.position}/{cursor.total} "
                      f"({cursor.percent:.0f}%) ×{cursor.speed:g}")
        return RunChanged(self.view, changes, force=force, reset=reset,
                          frame=None if self.frozen_time is not None else self._frame, now=self.now(),
                          engine_alive=self.engine_alive if self.mode == "live" else None, replay=replay)

    @on(RunChanged)
    def _run_changed(self, message: RunChanged) -> None:
        """Hand the frame to every widget in one batch, then follow it with the selection and the keys."""
        if not message.tick:
            self._frames_waiting -= 1
        if not self._alive():
            return
        with self.batch_update():
            self.run_changed.publish(message)
            new_nodes = message.changes.new_nodes
            if message.reset:
                self._reselect(message.view)
            elif self._selected_id is None and new_nodes and self.run_tree.select_id(new_nodes[0]):
                self._select(new_nodes[0])
        if message.reset and self.freeze_gc:
            gc.collect()  # the old tree is garbage now that the new one is drawn
            gc.freeze()
        if not self.loaded:
            self._start()
        self._refresh_footer()

    def _log_lines(self, lines: list[tuple[str, str]]) -> None:
        """Lines that are not events (the commands this dashboard sent) for the event log."""
        self.query_one("#events", EventLog).add_lines(lines)

    # -- selection -----------------------------------------------------------------------
    @property
    def selected_node(self) -> NodeState | None:
        return self.view.state.nodes.get(self._selected_id or "")

    @on(Tree.NodeHighlighted)
    def _highlighted(self, event: Tree.NodeHighlighted) -> None:
        node_id = event.node.data
        if isinstance(node_id, str) and node_id != self._selected_id:
            self._select(node_id)

    def _select(self, node_id: str) -> None:
        """Note the selection now; fill the detail panel after the next paint.

        The cursor's own repaint is what the user waits for when holding an arrow key; the
        detail panel (and the footer's greyed keys) follow one frame later, once per burst.
        """
        self._selected_id = node_id
        if not self._detail_pending:
            self._detail_pending = True
            self.call_after_refresh(self._show_selection)

    def _show_selection(self) -> None:
        self._detail_pending = False
        self.detail.show_node(self.view, self._selected_id)
        self._refresh_footer()

    def _reselect(self, view: RunView) -> None:
        """After a backwards seek: the same node if the new fold has it, else the first."""
        state = view.state
        selected = self._selected_id
        target = selected if selected in state.nodes else (state.order[0] if state.order else None)
        if target is not None and self.run_tree.select_id(target):
            self._select(target)
        else:
            self._selected_id = None

    def _apply_seek(self, seek: Seek) -> None:
        self._last_tick = time.monotonic()
        if seek.refold:
            if self.freeze_gc:
                gc.unfreeze()  # the old tree becomes cyclic garbage once the frame redraws it
            self.view = RunView()
            self.view.apply_all(seek.events)
            self._post_frame(force=True, reset=True)
        else:
            self.view.apply_all(seek.events)
            self._post_frame(force=True)
