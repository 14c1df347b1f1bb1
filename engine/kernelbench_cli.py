"""`looptree kernelbench`: one looptree run per KernelBench problem, then a summary with fast_p.

    looptree kernelbench --dataset DIR --level L --tasks A-B [--out DIR] [--eval-only
                         [--solutions DIR]] [KEY=VALUE ...]

Each problem becomes a small project under ``--out`` (default ``./kernelbench_runs/level{L}``,
see ``looptree.gpu.kernelbench.make_task_project``) and gets an ordinary headless looptree run whose
agent rewrites ``solution.py``. Tasks run one after another: their benchmarks time a GPU and
must not overlap. ``--eval-only`` runs no agent: it runs each project's bench command once,
timing the reference (eager and ``torch.compile``) and, with ``--solutions DIR``, the file
``DIR/{N}_*.py`` as the candidate.

The summary (stdout, ``summary.json``, ``summary.csv`` under ``--out``) lists per task whether
the result is correct, its runtime and both speed-ups, and fast_p for p in 0, 1, 1.5, 2: the
share of tasks that are correct AND more than p times faster (fast_0 is the correctness rate).
In agent runs a task's result is its best node *other than the baseline* (the baseline is the
reference itself, so counting it would make every task "correct"); a task whose agent produced
no correct ModelNew counts as not solved.

Exit status: 0 when every task was measured (incorrect candidates are results, not errors);
1 when some task could not be measured (its reference failed, did not fit in memory, timed out
or its run ended in an error); 2 for bad arguments, as every looptree command.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import importlib.util
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from looptree.engine.config import Config, load_config
from looptree.engine.errors import ConfigError, LooptreeError
from looptree.gpu.kernelbench import (
    COMPILE,
    EAGER,
    FAST_P,
    RUNTIME,
    SPEEDUP_COMPILE,
    SPEEDUP_EAGER,
    Problem,
    fast_p,
    find_solution,
    list_problems,
    make_task_project,
    normalize_level,
)

EVAL_JSON = "kb_eval.json"
EVAL_LOG = "kb_eval.log"
SUMMARY_COLUMNS = ["task", "correct", "runtime_ms", "eager_ms", "compile_ms", "speedup_vs_eager",
                   "speedup_vs_compile", "oom", "error", "reason", "best_node", "project", "run_dir", "solution"]


@dataclass
class TaskResult:
    """One task's line in the summary."""

    task: str
    number: int
    project: str
    correct: bool | None = None  # None: nothing was asked of a candidate (eval-only without solutions)
    runtime_ms: float | None = None
    eager_ms: float | None = None
    compile_ms: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None
    oom: bool = False
    error: bool = False  # the task could not be measured at all
    reason: str = ""
    best_node: str | None = None
    run_dir: str | None = None
    solution: str | None = None
    device: str | None = None
    compile_note: str = ""


# --------------------------------------------------------------------------- entry point


