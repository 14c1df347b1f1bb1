"""The experiment view (`looptree attach` on a `looptree ab` out directory), driven by Textual's pilot.

The log is written the way ab.py writes it: the real `EventLog` (unchecked: an experiment's own
vocabulary), the real `Sequential` statistics after each pair, the same event names and fields.
Only the arms' results are made up here (no agent runs): that part is a fake, said so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from textual.widgets import DataTable, Static

from looptree.app.experiment import ExperimentApp
from looptree.app.main import pick_view
from looptree.app.synthetic import demo_run, write_events
from looptree.engine.core.events import EventLog
from looptree.engine.core.runs import resolve_run_dir
from looptree.engine.experiments.sprt import PairOutcome, Sequential


def _result(success: bool, ratio: float | None, tokens: int, cost: float, gpu_h: float) -> dict[str, Any]:
    """A fake arm result with the fields of ab.ArmResult.to_dict()."""
    return {"success": success, "ratio": ratio, "tokens": tokens, "cost_usd": cost, "gpu_hours": gpu_h,
            "wall_s": 12.0, "status": "finished", "run_dir": None, "best_node": None, "error": None}


class FakeExperiment:
    """Writes an experiment log as ab.Experiment.run does, with made-up arm results."""

    def __init__(self, out_dir: Path, tasks: list[str]) -> None:
        self.out_dir = out_dir
        self.tasks = tasks
        self.log = EventLog(out_dir, checked=False)
        self.seq = Sequential(0.05, 0.10, 0.15)
        self.log.append("experiment_started", control="control.toml", test="test.toml", suite="suite/",
                        suite_kind="folder", tasks=tasks, overrides=[],
                        settings={"alpha": 0.05, "beta": 0.10, "min_effect": 0.15, "max_pairs": None,
                                  "max_tokens": None}, max_pairs=len(tasks))

    def pair(self, index: int, control: dict[str, Any], test: dict[str, Any]) -> None:
        order = ("control", "test") if index % 2 == 0 else ("test", "control")
        task = self.tasks[index]
        for arm in order:
            self.log.append("arm_started", pair=index, task=task, arm=arm, run_dir=f"/runs/{task}-{arm}")
            self.log.append("arm_finished", pair=index, task=task, arm=arm,
                            result=control if arm == "control" else test)
        self.seq.update(PairOutcome(control["success"], test["success"], control["ratio"], test["ratio"]))
        self.log.append("pair_finished", pair=index, task=task, first=order[0], control=control, test=test,
                        decision=self.seq.decision, statistics=self.seq.to_dict())

    def finish(self, reason: str) -> None:
        verdict = self.seq.decision or "inconclusive"
        stopped_early = self.seq.decision is not None and self.seq.pairs < len(self.tasks)
        (self.out_dir / "verdict.json").write_text(json.dumps({"verdict": verdict, "pairs": self.seq.pairs,
                                                               "stopped_early": stopped_early}))
        self.log.append("experiment_finished", verdict=verdict, pairs=self.seq.pairs, reason=reason)


def _append_raw(path: Path, text: str) -> None:
    """Hostile lines, as a broken or foreign writer might leave them."""
    with open(path, "a") as fh:
        fh.write(text)


def _text(app: ExperimentApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


async def test_experiment_view_table_statistics_totals_verdict_and_live_tail(tmp_path: Path) -> None:
    exp = FakeExperiment(tmp_path / "ab", [f"task{i}" for i in range(30)])
    exp.pair(0, _result(False, None, 1000, 0.10, 0.01), _result(True, 1.5, 2000, 0.20, 0.02))
    exp.pair(1, _result(True, 1.1, 1500, 0.15, 0.01), _result(True, 1.3, 2500, 0.25, 0.02))
    bounds = exp.seq.success.to_dict()

    app = ExperimentApp(tmp_path / "ab", poll_hz=20.0)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        table = app.query_one(DataTable)
        assert table.row_count == 2
        row = [str(c) for c in table.get_row("1")]
        assert row[:3] == ["1", "task1", "test"]  # odd pairs run the test arm first
        assert row[3].startswith("✓ 1.100x") and row[4].startswith("✓ 1.300x")
        stats = _text(app, "#exp-stats")
        assert f"upper {bounds['upper']:+.3f}" in stats and f"lower {bounds['lower']:+.3f}" in stats
        assert f"LLR test {bounds['llr_test']:+.3f}" in stats
        assert "evidence" in stats and f"threshold {exp.seq.speedup.threshold:.3g}" in stats
        totals = _text(app, "#exp-totals")
        assert "control  runs 2  successes 1  tokens 2,500  $0.25  GPU-hours 0.020" in totals
        assert "test     runs 2  successes 2  tokens 4,500  $0.45  GPU-hours 0.040" in totals
        assert "VERDICT" not in _text(app, "#exp-verdict")

        # Live tail: the ab process appends while the view runs.
        exp.pair(2, _result(False, None, 1000, 0.1, 0.0), _result(True, 1.4, 1000, 0.1, 0.0))
        await pilot.pause(0.3)
        assert table.row_count == 3
        index = 3
        while exp.seq.decision is None:  # the test arm keeps winning until the success SPRT decides
            exp.pair(index, _result(False, None, 1000, 0.1, 0.0), _result(True, 1.4, 1000, 0.1, 0.0))
            index += 1
        exp.finish("decided by the success test")
        await pilot.pause(0.3)
        assert table.row_count == index < len(exp.tasks)
        assert "decided: test" in _text(app, "#exp-stats")
        verdict = _text(app, "#exp-verdict")
        assert f"VERDICT: test after {index} pair(s)" in verdict and "stopped early" in verdict
        await pilot.press("q")
    assert app.return_code in (0, None)


async def test_experiment_view_skips_hostile_events(tmp_path: Path) -> None:
    exp = FakeExperiment(tmp_path / "ab", ["[bold]x", "t1"])
    exp.pair(0, _result(True, 2.0, 10, 0.0, 0.0), _result(False, None, 10, 0.0, 0.0))
    _append_raw(exp.log.path, '{"type":"pair_finished","pair":"x"}\n[1,2]\n'
                              '{"type":"pair_finished","pair":5,"control":3}\nnot json\n')
    app = ExperimentApp(tmp_path / "ab", poll_hz=20.0)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.pause()
        table = app.query_one(DataTable)
        assert table.row_count == 1
        assert str(table.get_row("0")[1]) == "[bold]x"  # shown as text, not markup
        assert "3 unreadable event(s) skipped" in _text(app, "#exp-title")


def test_attach_picks_the_experiment_view_for_an_experiment_dir(tmp_path: Path) -> None:
    FakeExperiment(tmp_path / "ab", ["t0"])
    assert resolve_run_dir(str(tmp_path / "ab")) == (tmp_path / "ab").resolve()  # what cmd_attach passes on
    assert pick_view(tmp_path / "ab") == "experiment"
    run_dir = tmp_path / "run"
    write_events(run_dir / "events.jsonl", demo_run())
    assert pick_view(run_dir) == "run"
    assert pick_view(tmp_path / "missing") == "run"
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "events.jsonl").write_text('{"type":"experiment_sta')
    assert pick_view(tmp_path / "torn") == "run"
