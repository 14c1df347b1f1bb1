"""The declared dependencies are the imported ones: nothing imported undeclared, nothing declared unused.

Why a test: a module imported but not declared works on the developer's machine (another
package pulled it in) and fails on a user's fresh install; a package declared but never used
costs every user its download. Both happened here before (pydantic, numpy, httpx2; pandas,
aiofiles, watchfiles).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("engine", "app", "gpu")
#: Declared but never imported by name, each for a reason a reader can check.
USED_WITHOUT_IMPORT = {
    "pyarrow": "pandas' parquet engine behind `looptree export --format parquet`",
}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return _normal(match.group(1))


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = project.get("optional-dependencies", {})
    optional = {_requirement_name(r) for name, reqs in extras.items() if name != "test" for r in reqs}
    return runtime, optional


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "looptree"}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    owners = importlib.metadata.packages_distributions()
    return {module: {_normal(d) for d in owners.get(module, [])} for module in modules}


def test_every_imported_package_is_declared() -> None:
    runtime, optional = _declared()
    undeclared = {module: dists for module, dists in _distributions(_imported_top_level_modules()).items()
                  if not dists & (runtime | optional)}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declared_runtime_dependency_is_used() -> None:
    runtime, _ = _declared()
    imported = set().union(*_distributions(_imported_top_level_modules()).values())
    unused = runtime - imported - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_the_exceptions_are_still_declared() -> None:
    """An entry of USED_WITHOUT_IMPORT for a package no longer declared is a stale excuse."""
    runtime, _ = _declared()
    assert set(USED_WITHOUT_IMPORT) <= runtime
