"""The dashboard's pure parts: change tracking, O(1) aggregates, replay timing, labels, files."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from looptree.app.files import DiffCache, parent_commit, tail_lines
from looptree.app.labels import budget_text, header_text, label_key, node_label
from looptree.app.model import RunView, fmt_duration, fmt_num, format_event, improvement, run_status
from looptree.app.replay import GAP_CAP_S, ReplayCursor, parse_seek
from looptree.app.synthetic import COLUMNS, T0, demo_run, stream_events
from looptree.app.widgets.detail import verdict_line
from looptree.app.widgets.gpu import gpu_cells
from looptree.app.widgets.metric_plot import step_line
from looptree.engine.core.state import RunState


def folded(events) -> RunView:
    view = RunView()
    view.apply_all(events)
    return view


# -- RunView ---------------------------------------------------------------------------------
def test_view_counts_running_and_best_match_a_full_refold() -> None:
    events = list(itertools.islice(stream_events(400, seed=3), 6000))
    view = RunView()
    for i, event in enumerate(events):
        view.apply(event)
        if i % 500 == 0 or i == len(events) - 1:
            state = RunState.from_events(events[: i + 1])
            counts = {k: v for k, v in view.counts.items() if v}
            assert counts == state.counts()
            assert view.running == {n.id for n in state.nodes.values() if n.status in ("generating", "generated", "evaluating")}
            best = state.best()
            assert view.best_id == (best.id if best else None)


def test_take_changes_reports_new_and_dirty_nodes_once() -> None:
    view = folded(demo_run())
    first = view.take_changes()
    assert first.new_nodes[:3] == ["5", "5.1", "5.2"]
    assert "5.3.1" in first.dirty_nodes and first.gpu_changed and first.rows_changed
    assert first.rows_node == "5.3.2"
    again = view.take_changes()
    assert not again.any and again.new_nodes == [] and again.log_lines == []
    view.apply({"seq": 900, "ts": T0 + 999, "type": "node_pinned", "id": "5.2"})
    third = view.take_changes()
    assert third.dirty_nodes == {"5.2"} and third.new_nodes == []
    assert [text for text, _ in third.log_lines] == ["+16:39 5.2 pinned"]


def test_prune_marks_the_whole_subtree_dirty() -> None:
    view = folded(demo_run())
    view.take_changes()
    view.apply({"seq": 900, "ts": T0 + 999, "type": "node_pruned", "id": "5.3"})
    assert view.take_changes().dirty_nodes == {"5.3", "5.3.1", "5.3.2"}
    assert view.state.nodes["5.3.2"].pruned


def test_best_changes_mark_old_and_new_best_dirty() -> None:
    view = folded(demo_run())
    assert view.best_id == "5.3.1"
    view.take_changes()
    view.apply({"seq": 900, "ts": T0 + 999, "type": "node_evaluated", "id": "5.3.2", "iteration": 9,
                "metrics": {COLUMNS[0]: 6.0, COLUMNS[1]: 166.0}, "columns": COLUMNS})
    changes = view.take_changes()
    assert view.best_id == "5.3.2"
    assert {"5.3.1", "5.3.2"} <= changes.dirty_nodes and changes.series_changed


def test_view_survives_malformed_events() -> None:
    view = folded(demo_run())
    view.apply({"seq": 1, "ts": T0, "type": "node_evaluated"})  # no id: the fold raises KeyError
    view.apply({"seq": 2, "ts": T0, "type": "edits_applied", "id": "9.9"})
    assert view.best_id == "5.3.1"


def test_device_node_follows_stage_and_terminal_status() -> None:
    view = folded(demo_run(gpus=2))
    assert view.device_node == {1: "5.3.2"}
    view.apply({"seq": 900, "ts": T0 + 999, "type": "node_failed", "id": "5.3.2", "stage": "bench", "reason": "x"})
    assert view.device_node == {}


def test_requests_per_minute_counts_recent_llm_calls() -> None:
    view = RunView()
    for i, ts in enumerate([T0, T0 + 10, T0 + 50, T0 + 100]):
        view.apply({"seq": i, "ts": ts, "type": "tokens_spent", "total_tokens": 10})
    assert view.requests_per_minute(T0 + 60) == 3
    assert view.requests_per_minute(T0 + 101) == 2


def test_plot_points_best_so_far_and_thinning() -> None:
    view = RunView()
    view.apply({"seq": 0, "ts": T0, "type": "run_started", "run": 1, "project": "/p", "config": {}})
    values = [10.0, 9.0, 11.0, 8.0] + [12.0] * 1000
    for i, value in enumerate(values):
        node_id = f"1.{i + 1}"
        view.apply({"seq": 2 * i + 1, "ts": T0, "type": "node_created", "id": node_id, "parent": None, "phase": 1, "kind": "idea"})
        view.apply({"seq": 2 * i + 2, "ts": T0, "type": "node_evaluated", "id": node_id, "iteration": i + 1,
                    "metrics": {COLUMNS[0]: value, COLUMNS[1]: 1.0}, "columns": COLUMNS})
    xs, ys, best = view.plot_points(limit=600)
    assert len(xs) <= 601 and xs[0] == 1 and xs[-1] == len(values)
    assert best[0] == 10.0 and min(best) == 8.0 and best[-1] == 8.0  # lower is better
    assert step_line([1, 2, 3], [10.0, 9.0, 9.0]) == ([1, 2, 2, 3], [10.0, 10.0, 9.0, 9.0])


# -- formatting ------------------------------------------------------------------------------
@pytest.mark.parametrize("value,text", [(None, "NA"), (0, "0"), (7.5, "7.5"), (12.3456, "12.35"), (2_000_000, "2.00M")])
def test_fmt_num(value, text) -> None:
    assert fmt_num(value) == text


def test_fmt_duration_and_improvement() -> None:
    assert fmt_duration(65) == "01:05" and fmt_duration(3 * 3600 + 5) == "03:00:05"
    assert fmt_duration(None) == "--:--"
    assert improvement(7.5, 12.0, higher_is_better=False) == pytest.approx(1.6)
    assert improvement(200.0, 100.0, higher_is_better=True) == pytest.approx(2.0)
    assert improvement(1.0, None, higher_is_better=True) is None


def test_run_status_words() -> None:
    state = RunState.from_events(demo_run())
    assert run_status(state, engine_alive=True) == ("running", "running")
    assert run_status(state, engine_alive=False)[1] == "stalled"
    state.paused = True
    assert run_status(state, engine_alive=True) == ("paused", "paused")
    finished = RunState.from_events(demo_run(finished=True))
    assert run_status(finished, engine_alive=False) == ("finished: phases done", "finished")


def test_format_event_lines() -> None:
    failed = {"type": "node_failed", "ts": T0 + 61, "id": "5.2", "stage": "build", "reason": "exit 1"}
    assert format_event(failed, T0) == ("+01:01 5.2 FAILED at build: exit 1", "error")
    assert format_event({"type": "node_pinned", "ts": T0, "id": "5.1"}, T0) == ("+00:00 5.1 pinned", "control")
    # An event this version does not know is said, not dropped.
    assert format_event({"type": "no_such_event", "ts": T0}, T0) == (
        "+00:00 unknown event 'no_such_event' (written by another looptree version?)", "error")
    assert format_event({"type": "gpu_sample", "ts": T0, "device": 0, "fields": {}}, T0) is None


def test_the_dashboard_and_the_headless_printer_say_the_same_words() -> None:
    from looptree.engine.run.printer import format_event as headless

    state = RunState()
    for event in demo_run(finished=True):
        state.apply(event)
        shown = format_event(event, T0, state)
        printed = headless(event, state)
        assert (shown is None) == (printed is None), event["type"]
        if shown is not None and printed is not None:
            words = printed.split("\n", 1)[0].strip()  # the node column, then the words
            if event.get("id") and words.startswith(str(event["id"])):
                words = words[len(str(event["id"])):].strip()
            assert shown[0].endswith(words), (shown, printed)


def test_node_label_marks_and_key() -> None:
    view = folded(demo_run())
    nodes = view.state.nodes
    best = node_label(view, nodes["5.3.1"], None).plain
    assert best.startswith("✔ 5.3.1  7.5") and "★ best" in best
    assert "⚑" in node_label(view, nodes["5.1"], None).plain
    assert "✂" in node_label(view, nodes["5.4.1"], None).plain
    assert node_label(view, nodes["5.2"], None).plain == "✘ 5.2  build"
    running = nodes["5.3.2"]
    assert label_key(view, running, 1) != label_key(view, running, 2)  # spinner frames differ
    assert label_key(view, nodes["5.3.1"], 1) == label_key(view, nodes["5.3.1"], 2)  # idle nodes do not


def test_verdict_marks_and_line() -> None:
    view = folded(demo_run())
    nodes = view.state.nodes
    assert node_label(view, nodes["5.3.1"], None).plain.startswith("✔ 5.3.1  7.5↑")
    assert node_label(view, nodes["5.4"], None).plain.startswith("✔ 5.4  11.8≈")
    assert verdict_line(nodes["5.3.1"].verdict) == (
        "better vs 5.3: ratio 0.833 · 90.4% CI [0.810, 0.850] · p=0.004 · n=6/6 · A/A noise ±1.0%")
    assert verdict_line({"label": "worse"}) == "worse"
    # A verdict written before the level was recorded says only "CI", never a level it did not have.
    assert verdict_line({"label": "better", "ratio": 0.9, "ci_low": 0.8, "ci_high": 0.95}) == (
        "better: ratio 0.900 · CI [0.800, 0.950]")


def test_best_follows_credited_metrics() -> None:
    """A faster mean that the verdict did not call better is credited with its reference's numbers."""
    events = demo_run()
    view = folded(events)
    seq, ts = len(events), events[-1]["ts"] + 1
    view.apply({"seq": seq, "ts": ts, "type": "node_evaluated", "id": "5.3.2", "iteration": 8,
                "metrics": {COLUMNS[0]: 7.0, COLUMNS[1]: 142.0}, "columns": COLUMNS,
                "verdict": {"label": "no significant change", "against": "5.3"}})
    assert view.best_id == RunState.from_events(events).best().id == "5.3.1"
    view.apply({"seq": seq + 1, "ts": ts, "type": "node_created", "id": "5.3.3", "parent": "5.3", "phase": 1, "kind": "improve"})
    view.apply({"seq": seq + 2, "ts": ts, "type": "node_evaluated", "id": "5.3.3", "iteration": 9,
                "metrics": {COLUMNS[0]: 7.2, COLUMNS[1]: 139.0}, "columns": COLUMNS,
                "verdict": {"label": "better", "against": "5.3"}})
    assert view.best_id == "5.3.3"


