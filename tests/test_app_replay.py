"""Replay mode: play/pause, step, seek (keys and modal), speed, hidden control keys, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.dash_pilot import control, make_run, ready, replay_app, select
from textual.widgets import Static

from looptree.app.screens import PromptScreen


async def test_replay_step_and_play_pause(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, finished=True)
    async with replay_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        cursor = pilot.app.cursor
        assert cursor.position == 0 and not cursor.playing
        await pilot.press("full_stop", "n", "n")  # run_started, gpu_status, node_created 5
        assert cursor.position == 3
        assert pilot.app.view.state.run == 5 and "5" in pilot.app.run_tree.by_id
        await pilot.press("space")
        assert cursor.playing
        await pilot.press("space")
        assert not cursor.playing


async def test_replay_plays_with_scaled_time(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, finished=True)
    async with replay_app(run_dir, speed=256.0, autoplay=True).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        for _ in range(100):
            await pilot.pause(0.05)
            if pilot.app.cursor.position > 20:
                break
        assert pilot.app.cursor.position > 20  # gaps of 0.5 s at ×256 play quickly


@pytest.mark.slow  # eleven seeks, two through the modal: ~3 s
async def test_replay_seek_keys_and_refold_backwards(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, finished=True)
    async with replay_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        app = pilot.app
        total = app.cursor.total
        await pilot.press("end")
        assert app.cursor.position == total and app.view.state.finished == "phases done"
        await pilot.press("home")
        assert app.cursor.position == 0 and app.view.state.run is None and app.run_tree.by_id == {}
        await pilot.press("right_square_bracket", "right_square_bracket", "right_square_bracket")
        assert app.cursor.position == round(total * 0.1) * 3
        nodes_forward = len(app.view.state.nodes)
        await pilot.press("left_square_bracket")  # backwards: re-fold from the start
        assert app.cursor.position == round(total * 0.1) * 2
        assert len(app.view.state.nodes) <= nodes_forward
        assert set(app.run_tree.by_id) == set(app.view.state.nodes)
        await pilot.press("g")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"50%", "enter")
        await pilot.pause()
        assert app.cursor.position == round(total * 0.5)
        await pilot.press("g", *"12", "enter")
        await pilot.pause()
        assert app.cursor.position == 12
        assert "replay 12/" in str(app.query_one("#header", Static).render())


async def test_replay_speed_keys(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, finished=True)
    async with replay_app(run_dir, speed=2.0).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("greater_than_sign")
        assert pilot.app.cursor.speed == 4.0
        await pilot.press("less_than_sign", "less_than_sign")
        assert pilot.app.cursor.speed == 1.0
        assert "×1" in str(pilot.app.query_one("#header", Static).render())


async def test_replay_hides_control_keys_and_q_quits(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, finished=True)
    app = replay_app(run_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("end")
        await select(pilot, "5.3")
        assert app.check_action("prune", ()) is False  # hidden, not just greyed
        await pilot.press("p", "P", "k", "S", "+")
        assert control(run_dir) == []
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


async def test_replay_of_damaged_log_exits_with_the_reason(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "5"
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text('{"seq":0,"ts":1,"type":"run_started"}\nnot json\n{"seq":2,"ts":2,"type":"x"}\n')
    app = replay_app(run_dir)
    async with app.run_test(size=(80, 24)) as pilot:
        for _ in range(50):
            await pilot.pause(0.02)
            if app.error:
                break
    assert app.return_code == 2
    assert "line 2 is not valid JSON" in (app.error or "")
