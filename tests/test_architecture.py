"""The layout tells the architecture: engine/ and gpu/ never import the UI (import-linter)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_root(tmp_path: Path) -> Path:
    """A folder whose `looptree/` links to the repository's folders: the import root as installed.

    import-linter (grimp) finds packages on disk; an editable install maps `looptree.engine` to
    `engine/` through an import hook it cannot see, so the check reads this farm of links instead.
    """
    root = tmp_path / "src"
    (root / "looptree").mkdir(parents=True)
    for name in ("engine", "app", "gpu", "styles"):
        (root / "looptree" / name).symlink_to(ROOT / name, target_is_directory=True)
    return root


def test_engine_and_gpu_do_not_import_the_ui(tmp_path: Path) -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    env = {**os.environ, "PYTHONPATH": str(source_root(tmp_path))}
    result = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "the engine knows nothing of the UI KEPT" in result.stdout


def test_headless_entry_point_refuses_a_dashboard_with_one_line(tmp_path: Path) -> None:
    """`python -m looptree.engine.cli attach` has no UI plugged in: a clear error, not an import of Textual."""
    run = tmp_path / ".looptree" / "runs" / "1"
    run.mkdir(parents=True)
    (run / "events.jsonl").write_text('{"seq":0,"ts":1,"type":"run_started","run":1}\n')
    result = subprocess.run([sys.executable, "-m", "looptree.engine.cli", "attach", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "looptree: error: this entry point has no dashboard; use `looptree` or pass --no-tui"
