"""Every dashboard key on a live run, checked by reading control.jsonl back or the screen."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.dash_pilot import FROZEN, control, live_app, make_run, ready, select
from textual.widgets import Input, Static

from looptree.app.screens import ConfirmScreen, HelpScreen, PromptScreen
from looptree.app.synthetic import demo_run, write_events


# -- control commands (live) -----------------------------------------------------------------
async def test_prune_selected_subtree_writes_command(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.3")
        await pilot.press("p")
    assert [(c["cmd"], c["id"]) for c in control(run_dir)] == [("prune", "5.3")]


async def test_prune_disabled_on_baseline_and_on_pruned(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        assert pilot.app._selected_id == "5"  # the first node is selected on load
        assert pilot.app.check_action("prune", ()) is None  # greyed, still shown
        await pilot.press("p")
        await select(pilot, "5.4.1")  # already pruned with its parent
        await pilot.press("p")
    assert control(run_dir) == []


async def test_pin_toggles_pin_and_unpin(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.1")  # pinned in the fixture
        await pilot.press("P")
        await select(pilot, "5.3")
        await pilot.press("P")
    assert [(c["cmd"], c["id"]) for c in control(run_dir)] == [("unpin", "5.1"), ("pin", "5.3")]


@pytest.mark.slow  # two modal screens: ~2 s on a busy 2-core box
async def test_fork_asks_for_a_hint_in_a_modal(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.3.1")
        await pilot.press("f")
        assert isinstance(pilot.app.screen, PromptScreen)
        await pilot.press("t", "r", "y")
        pilot.app.screen.query_one(Input).value += " blocking"
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(pilot.app.screen, PromptScreen)
        await pilot.press("f", "x", "escape")  # cancelled: nothing sent
        await pilot.pause()
    assert [(c["cmd"], c["id"], c["hint"]) for c in control(run_dir)] == [("fork", "5.3.1", "try blocking")]


async def test_fork_disabled_on_failed_node(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.2")
        await pilot.press("f")
        assert not isinstance(pilot.app.screen, PromptScreen)
    assert control(run_dir) == []


async def test_space_pauses_then_resumes_after_the_engine_confirms(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("space")
        # the engine answers with an event; the dashboard folds it and offers resume
        write_events(run_dir / "events.jsonl", [{"seq": 999, "ts": FROZEN, "type": "run_paused"}])
        for _ in range(50):
            await pilot.pause(0.05)
            if pilot.app.view.state.paused:
                break
        assert pilot.app.view.state.paused
        assert "paused" in str(pilot.app.query_one("#header", Static).render())
        await pilot.press("space")
    assert [c["cmd"] for c in control(run_dir)] == ["pause", "resume"]


async def test_kill_only_for_running_nodes(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.3.1")  # done: greyed out, writes nothing
        assert pilot.app.check_action("kill", ()) is None
        await pilot.press("k")
        await select(pilot, "5.3.2")  # benchmarking
        assert pilot.app.check_action("kill", ()) is True
        await pilot.press("k")
    assert [(c["cmd"], c["id"]) for c in control(run_dir)] == [("kill", "5.3.2")]


async def test_stop_needs_confirmation(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("S")
        assert isinstance(pilot.app.screen, ConfirmScreen)
        await pilot.press("escape")  # keep running
        await pilot.pause()
        assert control(run_dir) == []
        await pilot.press("S")
        await pilot.click("#yes")
        await pilot.pause()
    assert [c["cmd"] for c in control(run_dir)] == ["stop"]


async def test_budget_keys_move_the_cap_by_ten_percent(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("+", "-")
    assert [(c["cmd"], c["tokens"]) for c in control(run_dir)] == [("budget", "+200000"), ("budget", "-200000")]


async def test_finished_run_greys_out_every_command(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, finished=True)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.3.2")
        for action, params in (("prune", ()), ("pin", ()), ("kill", ()), ("stop", ()), ("budget", (1,)),
                               ("pause_resume", ()), ("fork", ())):
            assert pilot.app.check_action(action, params) is None, action
        await pilot.press("p", "P", "k", "S", "+", "-", "space", "f")
        assert not isinstance(pilot.app.screen, (PromptScreen, ConfirmScreen))
        assert "finished: phases done" in str(pilot.app.query_one("#header", Static).render())
    assert control(run_dir) == []


# -- navigation ------------------------------------------------------------------------------
async def test_b_jumps_to_the_best_node(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("b")
        await pilot.pause()
        assert pilot.app._selected_id == "5.3.1"
        assert pilot.app.run_tree.cursor_node.data == "5.3.1"
        info = str(pilot.app.query_one("#detail-info", Static).render())
        assert "5.3.1" in info and "★ best" in info and "1.60× vs base" in info


async def test_slash_goes_to_a_node_by_id(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("slash")
        assert isinstance(pilot.app.screen, PromptScreen)
        await pilot.press(*"9.9", "enter")  # unknown: the modal stays and says so
        await pilot.pause()
        assert isinstance(pilot.app.screen, PromptScreen)
        assert "no node '9.9'" in str(pilot.app.screen.query_one("#prompt-error", Static).render())
        pilot.app.screen.query_one(Input).value = ""
        await pilot.press(*"5.4.1", "enter")
        await pilot.pause()
        assert not isinstance(pilot.app.screen, PromptScreen)
        assert pilot.app._selected_id == "5.4.1"


async def test_deep_nodes_start_collapsed_and_jumping_expands_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "5"
    events = demo_run()
    last = events[-1]["ts"]
    extra = [
        {"seq": len(events), "ts": last + 1, "type": "node_created", "id": "5.3.1.1", "parent": "5.3.1", "phase": 2, "kind": "improve"},
        {"seq": len(events) + 1, "ts": last + 2, "type": "node_created", "id": "5.3.1.1.1", "parent": "5.3.1.1", "phase": 3, "kind": "improve"},
    ]
    write_events(run_dir / "events.jsonl", events + extra)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        tree = pilot.app.run_tree
        assert tree.by_id["5.3"].is_expanded  # depth 1
        assert not tree.by_id["5.3.1"].is_expanded  # depth 2: collapsed
        assert "5.3.1.1" not in tree.by_id  # children of a collapsed node wait outside the Tree
        assert tree.by_id["5.3.1"].allow_expand  # … but it shows that it can be expanded
        await select(pilot, "5.3.1")
        await pilot.press("right")
        assert tree.by_id["5.3.1"].is_expanded and "5.3.1.1" in tree.by_id
        assert "5.3.1.1.1" not in tree.by_id  # 5.3.1.1 is deeper still: collapsed
        await pilot.press("left")  # collapse again
        assert not tree.by_id["5.3.1"].is_expanded
        await pilot.press("slash")
        pilot.app.screen.query_one(Input).value = "5.3.1.1.1"
        await pilot.press("enter")
        await pilot.pause()
        assert pilot.app._selected_id == "5.3.1.1.1"
        assert tree.by_id["5.3.1"].is_expanded and tree.by_id["5.3.1.1"].is_expanded


async def test_question_mark_opens_help_with_keymap_ids(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("question_mark")
        assert isinstance(pilot.app.screen, HelpScreen)
        ids = [row[2] for row in pilot.app.screen.rows]
        assert "looptree.prune" in ids and "looptree.detach" in ids
        assert "looptree.replay.step" not in ids  # replay keys are hidden on a live run
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(pilot.app.screen, HelpScreen)


async def test_q_detaches_without_touching_the_run(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    app = live_app(run_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0
    assert control(run_dir) == []


async def test_keymap_remaps_a_binding_by_id(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir, keymap={"looptree.prune": "x"}).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.3")
        await pilot.press("p")  # no longer bound
        await pilot.press("x")
    assert [(c["cmd"], c["id"]) for c in control(run_dir)] == [("prune", "5.3")]


@pytest.mark.slow  # the command palette imports and searches: ~2 s
async def test_command_palette_runs_dashboard_actions(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    async with live_app(run_dir).run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        await select(pilot, "5.3")
        names = [description for _, description, _ in pilot.app.palette_actions()]
        assert any("Prune" in n for n in names)
        assert not any("Kill" in n for n in names)  # 5.3 is not running
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"prune")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await pilot.pause(0.2)
    assert [(c["cmd"], c["id"]) for c in control(run_dir)] == [("prune", "5.3")]
