"""KernelBench adapter: find problems in a dataset and turn each into a looptree project.

A KernelBench problem is a Python file that defines ``class Model(nn.Module)``,
``get_inputs()`` and ``get_init_inputs()``; a solution defines ``ModelNew``, a drop-in for
``Model`` (same constructor arguments, same forward inputs, same outputs). Datasets are laid out
as ``DIR/level{L}/{N}_{Name}.py`` (``DIR/level_{L}/`` and ``DIR/{L}/`` are accepted too).

Why a generated project per task: looptree optimizes *projects* (a goal, writable files, a
bench command that writes a metrics CSV). Giving each problem its own small project, with the
problem read-only and a single writable ``solution.py``, lets every looptree feature (tree
search, resume, dashboard, ``tree``/``show``) work on KernelBench unchanged.

Nothing here imports torch or executes a problem file in the calling process: the engine must
not pay for (or be crashed by) user code. Problems are checked statically with ``ast``;
``load_problem`` (which does execute the file) is for the bench process only.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import re
import shlex
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from looptree.engine.errors import LooptreeError

PROBLEM_FILE = "problem.py"
SOLUTION_FILE = "solution.py"
BENCH_FILE = "bench.py"
METRICS_FILE = "metrics.csv"

# Metric columns of the bench's CSV, in priority order (the leftmost decides; CONTRACT.md).
SPEEDUP_EAGER = "speedup_vs_eager (higher is better)"
SPEEDUP_COMPILE = "speedup_vs_compile (higher is better)"
RUNTIME = "runtime_ms (lower is better)"
EAGER = "eager_ms (lower is better)"
COMPILE = "compile_ms (lower is better)"
METRIC_COLUMNS = (SPEEDUP_EAGER, SPEEDUP_COMPILE, RUNTIME, EAGER, COMPILE)
REFERENCE_COLUMNS = (EAGER, COMPILE)  # a bench without a solution times only the baselines

GOAL = (
    "Write ModelNew in solution.py, a faster drop-in for Model in problem.py (same outputs); "
    "custom CUDA/Triton kernels, fusion, better algorithms are welcome. ModelNew takes the same "
    "constructor arguments (get_init_inputs()) and forward inputs (get_inputs()) as Model, and "
    "should keep Model's parameters (same state_dict names and shapes) so the reference weights "
    "can be loaded into it. bench.py checks the outputs against Model on fresh random inputs "
    "(KernelBench's 5 trials; atol=rtol=1e-4 for fp32 outputs, 1e-2 for fp16/bf16, integer outputs exactly) and fails the node "
    "with the reason when they differ; then it times eager PyTorch, torch.compile and ModelNew "
    "in one process, every timed call on fresh inputs. Patching torch, time or the problem, changing the thread "
    "count, or caching results makes the node fail as suspect. Only solution.py may change."
)

_PROBLEM_NAME = re.compile(r"^(\d+)_(.+)\.py$")
_REQUIRED = ("Model", "get_inputs", "get_init_inputs")


class KernelBenchError(LooptreeError):
    """A dataset, task range, problem file or solution file that cannot be used."""


@dataclass(frozen=True)
class Problem:
    """One KernelBench problem file: ``{number}_{name}.py`` in a level directory."""

    number: int
    name: str
    path: Path
    level: str

    @property
    def stem(self) -> str:
        """``"1_Matmul_ReLU"``: the task's name in summaries and its project directory."""
        return f"{self.number}_{self.name}"


# --------------------------------------------------------------------------- discovery


def normalize_level(level: str | int) -> str:
    """``1``, ``"1"``, ``"level1"`` and ``"level_1"`` all mean level ``"1"``."""
    text = str(level).strip()
    low = text.lower()
    for prefix in ("level_", "level"):
        if low.startswith(prefix):
            text = text[len(prefix):]
            break
    if not text or not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise KernelBenchError(f"--level {level!r}: expected a level such as 1, 2 or 3")
    return text


def level_dir(dataset: str | os.PathLike[str], level: str | int) -> Path:
    """The directory holding a level's problems; a clear error names every place looked at."""
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise KernelBenchError(f"--dataset {dataset}: no such directory")
    lvl = normalize_level(level)
    tried = [root / f"level{lvl}", root / f"level_{lvl}", root / lvl]
    for candidate in tried:
        if candidate.is_dir():
            return candidate
    names = ", ".join(str(p) for p in tried)
    raise KernelBenchError(f"--dataset {dataset} has no level {lvl} (looked for {names})")


