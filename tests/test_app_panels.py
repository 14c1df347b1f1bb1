"""Live tailing and the panels: tree growth, live rows, event log, diff and logs, GPUs, layout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fixtures.dash_pilot import FROZEN, live_app, make_run, plain, ready, select, settled
from textual.widgets import RichLog, Static

from looptree.app.dashboard import LooptreeApp
from looptree.app.synthetic import write_events
from looptree.app.widgets.event_log import EventLog
from looptree.engine.core.events import RunLock


# -- live tailing and panels -----------------------------------------------------------------
async def test_live_tail_adds_nodes_and_updates_panels(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path)
    lock = RunLock(run_dir)
    lock.acquire()  # an engine "holds" the run
    try:
        async with live_app(run_dir).run_test(size=(160, 50)) as pilot:
            await ready(pilot)
            app = pilot.app
            assert "running" in str(app.query_one("#header", Static).render())
            ts = FROZEN
            write_events(run_dir / "events.jsonl", [
                {"seq": 500, "ts": ts, "type": "node_created", "id": "5.3.3", "parent": "5.3", "phase": 1, "kind": "improve"},
                {"seq": 501, "ts": ts, "type": "agent_started", "id": "5.3.3", "role": "optimize"},
                {"seq": 502, "ts": ts, "type": "metric_row", "id": "5.3.2", "repeat": 0, "iteration": 2,
                 "values": {"runtime_ms (lower is better)": 8.12, "throughput_gbs (higher is better)": 123.1}},
            ])
            for _ in range(50):
                await pilot.pause(0.05)
                if "5.3.3" in app.run_tree.by_id:
                    break
            assert "5.3.3" in app.run_tree.by_id
            assert app.run_tree.by_id["5.3.3"].parent is app.run_tree.by_id["5.3"]
            assert "11 nodes" in str(app.query_one("#header", Static).render()).replace("nodes 11", "11 nodes")
            rows = app.query_one("#rows").shown_rows()
            assert [r[:3] for r in rows] == [["1", "2", "8.12"], ["1", "1", "8.31"], ["1", "0", "8.036"]]  # newest first
            assert any("5.3.3 created" in text for text, _ in app.query_one("#events", EventLog).buffer)
            app.query_one("#panels").active = "tab-events"
            await pilot.pause(0.1)
            log = app.query_one("#events", RichLog)
            assert any("5.3.3 created" in line.text for line in log.lines)
    finally:
        lock.release()


async def test_detail_shows_diff_from_git_and_log_tails(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    (project / "solver.py").write_text("def solve(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n")
    subprocess.run([*git, "-C", str(project), "add", "."], check=True)
    subprocess.run([*git, "-C", str(project), "commit", "-qm", "base"], check=True)
    base = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (project / "solver.py").write_text("def solve(xs):\n    return sum(xs)\n")
    subprocess.run([*git, "-C", str(project), "commit", "-qam", "sum"], check=True)
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    run_dir = make_run(tmp_path, project=str(project), commits={"5": base, "5.3": base, "5.3.1": head})
    async with live_app(run_dir).run_test(size=(160, 50)) as pilot:
        await ready(pilot)
        await select(pilot, "5.3.1")
        await settled(pilot.app)
        await pilot.pause()
        diff = plain(pilot.app, "#detail-diff")
        assert "+    return sum(xs)" in diff and "-    total = 0" in diff
        logs = plain(pilot.app, "#detail-logs")
        assert "bench.log" in logs and "iteration 29: 7.10 ms" in logs


async def test_no_gpu_state_is_explicit(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, gpus=0)
    async with live_app(run_dir).run_test(size=(160, 50)) as pilot:
        await ready(pilot)
        pilot.app.query_one("#panels").active = "tab-gpu"
        await pilot.pause()
        assert pilot.app.query_one("#gpu-none").display is True
        assert pilot.app.query_one("#gpu-table").display is False
        assert "No GPU: NVML library not found (no NVIDIA driver)" in plain(pilot.app, "#gpu-none")


async def test_gpu_panel_shows_devices_and_their_node(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, gpus=2)
    async with live_app(run_dir).run_test(size=(160, 50)) as pilot:
        await ready(pilot)
        pilot.app.query_one("#panels").active = "tab-gpu"
        await pilot.pause()
        table = pilot.app.query_one("#gpu-table")
        assert table.display is True and table.row_count == 2
        assert table.get_cell("gpu1", "node") == "5.3.2"
        assert table.get_cell("gpu0", "node") == "idle"


@pytest.mark.parametrize("mode", ["live", "replay"])
async def test_narrow_terminal_marks_the_layout(tmp_path: Path, mode: str) -> None:
    run_dir = make_run(tmp_path, finished=True)
    app = LooptreeApp(run_dir, mode=mode, frozen_time=FROZEN, autoplay=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert app.screen.has_class("-narrow")
        await pilot.resize_terminal(160, 50)
        await pilot.pause()
        assert app.screen.has_class("-wide")


# -- one median per node -----------------------------------------------------------------------
async def test_live_panel_and_tree_show_the_same_median(tmp_path: Path) -> None:
    """The issue saw two medians for one node: the panel pooled every row, the tree did not.

    Repeats [1, 1, 1, 10], [5], [6]: the median of the repeat medians (what the engine's
    `aggregate` records and the tree shows) is 5; the pooled median of the rows is 3.
    """
    from looptree.app.model import fmt_num
    from looptree.app.synthetic import COLUMNS
    from looptree.engine.core.metrics import aggregate, parse_header

    run_dir = make_run(tmp_path)
    lock = RunLock(run_dir)
    lock.acquire()
    repeats = [[1.0, 1.0, 1.0, 10.0], [5.0], [6.0]]
    ts, seq = FROZEN, 900
    events = [{"type": "node_created", "id": "5.3.3", "parent": "5.3", "phase": 1, "kind": "improve"}]
    for repeat, values in enumerate(repeats):
        events.append({"type": "stage_started", "id": "5.3.3", "stage": "bench", "repeat": repeat, "side": "candidate"})
        for iteration, value in enumerate(values):
            events.append({"type": "metric_row", "id": "5.3.3", "repeat": repeat, "iteration": iteration,
                           "values": {COLUMNS[0]: value, COLUMNS[1]: 1.0}, "columns": COLUMNS, "side": "candidate"})
    specs = parse_header(["iteration", *COLUMNS])
    recorded = aggregate([[{COLUMNS[0]: v, COLUMNS[1]: 1.0} for v in values] for values in repeats], specs)
    assert recorded.values[COLUMNS[0]] == 5.0
    done = [{"type": "stage_finished", "id": "5.3.3", "stage": "bench", "repeat": 2, "ok": True},
            {"type": "node_evaluated", "id": "5.3.3", "iteration": 9, "metrics": recorded.values,
             "spread": recorded.spread, "columns": COLUMNS}]
    numbered = [{"seq": seq + i, "ts": ts, **e} for i, e in enumerate(events + done)]
    try:
        async with live_app(run_dir).run_test(size=(160, 50)) as pilot:
            await ready(pilot)
            app = pilot.app

            async def title_after(batch: list[dict], expect: str) -> str:
                write_events(run_dir / "events.jsonl", batch)
                for _ in range(60):
                    await pilot.pause(0.05)
                    title = str(app.query_one("#rows-title", Static).render())
                    if title.startswith("5.3.3") and expect in title:
                        return title
                raise AssertionError(f"the live panel never showed 5.3.3 with {expect!r}: {title}")

            live = await title_after(numbered[:len(events)], "6 rows · 3 repeats")
            assert "benchmarking" in live and "runtime_ms median 5" in live and "median 3" not in live, live
            final = await title_after(numbered[len(events):], "done")
            assert f"runtime_ms median {fmt_num(5.0)}" in final, final
            for _ in range(40):
                await pilot.pause(0.05)
                if "5.3.3" in app.run_tree.by_id and fmt_num(5.0) in str(app.run_tree.by_id["5.3.3"].label):
                    break
            tree_label = str(app.run_tree.by_id["5.3.3"].label)
            assert f"runtime_ms median {fmt_num(5.0)}" in str(app.query_one("#rows-title", Static).render())
            assert fmt_num(5.0) in tree_label, tree_label
    finally:
        lock.release()
