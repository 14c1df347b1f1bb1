"""The looptree dashboard: a Textual viewer of `runs/<N>/events.jsonl` that writes `control.jsonl`.

Why it is only a viewer: the engine may run for hours under nohup on another machine's SSH
session; the dashboard folds the same event log every other reader folds and sends commands
through the same file `looptree ctl` uses, so it can be closed, killed or reattached at any
time without the run noticing.

How it keeps up (200 events/s at 10k nodes on a 2-core box): events are read and folded as
they come (`RunView.apply`, O(1)), but the screen is updated at most `refresh_hz` (10) times a
second, inside one `batch_update()`, touching only the nodes and panels that changed. Spinners,
the clock and the engine-lock check run on their own slow timers, and none of them run when the
time is frozen (snapshot tests).
"""

from __future__ import annotations

import gc
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.text import Text
from textual import constants, on
from textual.app import App, ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import RichLog, Static, TabbedContent, TabPane, Tree
from textual.worker import Worker, WorkerState

from looptree import styles
from looptree.app.actions import BINDINGS, DashboardActions
from looptree.app.commands import LooptreeCommands
from looptree.app.files import DiffCache, parent_commit
from looptree.app.labels import budget_text, header_text
from looptree.app.model import RunView, now_or_frozen
from looptree.app.replay import ReplayCursor, Seek
from looptree.app.widgets.detail import DetailPanel, diff_renderable, info_text, logs_renderable
from looptree.app.widgets.footer import LeanFooter
from looptree.app.widgets.panels import GpuPanel, LiveRows, MetricPlot
from looptree.app.widgets.run_tree import RunTree
from looptree.engine.core.events import EVENTS_NAME, TELEMETRY_NAME, EventTail, RunLock, iter_run, last_samples
from looptree.engine.core.state import NodeState
from looptree.engine.errors import LooptreeError

Mode = Literal["live", "replay"]
CSS_FILE = Path(styles.__file__).parent / "dashboard.tcss"
FROZEN_ENV = "LOOPTREE_FROZEN_TIME"

LOG_LIMIT = 500
LOG_STYLES = {"error": "red", "good": "green", "control": "magenta", "sent": "bold magenta", "": ""}


def log_text(lines: list[tuple[str, str]]) -> Text:
    """Many log lines as one Text: one RichLog.write per frame instead of one per event."""
    text = Text(no_wrap=True, overflow="ellipsis")
    for index, (line, style) in enumerate(lines):
        if index:
            text.append("\n")
        text.append(line, style=LOG_STYLES.get(style, ""))
    return text


