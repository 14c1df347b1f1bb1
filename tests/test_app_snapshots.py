"""Snapshot tests of the dashboard's main screen at 80x24 and 160x50, live and replay.

Deterministic by construction: the fixture's timestamps are fixed, the clock is frozen
(`frozen_time`, which also stops the spinners and the once-a-second clock), the project path
does not exist so the diff panel shows a fixed line, and each snapshot waits for the loading
and diff workers before it is taken. Regenerate with `--snapshot-update` after a deliberate
UI change and review the SVGs under tests/__snapshots__/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.dash_pilot import FROZEN, make_run, ready, settled

from looptree.app.dashboard import LooptreeApp


def select_best(keys: tuple[str, ...] = ()):
    async def run_before(pilot) -> None:
        await ready(pilot)
        for key in keys:
            await pilot.press(key)
        await pilot.press("b")  # the best node: its detail has metrics, spread, verdict and logs
        await pilot.pause(0.3)  # the detail fills in after the cursor's frame, the footer 0.15 s later
        await settled(pilot.app)
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
def test_live_main_screen(snap_compare, tmp_path: Path, size: tuple[int, int]) -> None:
    app = LooptreeApp(make_run(tmp_path, finished=False), mode="live", frozen_time=FROZEN)
    assert snap_compare(app, terminal_size=size, run_before=select_best())


@pytest.mark.parametrize("size", [(80, 24), (160, 50)], ids=["80x24", "160x50"])
def test_replay_main_screen(snap_compare, tmp_path: Path, size: tuple[int, int]) -> None:
    app = LooptreeApp(make_run(tmp_path, finished=True), mode="replay", frozen_time=FROZEN, autoplay=False)
    # seek to 90% of the log: most of the tree is there, paused, replay position in the header
    keys = ("right_square_bracket",) * 9
    assert snap_compare(app, terminal_size=size, run_before=select_best(keys))