def run_kernelbench(args: argparse.Namespace) -> int:
    """The `kernelbench` command; ``args`` has dataset, level, tasks, eval_only, out, no_tui,
    overrides and (optionally) solutions."""
    if importlib.util.find_spec("torch") is None:
        raise LooptreeError("kernelbench needs PyTorch in this environment (pip install 'looptree[torch]')")
    level = normalize_level(args.level)
    problems = list_problems(args.dataset, level, args.tasks)
    solutions = getattr(args, "solutions", None)
    if solutions and not args.eval_only:
        raise LooptreeError("--solutions goes with --eval-only (agent runs start from the reference)")
    if solutions and not Path(solutions).expanduser().is_dir():
        raise LooptreeError(f"--solutions {solutions}: no such directory")
    out = Path(args.out or f"kernelbench_runs/level{level}").expanduser().resolve()
    overrides = absolutize_overrides(list(args.overrides or []))
    projects = [make_task_project(p, out / p.stem) for p in problems]
    first = load_config(projects[0], None, overrides)  # a bad KEY=VALUE fails before any work
    if not args.eval_only:
        check_agent(first, projects[0])
    mode = "eval-only" if args.eval_only else "agent"
    print(f"looptree kernelbench: level {level}, {len(problems)} task(s) "
          f"({', '.join(p.stem for p in problems)}), {mode}; projects in {out}", file=sys.stderr, flush=True)
    results: list[TaskResult] = []
    stopped = False
    for index, (problem, project) in enumerate(zip(problems, projects), start=1):
        print(f"== [{index}/{len(problems)}] {problem.stem}", file=sys.stderr, flush=True)
        if args.eval_only:
            result = eval_task(problem, project, overrides, solutions)
        else:
            config = first if index == 1 else load_config(project, None, overrides)
            result, stopped = asyncio.run(agent_task(problem, project, config))
        results.append(result)
        line = _result_line(result)
        print(f"== {problem.stem}: {line}", file=sys.stderr, flush=True)
        if stopped:
            print("looptree kernelbench: stopped by user; the remaining tasks were not run", file=sys.stderr)
            break
    summary = build_summary(results, dataset=str(args.dataset), level=level, tasks=args.tasks, mode=mode,
                            out=out, solutions=solutions)
    write_summary(summary, results, out)
    sys.stdout.write(render_summary(summary, results))
    sys.stdout.flush()
    errors = [r for r in results if r.error]
    if errors:
        print(f"looptree: kernelbench: {len(errors)} of {len(results)} task(s) could not be measured "
              f"({errors[0].task}: {errors[0].reason})", file=sys.stderr)
        return 1
    return 0


def absolutize_overrides(overrides: Sequence[str]) -> list[str]:
    """``agent.cassette=rel/path`` means a path relative to where the user stands, not to each
    generated project (which is where the engine would otherwise look for it)."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "agent.cassette" and value and not Path(value).is_absolute() and Path(value).exists():
            item = f"{key}={Path(value).resolve()}"
        out.append(item)
    return out


def check_agent(config: Config, project: Path) -> None:
    """Refuse to start agent runs that cannot ask any agent, before any baseline is timed."""
    agent = config.agent
    if agent.provider == "replay":
        cassette = Path(agent.cassette)
        if not cassette.is_absolute():
            cassette = project / cassette
        if not cassette.exists():
            raise ConfigError(
                "kernelbench needs an agent: pass agent.provider=openai agent.model=MODEL (API key in the "
                "environment), or agent.cassette=FILE to replay recorded replies, or use --eval-only"
            )
        return
    from looptree.engine.llm.providers import resolve_endpoint

    resolve_endpoint(agent.provider, agent.base_url, agent.api_key_env)


def _result_line(r: TaskResult) -> str:
    if r.error:
        return f"not measured: {r.reason}"
    if r.correct is None:
        return f"eager {_fmt(r.eager_ms)} ms, compile {_fmt(r.compile_ms)} ms"
    if not r.correct:
        return r.reason if r.reason.startswith("incorrect") else f"incorrect: {r.reason}"
    return (f"correct, {_fmt(r.runtime_ms)} ms, {_fmt(r.speedup_vs_eager, 3)}x vs eager, "
            f"{_fmt(r.speedup_vs_compile, 3)}x vs compile")


# --------------------------------------------------------------------------- eval-only


def eval_task(problem: Problem, project: Path, overrides: Sequence[str], solutions: str | None) -> TaskResult:
    """Run the task's bench command once, without an agent, and read the JSON it leaves."""
    config = load_config(project, None, list(overrides))
    result = TaskResult(task=problem.stem, number=problem.number, project=str(project))
    solution: Path | None = None
    extra = ["--json", EVAL_JSON]
    if solutions:
        solution = find_solution(solutions, problem.number)
        if solution is None:
            result.correct = False
            result.reason = f"no solution file {problem.number}_*.py in {solutions}"
            extra.append("--reference-only")
        else:
            result.solution = str(solution)
            extra += ["--solution", str(solution)]
    else:
        extra.append("--reference-only")
    json_path = project / EVAL_JSON
    json_path.unlink(missing_ok=True)
    command = config.bench.command + "".join(f" {_quote(a)}" for a in extra)
    proc = asyncio.run(_run_bench(command, project, config.bench.timeout))
    data = _read_json(json_path)
    if data is None:
        result.error = True
        result.reason = _process_failure(proc, config.bench.timeout, project / EVAL_LOG)
        result.oom = "out of memory" in result.reason
        return result
    _fill_from_bench(result, data, had_solution=solution is not None)
    return result


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


