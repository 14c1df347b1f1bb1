"""The layout tells the architecture: engine/ and gpu/ never import the UI (import-linter)."""

from __future__ import annotations

import os
import re
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


OLD_ROOTS = re.compile(r"(?<![\w.])(?:from|import)\s+(?:engine|app|gpu|styles)\b")
NEW_FORM = re.compile(r"from\s+looptree\s+import\s+(?:engine|app|gpu|styles)\b")


def test_no_code_imports_the_old_top_level_names() -> None:
    """Everything imports `looptree.engine…`: the wheel has no top-level `engine`, `app`, `gpu`.

    Tests and bench helpers run with the repository root as their working directory, where the
    folders would still import under their bare names; this check sees through that (code in
    strings handed to `python -c` included).
    """
    offenders = []
    for folder in ("engine", "app", "gpu", "styles", "tests", "benchmarks", "sample_projects"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if OLD_ROOTS.search(NEW_FORM.sub("", line)) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