def parse_tasks(spec: str) -> list[tuple[int, int]]:
    """``"1-5"`` → ``[(1, 5)]``; ``"3"`` → ``[(3, 3)]``; ``"1-3,7,9-10"`` → three ranges."""
    ranges: list[tuple[int, int]] = []
    text = str(spec).strip()
    if not text:
        raise KernelBenchError("--tasks: empty (expected A-B, e.g. 1-10)")
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise KernelBenchError(f"--tasks {spec!r}: {part!r} is not a task number or a range A-B")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise KernelBenchError(f"--tasks {spec!r}: range {lo}-{hi} is empty (A must not exceed B)")
        ranges.append((lo, hi))
    return ranges


def _scan(folder: Path, level: str) -> dict[int, Problem]:
    found: dict[int, Problem] = {}
    for path in sorted(folder.iterdir()):
        m = _PROBLEM_NAME.match(path.name)
        if not m or not path.is_file():
            continue
        number = int(m.group(1))
        if number in found:
            raise KernelBenchError(
                f"{folder}: two problems numbered {number} ({found[number].path.name} and {path.name})"
            )
        found[number] = Problem(number, m.group(2), path.resolve(), level)
    return found


def list_problems(dataset: str | os.PathLike[str], level: str | int, tasks: str) -> list[Problem]:
    """The problems of ``level`` whose numbers fall in ``tasks``, in number order.

    Numbers missing inside a range are skipped (datasets have gaps); a range that selects no
    problem at all is an error that says which numbers the level has.
    """
    ranges = parse_tasks(tasks)
    folder = level_dir(dataset, level)
    lvl = normalize_level(level)
    available = _scan(folder, lvl)
    if not available:
        raise KernelBenchError(f"{folder} holds no problem files (expected names like 1_Matmul.py)")
    chosen = sorted(n for n in available if any(lo <= n <= hi for lo, hi in ranges))
    if not chosen:
        nums = sorted(available)
        raise KernelBenchError(
            f"--tasks {tasks}: no problem in that range in {folder} "
            f"(it has {len(nums)}, numbered {nums[0]}-{nums[-1]})"
        )
    return [available[n] for n in chosen]


def find_solution(solutions_dir: str | os.PathLike[str], number: int) -> Path | None:
    """``DIR/{number}_*.py`` (one file; two are ambiguous), or None when there is none."""
    folder = Path(solutions_dir).expanduser()
    if not folder.is_dir():
        raise KernelBenchError(f"--solutions {solutions_dir}: no such directory")
    hits = sorted(p for p in folder.glob(f"{number}_*.py") if p.is_file())
    if len(hits) > 1:
        raise KernelBenchError(
            f"--solutions {solutions_dir}: {len(hits)} files for task {number} "
            f"({', '.join(p.name for p in hits)}); keep one"
        )
    return hits[0].resolve() if hits else None


# --------------------------------------------------------------------------- problem files


def check_problem_source(path: str | os.PathLike[str]) -> None:
    """Refuse a file that does not parse or lacks Model/get_inputs/get_init_inputs, without running it."""
    p = Path(path)
    try:
        source = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KernelBenchError(f"cannot read problem {p}: {exc}") from None
    try:
        tree = ast.parse(source, filename=str(p))
    except SyntaxError as exc:
        raise KernelBenchError(f"problem {p.name} does not parse: line {exc.lineno}: {exc.msg}") from None
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
    missing = [name for name in _REQUIRED if name not in defined]
    if missing:
        raise KernelBenchError(
            f"problem {p.name} is not in KernelBench format: it defines no {', '.join(missing)} "
            "(expected class Model(nn.Module), get_inputs() and get_init_inputs())"
        )