def test_header_shows_state_counts_best_and_ratio() -> None:
    view = folded(demo_run())
    text = header_text(view, now=T0 + 100, engine_alive=True).plain
    assert "run 5 · demo-project · running · 01:40" in text
    assert "6 done · 2 failed · 2 running" in text
    assert "best 5.3.1 runtime_ms 7.5 (1.60× vs baseline)" in text
    narrow = header_text(view, now=T0 + 100, engine_alive=True, width=80).plain
    assert all(len(line) <= 80 for line in narrow.splitlines())


def test_budget_gauges() -> None:
    view = folded(demo_run())
    text = budget_text(view, now=T0 + 100).plain
    assert "30.4k / 2.00M" in text and "$0.0336 / $5.00" in text and "LLM calls     8" in text


def test_gpu_cells_use_na_for_missing_fields() -> None:
    cells = gpu_cells(0, {"util": None, "mem_used": 1.0, "mem_total": None, "throttle": None}, None)
    assert cells["util"] == "NA" and cells["mem"] == "1/NA" and cells["throttle"] == "NA" and cells["node"] == "idle"


# -- replay timing ---------------------------------------------------------------------------
def events_at(times: list[float]) -> list[dict]:
    return [{"seq": i, "ts": t, "type": "message", "text": str(i)} for i, t in enumerate(times)]


