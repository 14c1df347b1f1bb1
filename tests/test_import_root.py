"""The built wheel installs one top-level name, `looptree`, and runs projects that have their own
`engine`, `app`, `gpu` and `styles` packages (which a flat layout used to shadow or be shadowed by).

The wheel is built from this checkout, installed into a folder of its own and put first on
PYTHONPATH, so the engine, the dashboard and the bench helpers all come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_projects" / "hotloop"

pytestmark = pytest.mark.slow

HOSTILE_INIT = '''"""The user's own {name} package: looptree must never import it."""
import os, pathlib
pathlib.Path(os.environ.get("IMPORT_MARKS", "/nonexistent"), "{name}").touch()
raise ImportError("the user's own {name}/ package was imported")
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "src"
    # Build from a copy: pip writes build/ and *.egg-info into the source tree.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info",
                                                                "__pycache__", ".looptree", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True, timeout=600)
    return next(out.glob("looptree-*.whl"))


def test_the_wheel_has_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"looptree"}
    assert "looptree/__init__.py" not in names  # a namespace package over the design card's folders
    for folder in ("engine", "app", "gpu", "styles"):
        assert any(n.startswith(f"looptree/{folder}/") for n in names), folder
    assert any(n.endswith(".tcss") for n in names) and any(n.endswith("templates/fix.md") for n in names)


def test_a_project_with_its_own_engine_app_gpu_styles_runs_to_the_end(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    project = tmp_path / "project"
    shutil.copytree(SAMPLE, project, ignore=shutil.ignore_patterns(".looptree", "__pycache__", "metrics.csv"))
    for name in ("engine", "app", "gpu", "styles"):
        (project / name).mkdir()
        (project / name / "__init__.py").write_text(HOSTILE_INIT.format(name=name))
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "IMPORT_MARKS": str(marks)}
    # The check imports the bench-side helpers from the project's own directory, where `gpu` is the user's.
    helpers = "import looptree.gpu.bench.report, looptree.gpu.bench.timing, looptree.gpu.bench.correctness, sys; " \
              "assert all(m.__file__.startswith(sys.argv[1]) for m in " \
              "(looptree.gpu.bench.report, looptree.gpu.bench.timing, looptree.gpu.bench.correctness))"
    check = f"python -c '{helpers}' {site}"
    run = subprocess.run(
        [sys.executable, "-m", "looptree.engine.cli", "run", str(project), "--no-tui", "bench.repeats=1",
         "bench.compare=off", "search.num_phases=1", "search.num_samples=1", f"check.command={check}",
         "sandbox.env=['IMPORT_MARKS']"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(marks.iterdir()) == [], "looptree imported the project's own packages"
    tree = subprocess.run([sys.executable, "-m", "looptree.engine.cli", "tree", str(project), "--json"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=120, check=True)
    nodes = json.loads(tree.stdout)["nodes"]
    assert any(n["status"] == "done" and n.get("kind") != "baseline" for n in nodes), nodes
    engine_file = subprocess.run([sys.executable, "-c", "import looptree.engine.cli as m; print(m.__file__)"],
                                 cwd=project, env=env, capture_output=True, text=True, check=True).stdout
    assert engine_file.startswith(str(site))


def test_the_engine_started_behind_the_dashboard_ignores_a_projects_own_looptree_folder(tmp_path: Path) -> None:
    from looptree.engine.cli import engine_command

    hostile = tmp_path / "looptree"
    hostile.mkdir()
    (hostile / "__init__.py").write_text("raise SystemExit('the project looptree package was imported')\n")
    started = subprocess.run(engine_command(["--help"]), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    assert "looptree" in started.stdout
    # The same command without -P imports the project's folder: the case this guards against.
    plain = [arg for arg in engine_command(["--help"]) if arg != "-P"]
    shadowed = subprocess.run(plain, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shadowed.returncode != 0 and "project looptree package" in shadowed.stderr
