"""The dashboard outlives every periodic task's first firings (a session used to die at 300 s).

The periods are shortened (`Periods`) so each timer fires several times within a second or two;
the test then checks the app is still running and still redrawing. A static sweep makes sure no
Textual scheduling call is handed a builtin (the class of fault behind the 300 s crash).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from fixtures.dash_pilot import make_run, ready

from looptree.app.dashboard import LooptreeApp, Periods

ROOT = Path(__file__).resolve().parents[1]
SHORT = Periods(gc_freeze=0.05, spinner=0.02, clock=0.05, engine_lock=0.05)
SCHEDULERS = {"set_interval", "set_timer", "call_later", "call_after_refresh", "call_next", "run_worker",
              "call_from_thread"}


async def _outlive_timers(app: LooptreeApp, expected: set[str]) -> None:
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        for _ in range(400):
            await pilot.pause(0.02)
            if all(app.timer_firings[name] >= 3 for name in expected):
                break
        assert {name: app.timer_firings[name] for name in expected} == {
            name: max(3, app.timer_firings[name]) for name in expected}
        assert app.is_running and app.return_code is None
        frame = app._frame
        await pilot.pause(0.2)
        assert app._frame > frame  # still animating after every timer fired
        await pilot.press("b")  # and still answering keys
        assert app._selected_id is not None


@pytest.mark.slow
async def test_live_dashboard_survives_every_periodic_task(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LOOPTREE_FROZEN_TIME", raising=False)
    run_dir = make_run(tmp_path)
    app = LooptreeApp(run_dir, mode="live", freeze_gc=True, periods=SHORT)
    try:
        await _outlive_timers(app, {"gc-freeze", "events", "spinner", "clock", "engine-lock"})
    finally:
        import gc

        gc.unfreeze()


@pytest.mark.slow
async def test_replay_dashboard_survives_every_periodic_task(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("LOOPTREE_FROZEN_TIME", raising=False)
    run_dir = make_run(tmp_path, finished=True)
    app = LooptreeApp(run_dir, mode="replay", speed=64.0, freeze_gc=True, periods=SHORT)
    try:
        await _outlive_timers(app, {"gc-freeze", "events", "spinner", "clock"})
    finally:
        import gc

        gc.unfreeze()


def _callback_argument(call: ast.Call, name: str) -> ast.expr | None:
    if name == "set_interval" or name == "set_timer":
        return call.args[1] if len(call.args) > 1 else None
    return call.args[0] if call.args else None


def test_no_builtin_is_handed_to_a_textual_scheduler() -> None:
    """Textual reads `callback.__func__` of anything with `__self__`: builtins have one and crash.

    Every callback handed to a scheduling call in app/ must be `self.<method>`, a name bound to a
    Python function in that module, or a coroutine call; anything else (`gc.freeze`, `print`,
    `time.sleep`) is refused here before it can crash a session hours in.
    """
    offenders: list[str] = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        local_functions = {node.name for node in ast.walk(tree)
                           if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else None
            if name not in SCHEDULERS:
                continue
            callback = _callback_argument(call, name)
            ok = (callback is None
                  or isinstance(callback, ast.Call)  # a coroutine object handed to run_worker
                  or (isinstance(callback, ast.Attribute) and isinstance(callback.value, ast.Name)
                      and callback.value.id == "self")
                  or (isinstance(callback, ast.Name) and callback.id in local_functions))
            if not ok:
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: {ast.unparse(callback)}")
    assert not offenders, "callbacks Textual cannot inspect: " + "; ".join(offenders)


async def test_footer_recomposes_do_not_keep_old_keys_alive(tmp_path: Path) -> None:
    """Textual's Footer kept every FooterKey it ever composed (a data_bind watcher on `compact`).

    Browsing the tree flips which actions are enabled, and each flip recomposes the footer: the
    soak benchmark saw ~2 MiB a minute from this alone. The keys of old compositions must go.
    """
    import gc

    from textual.widgets._footer import FooterKey

    from looptree.app.widgets.footer import LeanFooter

    run_dir = make_run(tmp_path)
    app = LooptreeApp(run_dir, mode="live", periods=SHORT)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        footer = app.query_one(LeanFooter)
        for _ in range(12):
            before = footer.recomposed
            app.refresh_bindings()  # what a flip of an action's enabled state does
            for _ in range(50):
                await pilot.pause(0.01)
                if footer.recomposed > before:
                    break
        assert footer.recomposed >= 12
        gc.collect()
        # type(), not isinstance(): isinstance reads __class__, which some of torch's objects warn on
        live = [key for key in gc.get_objects() if issubclass(type(key), FooterKey)]
        shown = list(footer.query(FooterKey))
        # the keys on screen, and at most the composition before them (still being torn down)
        assert shown and len(live) <= 2 * len(shown), (len(live), len(shown))
        watchers = getattr(footer, "__watchers", {}).get("compact", [])
        assert 0 < len(watchers) <= len(shown)  # one per key on screen (the palette key has none)