async def _run_bench(command: str, project: Path, timeout: float) -> Any:
    from looptree.engine.procs import run_command

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPTREE_JOB", "GIT_"))}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["LOOPTREE_METRICS"] = str(project / "metrics.csv")
    (project / EVAL_LOG).unlink(missing_ok=True)
    return await run_command(command, cwd=project, env=env, timeout=timeout, log_path=project / EVAL_LOG,
                             job_tag=f"lt-kb-eval:{os.getpid()}:{project.name}")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _process_failure(proc: Any, timeout: float, log: Path) -> str:
    if proc.timed_out:
        return f"bench timed out after {timeout:g} s (the whole process tree was killed; raise bench.timeout=S)"
    last = next((l.strip() for l in reversed(proc.tail.splitlines()) if l.strip()), "")
    if proc.rc is not None and proc.rc < 0:
        sig = -proc.rc
        hint = " (probably the kernel's out-of-memory killer: the problem does not fit this machine)" \
            if sig == signal.SIGKILL else ""
        return f"bench killed by signal {sig}{hint}; log: {log}"
    return f"bench exited with status {proc.rc}: {last[:300] or 'no output'}; log: {log}"


def _fill_from_bench(result: TaskResult, data: dict[str, Any], *, had_solution: bool) -> None:
    result.device = data.get("device")
    result.eager_ms = _num(data.get("eager_ms"))
    result.compile_ms = _num(data.get("compile_ms"))
    result.compile_note = str(data.get("compile_note") or "")
    result.oom = bool(data.get("oom"))
    reason = str(data.get("reason") or "")
    if data.get("ok"):
        if had_solution:
            result.correct = True
            result.runtime_ms = _num(data.get("runtime_ms"))
            result.speedup_vs_eager = _num(data.get("speedup_vs_eager"))
            result.speedup_vs_compile = _num(data.get("speedup_vs_compile"))
        return
    if data.get("correct") is False:  # the candidate failed: a result, not an error
        result.correct = False
        result.reason = reason
        return
    result.error = True  # the reference itself could not be measured
    result.correct = False if had_solution or result.correct is False else None
    result.reason = reason or f"bench failed with exit status {data.get('exit_code')}"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- agent runs


async def agent_task(problem: Problem, project: Path, config: Config) -> tuple[TaskResult, bool]:
    """One headless looptree run on the task's project; returns its result and whether the user stopped it."""
    from looptree.engine.engine import Engine

    result = TaskResult(task=problem.stem, number=problem.number, project=str(project))
    try:
        engine = await Engine.create(project, config)
    except LooptreeError as exc:
        result.error, result.reason = True, str(exc)
        return result, False
    from looptree.engine.headless import drive

    driven = await drive(engine)
    reason, signals = driven.reason, int(driven.interrupted)
    result.run_dir = str(engine.run_dir)
    result_from_state(result, engine.state, reason)
    return result, signals > 0


def result_from_state(result: TaskResult, state: Any, finish_reason: str) -> TaskResult:
    """Fill a task's result from a finished run's folded state (``engine.state.RunState``)."""
    base = state.baseline
    if base is None or not base.ok:
        why = (f"baseline failed at {base.failure_stage}: {base.failure_reason}" if base is not None
               else f"the run ended before its baseline: {finish_reason}")
        result.error, result.correct, result.reason = True, False, why
        result.oom = "out of memory" in why
        return result
    result.eager_ms = _num(base.metrics.get(EAGER))
    result.compile_ms = _num(base.metrics.get(COMPILE))
    candidates = [n for n in state.ranked() if n.kind != "baseline"]
    if not candidates:
        tried = [n for n in state.nodes.values() if n.kind != "baseline"]
        failed = [n for n in tried if n.status == "failed" and n.failure_reason]
        last = f"; last failure: {failed[-1].failure_reason}" if failed else ""
        result.correct = False
        result.reason = f"no ModelNew beyond the baseline passed ({len(tried)} tried){last}"
        if finish_reason.startswith("error:"):
            result.error, result.reason = True, f"run ended with {finish_reason}"
        return result
    best = candidates[0]
    result.correct = True
    result.best_node = best.id
    result.runtime_ms = _num(best.metrics.get(RUNTIME))
    result.eager_ms = _num(best.metrics.get(EAGER))
    result.compile_ms = _num(best.metrics.get(COMPILE))
    result.speedup_vs_eager = _num(best.metrics.get(SPEEDUP_EAGER))
    result.speedup_vs_compile = _num(best.metrics.get(SPEEDUP_COMPILE))
    return result


