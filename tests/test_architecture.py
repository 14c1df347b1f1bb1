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
    assert "the layers of looptree KEPT" in result.stdout
    assert "the parts of a run KEPT" in result.stdout
    assert "Contracts: 4 kept, 0 broken." in result.stdout


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


def test_importing_the_engine_pulls_in_no_ui_module() -> None:
    """At run time too (import-linter reads the code; this runs it): no Textual, no looptree.app."""
    loaded = _modules_after("import looptree.engine.cli, looptree.engine.run.engine, looptree.engine.run.headless, "
                            "looptree.engine.run.printer, looptree.engine.run.doctor, "
                            "looptree.gpu.kernelbench.cli, looptree.engine.experiments.cli")
    ui = sorted(m for m in loaded if m.split(".")[0] in ("textual", "rich_pixels", "textual_plotext")
                or m.startswith("looptree.app"))
    assert not ui, ui


def test_bench_helpers_import_nothing_of_the_engine_but_its_errors() -> None:
    """What a user's bench imports: the helpers, numpy, and looptree's error classes; no engine, no torch."""
    loaded = _modules_after("import looptree.gpu.bench.timing, looptree.gpu.bench.correctness, "
                            "looptree.gpu.bench.report")
    ours = sorted(m for m in loaded if m.startswith("looptree."))
    assert ours == ["looptree.engine", "looptree.engine.errors", "looptree.gpu", "looptree.gpu.bench",
                    "looptree.gpu.bench.correctness", "looptree.gpu.bench.report", "looptree.gpu.bench.timing"]
    assert "torch" not in loaded and "pydantic" not in loaded


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


def test_docs_name_only_files_that_exist() -> None:
    """Every `engine/…`, `app/…`, `gpu/…` path the README and the architecture page name is real."""
    mentioned = re.compile(r"`((?:engine|app|gpu|styles|benchmarks|tests)/[\w/.*-]+)`")
    missing = []
    for doc in ("README.md", "docs/ARCHITECTURE.md", "benchmarks/README.md"):
        for path in mentioned.findall((ROOT / doc).read_text()):
            if not list(ROOT.glob(path.rstrip("/"))):
                missing.append(f"{doc}: {path}")
    assert not missing, missing


def test_ruff_is_clean() -> None:
    """The linter the test command runs (rules in pyproject.toml [tool.ruff])."""
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([exe, "check", "--no-cache", str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_is_clean(tmp_path: Path) -> None:
    """The type checker over every package, read through the installed import root (as the wheel)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--namespace-packages",
         "--explicit-package-bases", "--cache-dir", str(tmp_path / "cache"),
         "-p", "looptree.engine", "-p", "looptree.gpu", "-p", "looptree.app"],
        cwd=source_root(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout
