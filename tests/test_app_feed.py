"""The feed and its frames: what reads the run, and how `RunChanged` reaches the widgets.

A widget the App has never heard of (`FrameProbe`, a fake panel made for these tests) is mounted
into a running dashboard: it must get every frame through the App's signal, at most
`refresh_hz` frames a second however fast the log grows, and a widget that raises must stop the
dashboard loudly rather than be dropped in silence.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from fixtures.dash_pilot import FROZEN, live_app, make_run, ready, replay_app
from textual.widgets import Static

from looptree.app.feed import RunSource
from looptree.app.messages import RunChanged
from looptree.app.synthetic import COLUMNS, write_events
from looptree.app.widgets.base import RunWidget


class FrameProbe(RunWidget, Static):
    """A fake panel: records (time, events in the batch, force, tick) of every frame it is handed."""

    def __init__(self) -> None:
        super().__init__("")
        self.frames: list[tuple[float, int, bool, bool]] = []
        self.messages: list[RunChanged] = []

    def draw(self, frame: RunChanged) -> None:
        self.frames.append((time.monotonic(), frame.changes.events, frame.force, frame.tick))
        self.messages.append(frame)

    @property
    def events(self) -> int:
        return sum(events for _, events, _, _ in self.frames)


class BrokenPanel(RunWidget, Static):
    """A fake panel with a bug: it raises on the first frame that carries events."""

    def draw(self, frame: RunChanged) -> None:
        if frame.changes.events:
            raise RuntimeError("the broken panel broke")


def rows(start: int, count: int) -> list[dict]:
    """Metric rows of 5.3.2 (the fixture's node mid-benchmark), numbered from `start`."""
    return [{"seq": 1000 + start + i, "ts": FROZEN, "type": "metric_row", "id": "5.3.2", "repeat": 1,
             "iteration": start + i, "values": {COLUMNS[0]: 8.0, COLUMNS[1]: 120.0}, "columns": COLUMNS}
            for i in range(count)]


async def test_a_widget_the_app_does_not_name_gets_every_frame(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    app = live_app(run_dir)
    async with app.run_test(size=(160, 50)) as pilot:
        await ready(pilot)
        probe = FrameProbe()
        await app.screen.mount(probe)
        write_events(run_dir / "events.jsonl", [
            {"seq": 500, "ts": FROZEN, "type": "node_created", "id": "5.3.3", "parent": "5.3", "phase": 1,
             "kind": "improve"}])
        for _ in range(60):
            await pilot.pause(0.05)
            if probe.events:
                break
        assert probe.events == 1
        assert "5.3.3" in app.run_tree.by_id  # the App's own widgets drew the same frame


async def test_a_flood_is_drawn_at_most_refresh_hz_frames_a_second(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    app = live_app(run_dir, refresh_hz=10)
    async with app.run_test(size=(160, 50)) as pilot:
        await ready(pilot)
        probe = FrameProbe()
        await app.screen.mount(probe)
        written, start = 0, time.monotonic()
        while time.monotonic() - start < 1.5:  # ~400 events/s in 20 ms batches
            write_events(run_dir / "events.jsonl", rows(written, 8))
            written += 8
            await pilot.pause(0.02)
        for _ in range(60):
            await pilot.pause(0.05)
            if probe.events >= written:
                break
        frames = [at for at, events, _, _ in probe.frames if events]
        assert probe.events == written  # nothing lost
        assert app.view.events_applied >= written
        gaps = [b - a for a, b in zip(frames, frames[1:])]
        assert len(frames) <= (frames[-1] - frames[0]) * 10 + 1, len(frames)
        assert min(gaps) >= 0.08, gaps  # one look per 0.1 s, at most one frame per look


async def test_a_widget_that_raises_stops_the_dashboard_loudly(tmp_path: Path) -> None:
    """Textual's signal logs and drops a subscriber's exception; the dashboard must not."""
    run_dir = make_run(tmp_path)
    app = live_app(run_dir)
    with pytest.raises(RuntimeError, match="the broken panel broke"):
        async with app.run_test(size=(160, 50)) as pilot:
            await ready(pilot)
            await app.screen.mount(BrokenPanel(""))
            write_events(run_dir / "events.jsonl", rows(0, 1))
            for _ in range(40):
                await pilot.pause(0.05)
                if not app.is_running:
                    break


async def test_a_log_that_becomes_unreadable_ends_the_dashboard_with_one_line(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    app = live_app(run_dir)
    async with app.run_test(size=(160, 50)) as pilot:
        await ready(pilot)
        events = run_dir / "events.jsonl"
        events.unlink()
        events.mkdir()  # open() now fails with IsADirectoryError on the next look
        for _ in range(40):
            await pilot.pause(0.05)
            if app.error:
                break
    shutil.rmtree(events)
    assert app.return_code == 2
    assert app.error is not None and app.error.startswith("could not follow the run: IsADirectoryError")
    assert "\n" not in app.error


def test_run_source_starts_telemetry_at_its_end_and_reads_only_complete_lines(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, gpus=1)
    telemetry = run_dir / "telemetry.jsonl"
    old = [{"ts": FROZEN + i, "type": "gpu_sample", "device": 0, "fields": {"util": i}} for i in range(3)]
    write_events(telemetry, old)
    source = RunSource(run_dir)
    loaded = source.load()
    assert [e for e in loaded if e["type"] == "gpu_sample"][-3:] == old  # the newest samples, once
    assert source.poll() == []
    with open(run_dir / "events.jsonl", "a") as fh:
        fh.write(json.dumps(rows(0, 1)[0]) + "\n" + '{"seq": 2000, "type": "metr')  # a torn tail
    write_events(telemetry, [{"ts": FROZEN + 9, "type": "gpu_sample", "device": 0, "fields": {"util": 9}}])
    polled = source.poll()
    assert [e["type"] for e in polled] == ["metric_row", "gpu_sample"]  # events first, then samples
    assert polled[1]["fields"] == {"util": 9}
    with open(run_dir / "events.jsonl", "a") as fh:
        fh.write('ic_row"}\n')
    assert [e.get("seq") for e in source.poll()] == [2000]  # the torn line, once complete


async def test_replay_step_and_backwards_seek_send_their_frames(tmp_path: Path) -> None:
    """A step is one forced frame with one event; a backwards seek one reset frame of the new fold."""
    run_dir = make_run(tmp_path, finished=True)
    app = replay_app(run_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        probe = FrameProbe()
        await app.screen.mount(probe)
        await pilot.press("right_square_bracket", "right_square_bracket")
        await pilot.pause()
        old_view = app.view
        probe.messages.clear()
        await pilot.press("n")  # step
        await pilot.pause()
        assert [(m.changes.events, m.force, m.reset) for m in probe.messages if not m.tick] == [(1, True, False)]
        probe.messages.clear()
        await pilot.press("left_square_bracket")  # backwards: the view is folded again from the start
        await pilot.pause()
        frames = [m for m in probe.messages if not m.tick]
        assert [(m.force, m.reset) for m in frames] == [(True, True)]
        assert frames[0].view is app.view and app.view is not old_view
        assert frames[0].changes.new_nodes == app.view.state.order  # every node of the new fold, once
        assert set(app.run_tree.by_id) == set(app.view.state.nodes)