# --------------------------------------------------------------------------- summary


def build_summary(results: Sequence[TaskResult], *, dataset: str, level: str, tasks: str, mode: str, out: Path,
                  solutions: str | None = None) -> dict[str, Any]:
    rows = [asdict(r) for r in results]
    judged = [r for r in results if r.correct is not None]
    summary: dict[str, Any] = {
        "dataset": dataset,
        "level": level,
        "tasks": tasks,
        "mode": mode,
        "out": str(out),
        "solutions": solutions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "counts": {
            "tasks": len(results),
            "correct": sum(1 for r in results if r.correct),
            "incorrect": sum(1 for r in results if r.correct is False),
            "not_measured": sum(1 for r in results if r.error),
            "oom": sum(1 for r in results if r.oom),
        },
        "results": rows,
        "fast_p": None,
        "fast_p_vs_compile": None,
    }
    if judged:  # fast_p over every task: one without a candidate verdict counts as not solved
        summary["fast_p"] = fast_p(rows, "speedup_vs_eager")
        summary["fast_p_vs_compile"] = fast_p(rows, "speedup_vs_compile")
    return summary


def write_summary(summary: dict[str, Any], results: Sequence[TaskResult], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SUMMARY_COLUMNS)
        for r in results:
            row = asdict(r)
            writer.writerow(["" if row[c] is None else (int(row[c]) if isinstance(row[c], bool) else row[c])
                             for c in SUMMARY_COLUMNS])


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_summary(summary: dict[str, Any], results: Sequence[TaskResult]) -> str:
    """The table and the fast_p lines, as printed on stdout."""
    head = ["task", "correct", "runtime_ms", "eager_ms", "compile_ms", "vs_eager", "vs_compile", "note"]
    table = [head]
    for r in results:
        correct = "-" if r.correct is None else ("yes" if r.correct else "NO")
        if r.error:
            correct = "OOM" if r.oom else "ERROR"
        note = r.reason or (f"best {r.best_node}" if r.best_node else "") or r.compile_note
        table.append([r.task, correct, _fmt(r.runtime_ms), _fmt(r.eager_ms), _fmt(r.compile_ms),
                      "-" if r.speedup_vs_eager is None else f"{r.speedup_vs_eager:.3g}x",
                      "-" if r.speedup_vs_compile is None else f"{r.speedup_vs_compile:.3g}x",
                      note if len(note) <= 100 else note[:99] + "…"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    devices = sorted({r.device for r in results if r.device})
    where = f", {', '.join(devices)}" if devices else ""
    lines = [f"KernelBench level {summary['level']}, tasks {summary['tasks']} ({summary['mode']}{where})"]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    n = len(results)
    for label, key in (("fast_p vs eager:  ", "fast_p"), ("fast_p vs compile:", "fast_p_vs_compile")):
        values = summary.get(key)
        if values is None:
            lines.append(f"{label} n/a (no candidate was judged: eval-only without --solutions times the baselines)")
            continue
        parts = [f"fast_{p:g} = {values[f'{p:g}']:.2f} ({round(values[f'{p:g}'] * n)}/{n})" for p in FAST_P]
        lines.append(f"{label} " + "  ".join(parts))
    lines.append(f"summary: {Path(summary['out']) / 'summary.json'}, {Path(summary['out']) / 'summary.csv'}")
    return "\n".join(lines) + "\n"
