"""The experiment view: what `looptree attach DIR` shows when DIR is a `looptree ab` out directory.

Why a separate App: an experiment's log speaks its own vocabulary (`experiment_started`,
`arm_started`, `pair_finished`, …), not a run's, so the run dashboard's state fold has nothing to
show for it. This view folds those events into a table of pairs, the two sequential tests against
their bounds, per-arm totals and the verdict. It only reads the out directory (the `ab` process
stays headless and writes it), tailing `events.jsonl` at 2 Hz with the dashboard's feed
(`feed.looks`, polling: benchmarks/README.md has why not inotify) in an async worker.

The log is treated as untrusted input: an event with a missing or odd field is skipped and
counted, never a crash.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Static

from looptree import styles
from looptree.app.feed import looks
from looptree.engine.core.events import EVENTS_NAME, EventTail

CSS_FILE = Path(styles.__file__).parent / "experiment.tcss"
ARMS = ("control", "test")
POLL_HZ = 2.0


def _num(value: Any, default: float = 0.0) -> float:
    """A finite float from an untrusted field, else `default`."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return default


@dataclass
class ArmTotals:
    """One arm's spend and successes over the finished pairs."""

    runs: int = 0
    successes: int = 0
    tokens: int = 0
    dollars: float = 0.0
    gpu_hours: float = 0.0

    def add(self, result: dict[str, Any]) -> None:
        self.runs += 1
        self.successes += bool(result.get("success"))
        self.tokens += int(_num(result.get("tokens")))
        self.dollars += _num(result.get("cost_usd"))
        self.gpu_hours += _num(result.get("gpu_hours"))


@dataclass
class ExperimentModel:
    """Pure fold over an experiment's events: what the view shows, no Textual in it."""

    started: dict[str, Any] | None = None
    resumes: int = 0
    pairs: dict[int, dict[str, Any]] = field(default_factory=dict)
    running: dict[str, str] = field(default_factory=dict)  # arm -> task now running
    statistics: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None
    skipped: int = 0

    def apply(self, event: Any) -> int | None:
        """Fold one event; return the pair index when a new pair finished (the table adds a row)."""
        if not isinstance(event, dict):
            self.skipped += 1
            return None
        kind = event.get("type")
        try:
            if kind == "experiment_started":
                self.started = event
            elif kind == "experiment_resumed":
                self.resumes += 1
            elif kind == "arm_started":
                self.running[str(event["arm"])] = str(event["task"])
            elif kind == "arm_finished":
                self.running.pop(str(event["arm"]), None)
            elif kind == "pair_finished":
                index = int(event["pair"])
                if not all(isinstance(event.get(arm), dict) for arm in ARMS):
                    raise ValueError("pair_finished without both arms")
                stats = event.get("statistics")
                if isinstance(stats, dict):
                    self.statistics = stats
                new = index not in self.pairs
                self.pairs[index] = event
                return index if new else None
            elif kind == "experiment_finished":
                self.finished = event
                self.running.clear()
        except (KeyError, TypeError, ValueError):
            self.skipped += 1
        return None

    def totals(self) -> dict[str, ArmTotals]:
        out = {arm: ArmTotals() for arm in ARMS}
        for event in self.pairs.values():
            for arm in ARMS:
                out[arm].add(event[arm])
        return out


# -- text of each part ---------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "+.3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _arm_cell(result: dict[str, Any]) -> str:
    mark = "✓" if result.get("success") else "✗"
    ratio = result.get("ratio")
    text = f"{mark} {_fmt(ratio, '.3f')}x" if isinstance(ratio, (int, float)) else f"{mark} —"
    return text + (" (error)" if result.get("error") else "")


def pair_row(event: dict[str, Any]) -> tuple[str, ...]:
    """The table row of one `pair_finished`: pair, task, first arm, both arms, tokens, dollars."""
    control, test = event["control"], event["test"]
    return (str(event["pair"]), str(event.get("task", "?")), str(event.get("first", "?")),
            _arm_cell(control), _arm_cell(test),
            f"{int(_num(control.get('tokens'))):,} / {int(_num(test.get('tokens'))):,}",
            f"${_num(control.get('cost_usd')):.2f} / ${_num(test.get('cost_usd')):.2f}")


