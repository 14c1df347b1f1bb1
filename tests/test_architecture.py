"""The layout tells the architecture: engine/ and gpu/ never import the UI (import-linter)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_engine_and_gpu_do_not_import_the_ui() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "the engine knows nothing of the UI KEPT" in result.stdout


def test_headless_entry_point_refuses_a_dashboard_with_one_line(tmp_path: Path) -> None:
    """`python -m engine.cli attach` has no UI plugged in: a clear error, not an import of Textual."""
    run = tmp_path / ".looptree" / "runs" / "1"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text('{"seq":0,"ts":1,"type":"run_started","run":1}\n')
    result = subprocess.run([sys.executable, "-m", "engine.cli", "attach", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "looptree: error: this entry point has no dashboard; use `looptree` or pass --no-tui"