def load_module(path: str | os.PathLike[str], role: str) -> ModuleType:
    """Import a file under a unique module name (two tasks' ``problem.py`` never collide).

    The file's directory goes first on ``sys.path`` so a solution's ``from problem import Model``
    finds the ``problem.py`` beside it. Any exception while executing the file becomes a ``KernelBenchError`` naming it.
    """
    p = Path(path).resolve()
    if not p.is_file():
        raise KernelBenchError(f"{role} file {path} does not exist")
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:10]
    name = f"_looptree_kb_{role}_{digest}"
    folder = str(p.parent)
    while folder in sys.path:  # to the front: this file's neighbours win over older entries
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise KernelBenchError(f"cannot import {role} file {p}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code: any failure is a verdict on the file
        sys.modules.pop(name, None)
        if _mentions_oom(exc):
            raise
        raise KernelBenchError(f"{p.name} failed to import: {type(exc).__name__}: {_first_line(exc)}") from exc
    return module


def load_problem(path: str | os.PathLike[str]) -> ModuleType:
    """Import a problem file and check it has Model, get_inputs and get_init_inputs."""
    module = load_module(path, "problem")
    missing = [n for n in _REQUIRED if not hasattr(module, n)]
    if missing:
        raise KernelBenchError(f"problem {Path(path).name} defines no {', '.join(missing)}")
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def _mentions_oom(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------- projects

_SOLUTION_TEMPLATE = '''"""ModelNew for KernelBench level {level} problem {stem} (the one file you may change).

It starts as the reference itself: ModelNew subclasses Model from problem.py, so the baseline
node times eager PyTorch. Replace forward() (and __init__ if you need to) with something faster
that returns the same outputs: fused or custom CUDA/Triton kernels (e.g. via
torch.utils.cpp_extension.load_inline or triton), a better algorithm, fewer launches.
Keep Model's parameters (same state_dict names and shapes): bench.py loads the reference weights
into ModelNew before comparing outputs.
"""

import torch
import torch.nn as nn

from problem import Model


class ModelNew(Model):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)
'''

_BENCH_TEMPLATE = '''"""Benchmark for this KernelBench task (generated by looptree; read-only).

Checks ModelNew (solution.py) against Model (problem.py) on fresh random inputs, then times
eager PyTorch, torch.compile and ModelNew in this one process and writes one metrics row:
{columns}.
An incorrect ModelNew makes this script exit non-zero; its last line says why.
Options (e.g. --trials N, --no-compile): python -m looptree.gpu.kernelbench.runner --help
"""

import os
import sys

LOOPTREE_SRC = {src!r}

try:
    from looptree.gpu.kernelbench import runner as kb_bench
except ImportError:
    sys.path.insert(0, LOOPTREE_SRC)
    from looptree.gpu.kernelbench import runner as kb_bench

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    metrics = os.environ.get("LOOPTREE_METRICS") or os.path.join(here, "metrics.csv")
    sys.exit(kb_bench.main([
        "--problem", os.path.join(here, "problem.py"),
        "--solution", os.path.join(here, "solution.py"),
        "--metrics", metrics,
        *sys.argv[1:],
    ]))
'''

_GITIGNORE = "__pycache__/\nmetrics.csv\nkb_eval.json\nkb_eval.log\n"


def _toml_str(text: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML escapes for this text)."""
    import json

    return json.dumps(text, ensure_ascii=False)


def _bench_extras() -> str:
    """Engine options this project type wants, written only if this looptree's schema has them.

    ``compare = "off"``: the KernelBench bench already times its own baselines (eager and
    torch.compile) in the same process as the candidate, and every bench run pays for a
    torch.compile, so timing the parent interleaved with each candidate would double the cost
    for no extra protection against drift.
    """
    try:
        from looptree.engine.core.config import BenchSection
    except ImportError:
        return ""
    fields = getattr(BenchSection, "model_fields", {})
    return 'compare = "off"\n' if "compare" in fields else ""


def project_config_text(problem: Problem, *, python: str = sys.executable, bench_args: Sequence[str] = (),
                        bench_timeout: float = 900, build_timeout: float = 120) -> str:
    """The task project's looptree.toml."""
    py = shlex.quote(python)
    bench = f"{py} {BENCH_FILE}" + "".join(f" {shlex.quote(a)}" for a in bench_args)
    cols = ", ".join(_toml_str(c) for c in METRIC_COLUMNS)
    return f"""# looptree project for KernelBench level {problem.level} problem {problem.stem}
# (generated by `looptree kernelbench`; source: {problem.path})
# The agent writes ModelNew in solution.py; problem.py and bench.py never change.
# Metric columns, leftmost first: {cols}
# Pick the model with KEY=VALUE on the command line, e.g. agent.provider=openai agent.model=gpt-4.1

[project]
goal = {_toml_str(GOAL)}
writable = ["{SOLUTION_FILE}"]
readonly = ["{PROBLEM_FILE}", "{BENCH_FILE}"]

[build]
command = {_toml_str(f"{py} -m py_compile {SOLUTION_FILE}")}
timeout = {build_timeout:g}

[bench]
command = {_toml_str(bench)}
metrics = "{METRICS_FILE}"
timeout = {bench_timeout:g}
repeats = 1
{_bench_extras()}"""


def solution_template(problem: Problem) -> str:
    """The starting ``solution.py``: ModelNew is Model, so the baseline is eager PyTorch."""
    return _SOLUTION_TEMPLATE.format(level=problem.level, stem=problem.stem)


def _write(path: Path, text: str, *, readonly: bool = False) -> None:
    if path.exists():
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
        path.unlink()
    path.write_text(text, encoding="utf-8")
    if readonly:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_task_project(problem: Problem | str | os.PathLike[str], dest: str | os.PathLike[str], *,
                      python: str = sys.executable, bench_args: Sequence[str] = (),
                      bench_timeout: float = 900) -> Path:
    """Write (or reuse) the looptree project for one problem; returns its directory.

    ``dest`` gets ``problem.py`` (a copy, read-only), ``solution.py`` (writable, a correct
    ModelNew that is the reference), ``bench.py`` (read-only launcher of ``looptree.gpu.kernelbench.runner``),
    ``looptree.toml``, a ``.gitignore`` and its own git repository. A ``dest`` that already holds the same problem is
    reused as it is (its runs, config edits and git history kept: the next run is N+1); one
    that holds a different problem is refused rather than overwritten.
    """
    if not isinstance(problem, Problem):
        p = Path(problem).resolve()
        m = _PROBLEM_NAME.match(p.name)
        number, name = (int(m.group(1)), m.group(2)) if m else (0, p.stem)
        problem = Problem(number, name, p, normalize_level(p.parent.name) if p.parent.name.lower().startswith("level") else "?")
    check_problem_source(problem.path)
    source = problem.path.read_text(encoding="utf-8")
    out = Path(dest).expanduser().resolve()
    existing = out / PROBLEM_FILE
    if existing.exists():
        if existing.read_text(encoding="utf-8") != source:
            raise KernelBenchError(
                f"{out} already holds a different {PROBLEM_FILE} (not {problem.path.name}); "
                "pick another --out or remove it"
            )
        if (out / "looptree.toml").exists() and (out / SOLUTION_FILE).exists():
            return out
    out.mkdir(parents=True, exist_ok=True)
    src_root = str(Path(__file__).resolve().parents[3])  # the folder holding looptree/ in a wheel install
    _write(out / PROBLEM_FILE, source, readonly=True)
    _write(out / BENCH_FILE, _BENCH_TEMPLATE.format(src=src_root, columns=", ".join(METRIC_COLUMNS)), readonly=True)
    if not (out / SOLUTION_FILE).exists():
        _write(out / SOLUTION_FILE, solution_template(problem))
    _write(out / "looptree.toml", project_config_text(problem, python=python, bench_args=bench_args,
                                                       bench_timeout=bench_timeout))
    if not (out / ".gitignore").exists():
        _write(out / ".gitignore", _GITIGNORE)
    _own_repository(out)
    return out


def _own_repository(project: Path) -> None:
    """Give the task project a git repository of its own.

    Without one, a project under ``--out`` inside some other repository (the user's checkout)
    would be treated as a sub-directory of it: every task's run 1 would write branch
    ``looptree/1`` in that one repository, and the baseline snapshot would take in the whole
    checkout. A nested repository keeps each task's tree of commits to itself.
    """
    if (project / ".git").exists():
        return
    import subprocess

    try:
        proc = subprocess.run(["git", "init", "-q"], cwd=project, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBenchError(f"cannot run git init in {project}: {exc}") from None
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        raise KernelBenchError(f"git init in {project} failed: {first}")


# --------------------------------------------------------------------------- summaries

FAST_P = (0.0, 1.0, 1.5, 2.0)
KB_FAST_P = (0.0, 0.5, 0.8, 1.0, 1.5, 2.0)  # upstream scripts/benchmark_eval_analysis.py


def _counts(r: dict) -> bool:
    """Correct and not suspect: what fast_p may count."""
    return bool(r.get("correct")) and not r.get("suspect")


def fast_p(results: Sequence[dict], key: str = "speedup_vs_eager", ps: Sequence[float] = FAST_P) -> dict[str, float]:
    """Share of tasks that are correct, not suspect, AND faster than ``p`` × the baseline
    (fast_0: the rate of correct, unsuspected tasks), as KernelBench's ``fastp`` (speed-up > p).

    ``results`` are task dicts with ``correct`` (bool), ``suspect`` (bool, optional) and ``key``
    (a float or None). Every task counts in the denominator, including those that failed to
    run: a task with no measurement is a task not solved.
    """
    n = len(results)
    out: dict[str, float] = {}
    for p in ps:
        if p == 0:
            hits = sum(1 for r in results if _counts(r))
        else:
            hits = sum(1 for r in results if _counts(r) and (r.get(key) or 0.0) > p)
        out[f"{p:g}"] = hits / n if n else 0.0
    return out


def geomean_speedup(results: Sequence[dict], key: str = "speedup_vs_eager") -> float:
    """KernelBench's geometric mean of the speed-up over correct (here: and unsuspected) tasks."""
    import math

    values = [float(r[key]) for r in results if _counts(r) and isinstance(r.get(key), (int, float)) and r[key] > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0