def statistics_text(stats: dict[str, Any] | None) -> str:
    """Two lines: the success SPRT's log-likelihood ratios against its bounds, the mixture's evidence."""
    if not stats:
        return "success SPRT: no pair yet\nmixture SPRT: no pair yet"
    s: dict[str, Any] = stats["success"] if isinstance(stats.get("success"), dict) else {}
    m: dict[str, Any] = stats["speedup"] if isinstance(stats.get("speedup"), dict) else {}
    success = (f"success SPRT  LLR test {_fmt(s.get('llr_test'))}  LLR control {_fmt(s.get('llr_control'))}"
               f"  bounds [lower {_fmt(s.get('lower'))}, upper {_fmt(s.get('upper'))}]"
               f"  discordant wins test {s.get('wins_test', 0)} · control {s.get('wins_control', 0)}")
    mixture = (f"mixture SPRT  evidence {_fmt(m.get('evidence'), '.3g')} / threshold {_fmt(m.get('threshold'), '.3g')}"
               f"  ratio CS [{_fmt(m.get('cs_ratio_low'), '.3f')}, {_fmt(m.get('cs_ratio_high'), '.3f')}]"
               f"  pairs {m.get('pairs', 0)}")
    decision = stats.get("decision")
    if decision:
        mixture += f"  → decided: {decision} (by the {stats.get('decided_by', '?')} test)"
    return f"{success}\n{mixture}"


def totals_text(totals: dict[str, ArmTotals]) -> str:
    lines = []
    for arm in ARMS:
        t = totals[arm]
        lines.append(f"{arm:<8} runs {t.runs}  successes {t.successes}  tokens {t.tokens:,}  "
                     f"${t.dollars:.2f}  GPU-hours {t.gpu_hours:.3f}")
    return "\n".join(lines)


def verdict_text(model: ExperimentModel, out_dir: Path) -> str:
    """The verdict once `experiment_finished` arrives; the running arms before."""
    if model.finished is None:
        if model.running:
            return "running: " + ", ".join(f"{arm} on {task}" for arm, task in sorted(model.running.items()))
        return "waiting for the next arm…"
    e = model.finished
    text = f"VERDICT: {e.get('verdict', '?')} after {e.get('pairs', '?')} pair(s) — {e.get('reason', '')}"
    try:
        verdict = json.loads((out_dir / "verdict.json").read_text())
        if isinstance(verdict, dict) and verdict.get("stopped_early"):
            text += " (stopped early)"
    except (OSError, ValueError):
        pass
    return text


# -- the App -------------------------------------------------------------------------------------
class ExperimentApp(App[int]):
    """Live view of an A/B experiment directory; `q` quits (the experiment goes on)."""

    CSS_PATH = CSS_FILE
    TITLE = "looptree ab"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("q", "quit", "quit")]
    COLUMNS = ("pair", "task", "first", "control", "test", "tokens c/t", "cost c/t")

    def __init__(self, out_dir: Path | str, *, poll_hz: float = POLL_HZ) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.poll_hz = poll_hz
        self.model = ExperimentModel()
        self.error: str | None = None
        self._tail = EventTail(self.out_dir / EVENTS_NAME)

    def compose(self) -> ComposeResult:
        yield Static(id="exp-title")
        yield Static(id="exp-stats")
        yield DataTable(id="exp-pairs", zebra_stripes=True, cursor_type="row")
        yield Static(id="exp-totals")
        yield Static(id="exp-verdict")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*self.COLUMNS)
        self.fold_events(self._tail.poll())  # the log so far, before the first paint
        self._follow()

    @work(exclusive=True, group="feed", name="tail")
    async def _follow(self) -> None:
        """Fold each look's new lines of events.jsonl, as long as the view runs."""
        async for events in looks(self._tail.poll, 1.0 / self.poll_hz):
            self.fold_events(events)

    def fold_events(self, events: list[dict[str, Any]]) -> None:
        """Fold new events and redraw what they changed."""
        if not events and self.model.started is not None:
            return
        table = self.query_one(DataTable)
        for event in events:
            index = self.model.apply(event)
            if index is None:
                continue
            try:
                row = pair_row(self.model.pairs[index])
            except (KeyError, TypeError, ValueError):
                self.model.skipped += 1
                continue
            table.add_row(*(Text(cell) for cell in row), key=str(index))  # plain text: task names are not markup
        self._redraw()

    def _redraw(self) -> None:
        started = self.model.started or {}
        title = (f"A/B experiment {self.out_dir}  control {started.get('control', '?')}  test {started.get('test', '?')}"
                 f"  pairs {len(self.model.pairs)}/{started.get('max_pairs', '?')}")
        if self.model.resumes:
            title += f"  (resumed {self.model.resumes}x)"
        if self.model.skipped:
            title += f"  ({self.model.skipped} unreadable event(s) skipped)"
        self.query_one("#exp-title", Static).update(Text(title))
        self.query_one("#exp-stats", Static).update(Text(statistics_text(self.model.statistics)))
        self.query_one("#exp-totals", Static).update(Text(totals_text(self.model.totals())))
        self.query_one("#exp-verdict", Static).update(Text(verdict_text(self.model, self.out_dir)))


def run_experiment_view(out_dir: Path) -> int:
    """Show the experiment view until `q`; return an exit code."""
    app = ExperimentApp(out_dir)
    app.run()
    if app.model.finished is None:
        print(f"looptree: experiment view closed; the experiment goes on. Reattach with: looptree attach {out_dir}",
              file=sys.stderr)
    return app.return_code or 0