def test_replay_uses_gaps_divided_by_speed() -> None:
    cursor = ReplayCursor(events_at([0.0, 1.0, 2.0, 3.0]), speed=2.0)
    assert len(cursor.advance(0.0)) == 1  # the first event is due at once
    assert cursor.advance(0.4) == []
    assert len(cursor.advance(0.1)) == 1  # 1 s gap at ×2 = 0.5 s
    assert len(cursor.advance(1.0)) == 2
    assert cursor.at_end and not cursor.playing


def test_replay_caps_long_idle_gaps() -> None:
    cursor = ReplayCursor(events_at([0.0, 3600.0]), speed=1.0)
    cursor.advance(0.0)
    assert cursor.advance(GAP_CAP_S - 0.1) == []
    assert len(cursor.advance(0.2)) == 1


def test_replay_seek_forward_and_backward() -> None:
    cursor = ReplayCursor(events_at([float(i) for i in range(10)]), playing=False)
    forward = cursor.seek(4)
    assert not forward.refold and len(forward.events) == 4 and cursor.position == 4
    back = cursor.seek(2)
    assert back.refold and len(back.events) == 2 and cursor.position == 2
    assert cursor.seek_percent(100).events and cursor.at_end
    assert cursor.step() == []
    cursor.seek(0)
    assert cursor.step()[0]["seq"] == 0 and cursor.position == 1


def test_replay_speed_is_clamped() -> None:
    cursor = ReplayCursor([], speed=1.0)
    for _ in range(20):
        cursor.change_speed(2.0)
    assert cursor.speed == 256.0
    for _ in range(20):
        cursor.change_speed(0.5)
    assert cursor.speed == 0.25


def test_parse_seek() -> None:
    assert parse_seek("50%", 200) == 100
    assert parse_seek(" 17 ", 200) == 17
    for bad in ("", "abc", "150%", "201", "-1"):
        with pytest.raises(ValueError):
            parse_seek(bad, 200)


# -- files -----------------------------------------------------------------------------------
def test_tail_lines_reads_only_the_end(tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail_lines(log, 3) == ["line 99997", "line 99998", "line 99999"]
    assert tail_lines(tmp_path / "missing.log") is None


def test_parent_commit_falls_back_to_base_commit() -> None:
    state = RunState.from_events(demo_run())
    assert parent_commit(state, state.nodes["5"]) is None
    assert parent_commit(state, state.nodes["5.3.1"]) == state.nodes["5.3"].commit
    state.nodes["5"].commit = None
    assert parent_commit(state, state.nodes["5.1"]) == state.base_commit


def test_diff_cache_falls_back_to_saved_patch_and_caches(tmp_path: Path) -> None:
    patch = tmp_path / "diff.patch"
    patch.write_text("--- a/x\n+++ b/x\n+new\n")
    cache = DiffCache()
    text = asyncio.run(cache.get(str(tmp_path / "nope"), "a" * 40, "b" * 40, fallback=patch))
    assert text.endswith("+new\n")
    assert cache.cached(str(tmp_path / "nope"), "a" * 40, "b" * 40) == text
    missing = asyncio.run(DiffCache().get(str(tmp_path / "nope"), "a", "b"))
    assert missing.startswith("! diff unavailable: project directory")