@dataclass(frozen=True)
class Periods:
    """Seconds between firings of each periodic task (tests shorten them to see every one fire).

    `events` is not here: it follows `refresh_hz`.
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
        self.view = RunView()
        self.cursor: ReplayCursor | None = None
        self.engine_alive: bool | None = None
        self.diffs = DiffCache()
        self.loaded = False
        self.error: str | None = None
        self._tail = EventTail(self.run_dir / EVENTS_NAME)
        self._samples = EventTail(self.run_dir / TELEMETRY_NAME)
        self._selected_id: str | None = None
        self._rows_node: str | None = None
        self._frame = 0
        self._header_key: Any = None
        self._budget_key: Any = None
        self._binding_sig: Any = None
        self._detail_pending = False
        self._footer_pending = False
        self._plot_dirty = True
        self._plot_at = 0.0
        self._gpu_dirty = True
        self._gpu_at = 0.0
        self._logs_at = 0.0
        self._last_tick = time.monotonic()
        self._my_timers: list[Timer] = []
        self.log_buffer: deque[tuple[str, str]] = deque(maxlen=LOG_LIMIT)
        if keymap:
            self.set_keymap(keymap)

    # -- layout --------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Static(Text(" looptree  loading…"), id="header")
        with Horizontal(id="body"):
            with Vertical(id="tree-pane"):
                yield RunTree(id="tree")
            with Vertical(id="right"):
                yield DetailPanel(id="detail")
                with TabbedContent(id="panels", initial="tab-live"):
                    with TabPane("Live", id="tab-live"):
                        yield LiveRows(id="rows")
                    with TabPane("Plot", id="tab-plot"):
                        yield MetricPlot(id="plot")
                    with TabPane("GPU", id="tab-gpu"):
                        yield GpuPanel(id="gpu")
                    with TabPane("Budget", id="tab-budget"):
                        yield Static("", id="budget")
                    with TabPane("Events", id="tab-events"):
                        yield RichLog(id="events", max_lines=LOG_LIMIT, wrap=False, markup=False, highlight=False)
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
        self.run_worker(self._load, thread=True, name="load", group="load", exit_on_error=False)

    # -- loading and ticking -------------------------------------------------------------
    def _load(self) -> None:
        """Thread worker: read (and, live, fold) the whole log so far without blocking the UI."""
        if self.mode == "replay":
            events = list(iter_run(self.run_dir))  # events and GPU samples, in time order
            self.cursor = ReplayCursor(events, speed=self.speed, playing=self.autoplay)
        else:
            self.view.apply_all(self._tail.poll())
            # Only the newest GPU samples matter to a viewer: start from the file's end.
            try:
                self._samples.offset = (self.run_dir / TELEMETRY_NAME).stat().st_size
            except FileNotFoundError:
                self._samples.offset = 0
            self.view.apply_all(last_samples(self.run_dir))
            try:
                self.engine_alive = RunLock.is_held(self.run_dir)
            except OSError:
                self.engine_alive = None

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if worker.group == "load":
            if event.state == WorkerState.SUCCESS:
                self._start()
            elif event.state == WorkerState.ERROR:
                error = worker.error
                self.error = str(error) if isinstance(error, LooptreeError) else f"could not read the run: {error!r}"
                self.exit(2, return_code=2, message=self.error)

    def _start(self) -> None:
        self.loaded = True
        self._redraw(force=True)  # also selects the first node
        if self.freeze_gc:
            gc.freeze()
            self._every(self.periods.gc_freeze, self._freeze_gc, "gc-freeze")
        tick = self._live_tick if self.mode == "live" else self._replay_tick
        self._last_tick = time.monotonic()
        self._every(1.0 / self.refresh_hz, tick, "events")
        if self.frozen_time is None:
            self._every(self.periods.spinner, self._spin, "spinner")
            self._every(self.periods.clock, self._clock, "clock")
        if self.mode == "live":
            self._every(self.periods.engine_lock, self._check_engine, "engine-lock")
        self._refresh_footer()

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

    def _live_tick(self) -> None:
        if not self._alive():
            return
        events = self._tail.poll() + self._samples.poll()
        if events:
            self.view.apply_all(events)
        self._redraw()

    def _replay_tick(self) -> None:
        if not self._alive():
            return
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        cursor = self.cursor
        if cursor is None or not cursor.playing:
            return
        events = cursor.advance(dt)
        if events:
            self.view.apply_all(events)
            self._redraw()
        if not cursor.playing:
            self._update_header()
            self._refresh_footer()
            self.notify("end of the replay", timeout=3)

    def _spin(self) -> None:
        if not self._alive():
            return
        if not self.view.running:
            return
        self._frame += 1
        tree = self.run_tree
        tree.update_labels(self.view, tree.spinner_targets(self.view), self._frame)

    def _clock(self) -> None:
        if not self._alive():
            return
        self._update_header()
        self._update_budget()

    def _check_engine(self) -> None:
        if not self._alive():
            return
        try:
            alive: bool | None = RunLock.is_held(self.run_dir)
        except OSError:
            alive = None  # unreadable lock (permissions, a flaky network filesystem): say nothing
        if alive != self.engine_alive:
            self.engine_alive = alive
            self._update_header()
            self._refresh_footer()

    def _alive(self) -> bool:
        """False while the app shuts down: a timer tick can still arrive after the screens are gone."""
        return self.is_running and not self._exit and bool(self.screen_stack)

    def now(self) -> float:
        """Wall time live (frozen in tests); the current event's time in replay."""
        if self.mode == "replay":
            return self.view.state.last_ts or 0.0
        return now_or_frozen(self.frozen_time)

    # -- drawing -------------------------------------------------------------------------
    def _redraw(self, force: bool = False) -> None:
        """Apply everything that changed since the last flush to the screen, in one batch."""
        changes = self.view.take_changes()
        if not (changes.any or force):
            return
        frame = None if self.frozen_time is not None else self._frame
        view = self.view
        with self.batch_update():
            tree = self.run_tree
            if changes.new_nodes:
                tree.add_nodes(view, changes.new_nodes, frame)
                if self._selected_id is None and tree.select_id(changes.new_nodes[0]):
                    self._select(changes.new_nodes[0])
            tree.update_labels(view, changes.dirty_nodes, frame)
            self._update_header()
            self._update_budget()
            if self._selected_id in changes.dirty_nodes or force:
                self._render_detail()
            if changes.rows_node is not None:
                self._rows_node = changes.rows_node
            if changes.rows_changed or force or self._rows_node in changes.dirty_nodes:
                self._sync_rows()  # also when its node finishes: the title's status and median change
            if changes.gpu_changed:
                self._gpu_dirty = True
            self._maybe_gpu(force)
            if changes.log_lines:
                self._log_lines(changes.log_lines)
            if changes.series_changed:
                self._plot_dirty = True
            self._maybe_plot(force=force)
        self._refresh_footer()

    def _log_lines(self, lines: list[tuple[str, str]]) -> None:
        """Keep the last lines in a bounded deque; write them out only while the Events tab shows.

        A hidden RichLog defers every write in an unbounded queue until it gets a size, which on a
        run watched for hours with the tab never opened would grow without end.
        """
        self.log_buffer.extend(lines)
        if self._active_tab() == "tab-events":
            self.query_one("#events", RichLog).write(log_text(lines[-LOG_LIMIT:]))

    def _active_tab(self) -> str:
        return self.query_one("#panels", TabbedContent).active

    def _update_header(self) -> None:
        replay = None
        cursor = self.cursor
        if cursor is not None:
            replay = (f"{'▶' if cursor.playing else '⏸'} replay {cursor.position}/{cursor.total} "
                      f"({cursor.percent:.0f}%) ×{cursor.speed:g}")
        text = header_text(self.view, now=self.now(), engine_alive=self.engine_alive if self.mode == "live" else None,
                           replay=replay, width=self.size.width)
        key = (text.plain, len(text.spans))
        if key != self._header_key:
            self._header_key = key
            self.query_one("#header", Static).update(text, layout=False)  # fixed height: no relayout

    def _update_budget(self) -> None:
        text = budget_text(self.view, now=self.now())
        key = text.plain
        if key != self._budget_key:
            self._budget_key = key
            self.query_one("#budget", Static).update(text, layout=False)

    def _sync_rows(self) -> None:
        if self._rows_node is not None and self._active_tab() == "tab-live":
            self.query_one("#rows", LiveRows).sync(self.view, self._rows_node)

    def _maybe_gpu(self, force: bool = False) -> None:
        """GPU cells at most twice a second, and only while the GPU tab is shown."""
        if not (self._gpu_dirty or force) or self._active_tab() != "tab-gpu":
            return
        now = time.monotonic()
        if not force and now - self._gpu_at < 0.5:
            return
        self._gpu_at = now
        self._gpu_dirty = False
        self.query_one("#gpu", GpuPanel).sync(self.view)

    def _maybe_plot(self, force: bool = False) -> None:
        if not self._plot_dirty:
            return
        if self._active_tab() != "tab-plot":
            return  # drawn when its tab is shown
        now = time.monotonic()
        if not force and now - self._plot_at < 1.0:
            return
        self._plot_at = now
        self._plot_dirty = False
        self.query_one("#plot", MetricPlot).sync(self.view)

    def on_resize(self) -> None:
        if self.loaded:
            self._update_header()

    @on(TabbedContent.TabActivated)
    def _tab_changed(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "tab-plot":
            self._maybe_plot(force=True)
        elif event.pane.id == "tab-events":
            log = self.query_one("#events", RichLog)
            log.clear()
            if self.log_buffer:
                log.write(log_text(list(self.log_buffer)))
        elif event.pane.id == "tab-live":
            self._sync_rows()
        elif event.pane.id == "tab-gpu":
            self._maybe_gpu(force=True)

    # -- selection and detail ------------------------------------------------------------
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
        self._logs_at = 0.0
        if not self._detail_pending:
            self._detail_pending = True
            self.call_after_refresh(self._show_selection)

    def _show_selection(self) -> None:
        self._detail_pending = False
        self._render_detail()
        self._refresh_footer()

    def _render_detail(self) -> None:
        node = self.selected_node
        detail = self.detail
        if node is None:
            return
        detail.show_info(node.id, info_text(self.view, node))
        self._render_diff(node)
        now = time.monotonic()
        if detail.node_id != node.id or now - self._logs_at >= 1.0 or self._logs_at == 0.0:
            self._logs_at = now
            key, renderable = logs_renderable(self.run_dir / "nodes" / node.id)
            detail.show_logs(key, renderable)

    def _render_diff(self, node: NodeState) -> None:
        detail = self.detail
        state = self.view.state
        old = parent_commit(state, node)
        if node.parent is None:
            detail.show_diff(("none", node.id), Text("baseline: the project as it was when the run started", style="grey50"))
            return
        if not node.commit or not old:
            why = f"failed at {node.failure_stage}" if node.status == "failed" else "no commit yet"
            detail.show_diff(("none", node.id, why), Text(f"no diff: {why}", style="grey50"))
            return
        project = state.project or ""
        key = (project, old, node.commit)
        text = self.diffs.cached(project, old, node.commit)
        if text is not None:
            detail.show_diff(key, diff_renderable(text))
            return
        detail.show_diff(("loading",) + key, Text("loading diff…", style="grey50"))
        fallback = self.run_dir / "nodes" / node.id / "diff.patch"
        self.run_worker(self._diff_worker(node.id, project, old, node.commit, fallback),
                        group="diff", exclusive=True, exit_on_error=False)

    async def _diff_worker(self, node_id: str, project: str, old: str, new: str, fallback: Path) -> None:
        text = await self.diffs.get(project, old, new, fallback)
        if self._selected_id == node_id:
            self.detail.show_diff((project, old, new), diff_renderable(text))

    def _apply_seek(self, seek: Seek) -> None:
        self._last_tick = time.monotonic()
        if seek.refold:
            if self.freeze_gc:
                gc.unfreeze()  # the old tree is cyclic garbage now: let it be collected
            self.view = RunView()
            self.view.apply_all(seek.events)
            selected = self._selected_id
            frame = None if self.frozen_time is not None else self._frame
            with self.batch_update():
                self.run_tree.rebuild(self.view, frame)
                self.query_one("#events", RichLog).clear()
                self.log_buffer.clear()
                self.query_one("#gpu", GpuPanel).reset()
                self.query_one("#rows", LiveRows).reset()
                self._rows_node = next((n for n in reversed(self.view.state.order)
                                        if self.view.state.nodes[n].rows), None)
                self._plot_dirty = True
                self._redraw(force=True)
                target = selected if selected in self.view.state.nodes else (
                    self.view.state.order[0] if self.view.state.order else None)
                if target is not None and self.run_tree.select_id(target):
                    self._select(target)
                else:
                    self._selected_id = None
            if self.freeze_gc:
                gc.collect()
                gc.freeze()
        else:
            self.view.apply_all(seek.events)
            self._redraw(force=True)
        self._update_header()
