"""`run_dashboard` (what the CLI calls): colour options, errors, and a headless detach end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from looptree.app.main import apply_color_option, run_dashboard
from looptree.app.synthetic import demo_run, write_events
from looptree.engine.errors import LooptreeError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("color,system", [("truecolor", "truecolor"), ("256", "256"), ("16", "standard")])
def test_color_option_sets_textual_color_system(monkeypatch, color: str, system: str) -> None:
    monkeypatch.delenv("TEXTUAL_COLOR_SYSTEM", raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    import textual.constants

    monkeypatch.setattr(textual.constants, "COLOR_SYSTEM", textual.constants.COLOR_SYSTEM)
    apply_color_option(color)
    assert os.environ["TEXTUAL_COLOR_SYSTEM"] == system
    assert "NO_COLOR" not in os.environ
    assert textual.constants.COLOR_SYSTEM == system  # already imported: patched in place too


def test_color_none_sets_no_color_and_auto_clears(monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TEXTUAL_COLOR_SYSTEM", "256")
    import textual.constants

    monkeypatch.setattr(textual.constants, "COLOR_SYSTEM", "256")
    apply_color_option("none")
    assert os.environ["NO_COLOR"] == "1"
    apply_color_option("auto")
    assert "NO_COLOR" not in os.environ and "TEXTUAL_COLOR_SYSTEM" not in os.environ
    with pytest.raises(LooptreeError, match="--color must be one of"):
        apply_color_option("rainbow")


def test_run_dashboard_refuses_missing_run(tmp_path: Path) -> None:
    with pytest.raises(LooptreeError, match="is not a run directory"):
        run_dashboard(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LooptreeError, match="has no events.jsonl to replay"):
        run_dashboard(tmp_path / "empty", mode="replay")


def test_import_app_does_not_import_textual() -> None:
    code = "import sys; from looptree import app; assert 'textual' not in sys.modules; print(app.run_dashboard.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "run_dashboard"


def test_detach_prints_how_to_reattach(tmp_path: Path) -> None:
    """A real `app.run()` on Textual's headless driver; `q` (typed by TEXTUAL_PRESS) detaches."""
    run_dir = tmp_path / "runs" / "5"
    write_events(run_dir / "events.jsonl", demo_run())
    env = {**os.environ, "TEXTUAL_DRIVER": "textual.drivers.headless_driver:HeadlessDriver",
           "TEXTUAL_PRESS": "q", "LOOPTREE_FROZEN_TIME": "1700000100"}
    code = ("import sys; from looptree.app import run_dashboard; "
            f"sys.exit(run_dashboard({str(run_dir)!r}, mode='live', color='256'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"looptree attach {run_dir}" in out.stderr
    assert not (run_dir / "control.jsonl").exists()  # detaching sends nothing to the engine


def test_refresh_rate_honours_textual_fps(monkeypatch, tmp_path: Path) -> None:
    """Over a slow SSH link users set TEXTUAL_FPS low; the dashboard never redraws faster than that."""
    import textual.constants

    from looptree.app.dashboard import LooptreeApp

    monkeypatch.setattr(textual.constants, "MAX_FPS", 4)
    assert LooptreeApp(tmp_path, mode="live").refresh_hz == 4
    monkeypatch.setattr(textual.constants, "MAX_FPS", 60)
    assert LooptreeApp(tmp_path, mode="live").refresh_hz == 10


def test_leaving_a_finished_run_says_how_it_ended(tmp_path: Path) -> None:
    """Nothing goes on after a finished run: the line says how it ended, not how to reattach."""
    run_dir = tmp_path / "runs" / "5"
    write_events(run_dir / "events.jsonl", demo_run(finished=True))
    env = {**os.environ, "TEXTUAL_DRIVER": "textual.drivers.headless_driver:HeadlessDriver",
           "TEXTUAL_PRESS": "wait:1500,q", "LOOPTREE_FROZEN_TIME": "1700000100"}
    code = ("import sys; from looptree.app import run_dashboard; "
            f"sys.exit(run_dashboard({str(run_dir)!r}, mode='live', color='256'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "run 5 finished:" in out.stderr and "goes on" not in out.stderr, out.stderr
