"""`looptree kernelbench`: one looptree run per KernelBench problem, then a summary with fast_p.

    looptree kernelbench --dataset DIR --level L --tasks A-B [--out DIR] [--eval-only
                         [--solutions DIR]] [--protocol looptree|kernelbench]
                         [--precision fp32|fp16|bf16] [KEY=VALUE ...]

Each problem becomes a small project under ``--out`` (default ``./kernelbench_runs/level{L}``,
see ``looptree.gpu.kernelbench.problems.make_task_project``) and gets an ordinary headless looptree run whose
agent rewrites ``solution.py``. Tasks run concurrently, one per device at a time (``plan_slots``):
each local GPU, each Ray bench worker for agent runs with ``cluster.backend = "ray"``, or
``bench.concurrency`` CPU slots (1 by default: one CPU bench at a time keeps timings clean);
two benches on one device would time each other. The summary keeps the tasks' order. ``--eval-only`` runs no agent: it runs each project's bench command once,
timing the reference (eager and ``torch.compile``) and, with ``--solutions DIR``, the file
``DIR/{N}_*.py`` as the candidate.

The summary (stdout, ``summary.json``, ``summary.csv`` under ``--out``) lists per task whether
the result is correct, its runtime and both speed-ups, and fast_p for p in 0, 1, 1.5, 2: the
share of tasks that are correct, not suspect, AND more than p times faster (fast_0 is the rate
of correct, unsuspected tasks); ``--protocol kernelbench`` uses upstream's timing and thresholds
(``build_summary``). Ctrl-C writes the finished tasks' summary before anything else.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from looptree.engine.core.config import Config, load_config
from looptree.engine.errors import ConfigError, LooptreeError
from looptree.gpu.kernelbench.problems import (
    COMPILE,
    EAGER,
    FAST_P,
    KB_FAST_P,
    RUNTIME,
    SPEEDUP_COMPILE,
    SPEEDUP_EAGER,
    Problem,
    fast_p,
    find_solution,
    geomean_speedup,
    list_problems,
    make_task_project,
    normalize_level,
)
from looptree.gpu.kernelbench.runner import KB_COMMIT

EVAL_JSON = "kb_eval.json"
EVAL_LOG = "kb_eval.log"
SUMMARY_COLUMNS = ["task", "correct", "runtime_ms", "eager_ms", "compile_ms", "speedup_vs_eager",
                   "speedup_vs_compile", "oom", "suspect", "error", "reason", "best_node", "project", "run_dir", "solution"]


@dataclass
class TaskResult:
    """One task's line in the summary."""

    task: str
    number: int
    project: str
    correct: bool | None = None  # None: nothing was asked of a candidate (eval-only without solutions)
    suspect: bool = False  # timings the bench's guards or the launcher's clock contradict: never in fast_p
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
    bench_args = protocol_args(args)
    slots = plan_slots(first, eval_only=args.eval_only)
    where = ", ".join(s.label for s in slots)
    print(f"looptree kernelbench: {len(slots)} task(s) at a time ({where})", file=sys.stderr, flush=True)
    if args.eval_only and first.cluster.backend == "ray":
        print("looptree kernelbench: --eval-only benches run on this machine's devices, not on the Ray "
              "cluster (agent runs use its workers)", file=sys.stderr, flush=True)
    done: dict[int, TaskResult] = {}
    sweep = Sweep(problems, projects, slots, done)
    if args.eval_only:
        run_one = lambda problem, project, slot: eval_task_async(  # noqa: E731
            problem, project, [*overrides, *slot.overrides], solutions, bench_args=bench_args)
    else:
        async def run_one(problem: Problem, project: Path, slot: SweepSlot) -> TaskResult:
            config = await asyncio.to_thread(load_config, project, None, [*overrides, *slot.overrides])
            return await sweep.agent(problem, project, config)
    try:
        asyncio.run(sweep.run(run_one, handle_signals=not args.eval_only))
    except KeyboardInterrupt:
        # Ctrl-C: the finished tasks' results are written before anything else happens.
        results = [done[i] for i in sorted(done)]
        pending = next((p.stem for i, p in enumerate(problems) if i not in done), problems[-1].stem)
        summary = build_summary(results, dataset=str(args.dataset), level=level, tasks=args.tasks, mode=mode,
                                out=out, solutions=solutions, protocol=getattr(args, "protocol", None))
        summary["interrupted"] = {"task": pending, "finished": len(results), "of": len(problems)}
        write_summary(summary, results, out)
        print(f"\nlooptree kernelbench: interrupted during {pending}; {len(results)} finished task(s) "
              f"written to {out / 'summary.json'} and summary.csv", file=sys.stderr, flush=True)
        return 130
    finally:
        sweep.close()
    results = [done[i] for i in sorted(done)]  # task order, whatever order they finished in
    if sweep.stopped:
        print("looptree kernelbench: stopped by user; the remaining tasks were not run", file=sys.stderr)
    summary = build_summary(results, dataset=str(args.dataset), level=level, tasks=args.tasks, mode=mode,
                            out=out, solutions=solutions, protocol=getattr(args, "protocol", None))
    write_summary(summary, results, out)
    sys.stdout.write(render_summary(summary, results))
    sys.stdout.flush()
    errors = [r for r in results if r.error]
    if errors:
        print(f"looptree: kernelbench: {len(errors)} of {len(results)} task(s) could not be measured "
              f"({errors[0].task}: {errors[0].reason})", file=sys.stderr)
        return 1
    return 0


def protocol_args(args: argparse.Namespace) -> list[str]:
    """Bench flags for --protocol and --precision (nothing when they are the defaults)."""
    extra: list[str] = []
    protocol = getattr(args, "protocol", None) or "looptree"
    precision = getattr(args, "precision", None) or "fp32"
    if protocol != "looptree":
        extra += ["--protocol", protocol]
    if precision != "fp32":
        extra += ["--precision", precision]
    return extra


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
    from looptree.engine.agents.llm.providers import resolve_endpoint

    resolve_endpoint(agent.provider, agent.base_url, agent.api_key_env)


# --------------------------------------------------------------------------- parallel sweeps


@dataclass(frozen=True)
class SweepSlot:
    """Where one task at a time runs: a local GPU, a CPU bench slot, or a cluster bench worker."""

    label: str  # shown in progress lines: "cuda:0", "cpu", "cpu#2", "ray#1"
    overrides: tuple[str, ...] = ()  # config overrides that pin a task to this slot


def plan_slots(config: Config, *, eval_only: bool) -> list[SweepSlot]:
    """How many tasks run at once, and where: one per device, because two benches on one device
    time each other. Local GPUs (``gpu.devices``) give one slot each, pinned with ``gpu.devices``;
    a CPU bench gives ``bench.concurrency`` slots (1 keeps CPU timings clean); agent runs on a Ray
    cluster (``cluster.backend = "ray"``) give one slot per bench worker the cluster fits, each run
    holding one worker (``cluster.workers=1``). Eval-only benches run on this machine's devices."""
    if config.cluster.backend == "ray" and not eval_only:
        n = max(1, _cluster_capacity(config))
        return [SweepSlot(f"ray#{i + 1}", ("cluster.workers=1",)) for i in range(n)]
    devices: list[int] = []
    if config.bench.device != "cpu":
        from looptree.gpu.devices.slots import parse_devices
        from looptree.gpu.devices.telemetry import choose_backend

        telemetry = choose_backend(config.gpu.telemetry)
        try:
            devices = parse_devices(config.gpu.devices, telemetry)
        finally:
            telemetry.close()
    if devices:
        return [SweepSlot(f"cuda:{d}", (f"gpu.devices=[{d}]",)) for d in devices]
    n = config.bench.concurrency
    return [SweepSlot("cpu")] if n == 1 else [SweepSlot(f"cpu#{i + 1}") for i in range(n)]


def _cluster_capacity(config: Config) -> int:
    """Bench workers the Ray cluster fits. Connects here, and stays connected for the sweep's runs,
    so that no run's executor owns (and shuts down) the connection the others use."""
    from looptree.engine.cluster.ray_executor import RayExecutor, _ray

    ray = _ray()
    if not ray.is_initialized():
        address = config.cluster.address or None
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - one line for the user, not Ray's traceback
            raise LooptreeError(f"cannot reach the Ray cluster at {address or 'auto'} (cluster.address): "
                                f"{str(exc).strip().splitlines()[0][:200]}") from None
    return RayExecutor(config.cluster)._capacity(ray)


class Sweep:
    """Runs the tasks, at most one per slot at a time, in task order as slots free up.

    Results land in ``done`` (task index -> result) as each task ends, so a Ctrl-C that cancels
    the sweep still leaves every finished task for the partial summary.
    """

    def __init__(self, problems: Sequence[Problem], projects: Sequence[Path], slots: Sequence[SweepSlot],
                 done: dict[int, TaskResult]) -> None:
        self.problems, self.projects, self.slots, self.done = list(problems), list(projects), list(slots), done
        self.stopped = False
        self.engines: list[Any] = []
        self.signals = 0

    async def run(self, run_one: Any, *, handle_signals: bool) -> None:
        free: asyncio.Queue[SweepSlot] = asyncio.Queue()
        for slot in self.slots:
            free.put_nowait(slot)
        total = len(self.problems)

        async def one(index: int) -> None:
            slot = await free.get()  # waiters are served first come, first served: tasks start in order
            try:
                if self.stopped:
                    return
                problem, project = self.problems[index], self.projects[index]
                print(f"== [{index + 1}/{total}] {problem.stem} on {slot.label}", file=sys.stderr, flush=True)
                result = await run_one(problem, project, slot)
                self.done[index] = result
                print(f"== {problem.stem} ({slot.label}): {_result_line(result)}", file=sys.stderr, flush=True)
            finally:
                free.put_nowait(slot)

        loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
        for sig in handled:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await asyncio.gather(*(one(i) for i in range(total)))
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        """Agent runs: the first signal stops every running task cleanly (they still count); a second exits."""
        from looptree.engine.run.headless import stop_reason_for

        self.signals += 1
        if self.signals > 1:
            os._exit(128 + int(sig))
        self.stopped = True
        for engine in list(self.engines):
            engine.request_stop(stop_reason_for(sig))

    async def agent(self, problem: Problem, project: Path, config: Config) -> TaskResult:
        """One headless looptree run on the task's project; with one slot its events are printed."""
        from looptree.engine.run.engine import Engine

        result = TaskResult(task=problem.stem, number=problem.number, project=str(project))
        try:
            engine = await Engine.create(project, config)
        except LooptreeError as exc:
            result.error, result.reason = True, str(exc)
            return result
        if len(self.slots) == 1:  # several runs' events interleaved would be noise: progress lines say enough
            from looptree.engine.run.printer import Printer

            engine.listeners.append(Printer(engine.state))
        self.engines.append(engine)
        try:
            reason = await engine.run()
        finally:
            self.engines.remove(engine)
        result.run_dir = str(engine.run_dir)
        return result_from_state(result, engine.state, reason)

    def close(self) -> None:
        """Disconnect from a Ray cluster the sweep connected to (see ``_cluster_capacity``)."""
        if any(s.label.startswith("ray#") for s in self.slots):
            from looptree.engine.cluster.ray_executor import _ray

            ray = _ray()
            if ray.is_initialized():
                ray.shutdown()


def _result_line(r: TaskResult) -> str:
    if r.error:
        return f"not measured: {r.reason}"
    if r.correct is None:
        return f"eager {_fmt(r.eager_ms)} ms, compile {_fmt(r.compile_ms)} ms"
    if r.suspect:
        return f"correct but SUSPECT (not counted in fast_p): {r.reason}"
    if not r.correct:
        return r.reason if r.reason.startswith("incorrect") else f"incorrect: {r.reason}"
    return (f"correct, {_fmt(r.runtime_ms)} ms, {_fmt(r.speedup_vs_eager, 3)}x vs eager, "
            f"{_fmt(r.speedup_vs_compile, 3)}x vs compile")


# --------------------------------------------------------------------------- eval-only


def eval_task(problem: Problem, project: Path, overrides: Sequence[str], solutions: str | None,
              bench_args: Sequence[str] = ()) -> TaskResult:
    """Run the task's bench command once, without an agent, and read the JSON it leaves."""
    return asyncio.run(eval_task_async(problem, project, overrides, solutions, bench_args=bench_args))


async def eval_task_async(problem: Problem, project: Path, overrides: Sequence[str], solutions: str | None,
                          bench_args: Sequence[str] = ()) -> TaskResult:
    """`eval_task` on a running event loop, so a sweep runs several at once (one per slot)."""
    config = await asyncio.to_thread(load_config, project, None, list(overrides))
    result = TaskResult(task=problem.stem, number=problem.number, project=str(project))
    solution: Path | None = None
    extra = ["--json", EVAL_JSON, *bench_args]
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
    proc = await _run_bench(command, project, config, [solution] if solution else [], label=problem.stem)
    data = await asyncio.to_thread(_read_json, json_path)
    if data is None:
        result.error = True
        result.reason = _process_failure(proc, config.bench.timeout, project / EVAL_LOG)
        result.oom = _names_oom(result.reason)
        return result
    _fill_from_bench(result, data, had_solution=solution is not None)
    return result


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


async def _run_bench(command: str, project: Path, config: Config, readable: list[Path], *, label: str = "") -> Any:
    """The task's bench with a run's limits, sandbox and device pinning (engine.sandbox, engine.procs)."""
    from looptree.engine.evaluation.procs import run_command, run_limits
    from looptree.engine.evaluation.sandbox import command_env, resolve_sandbox
    from looptree.gpu.devices.slots import env_for, parse_devices
    from looptree.gpu.devices.telemetry import choose_backend

    telemetry = choose_backend(config.gpu.telemetry)
    try:
        devices = [] if config.bench.device == "cpu" else parse_devices(config.gpu.devices, telemetry)[:1]
        containment = resolve_sandbox(config, hide=[project], telemetry=telemetry, devices=devices,
                                      readable=readable)
        uuid = None
        if devices:
            try:
                uuid = telemetry.sample(devices[0]).uuid
            except Exception:  # noqa: BLE001 - the index keys the lock when NVML cannot say
                uuid = None
    finally:
        telemetry.close()
    if containment.line:
        print(f"looptree: {containment.line}", file=sys.stderr)
    env = command_env(os.environ, extra_names=config.sandbox.env, secret_names={config.agent.api_key_env})
    env.update(env_for(devices[0] if devices else None))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["LOOPTREE_METRICS"] = str(project / "metrics.csv")
    (project / EVAL_LOG).unlink(missing_ok=True)
    from looptree.gpu.devices.locks import hold_async, key_for

    key = key_for(devices[0] if devices else None, uuid=uuid, concurrency=config.bench.concurrency)
    tail = _StageTail(project / EVAL_LOG, label)
    # the machine-wide device lock a run's benches take too: an eval never times beside them
    async with hold_async(key, f"looptree kernelbench --eval-only {label}", on_wait=lambda who: print(
            f"== {label}: waiting for device lock {key}, held by {who}", file=sys.stderr, flush=True)):
        proc = await run_command(command, cwd=project, env=env, timeout=config.bench.timeout,
                                 log_path=project / EVAL_LOG, job_tag=f"lt-kb-eval:{os.getpid()}:{project.name}",
                                 limits=run_limits(config)[0], sandbox=containment.sandbox,
                                 device=devices[0] if devices else None, on_tick=tail.tick, tick_interval=0.5)
    await tail.tick()
    return proc


class _StageTail:
    """Prints the bench's stage lines (``kb_bench: [ 1.2 s] …``) from its log as they appear, so a
    sweep shows per task which stage it is in, and a timeout which stage was slow."""

    def __init__(self, log: Path, label: str) -> None:
        self.log = log
        self.label = label
        self.offset = 0
        self.pending = b""

    def _read(self) -> bytes:
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.offset)
                return fh.read(1 << 20)
        except OSError:
            return b""

    async def tick(self) -> None:
        data = await asyncio.to_thread(self._read)  # no file I/O on the event loop
        self.offset += len(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line.startswith(("kb_bench: [", "kb_bench: suspect")):
                print(f"   {self.label}: {line[len('kb_bench: '):]}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "memoryerror", "bad_alloc",
              "oom_kill", "oom killer", "memory limit")


def _names_oom(reason: str) -> bool:
    low = reason.lower()
    return any(word in low for word in _OOM_WORDS)


def _process_failure(proc: Any, timeout: float, log: Path) -> str:
    lines = [line.strip() for line in proc.tail.splitlines() if line.strip()]
    stage = next((line.split("] ", 1)[1] for line in reversed(lines)
                  if line.startswith("kb_bench: [") and "] " in line), "")
    where = f" (last stage: {stage})" if stage else ""
    if proc.timed_out:
        return (f"bench timed out after {timeout:g} s{where} (the whole process tree was killed; "
                "raise bench.timeout=S)")
    last = lines[-1] if lines else ""
    note = str(getattr(proc, "note", "") or "")
    if proc.rc is not None and (proc.rc < 0 or proc.rc == 137):
        sig = -proc.rc if proc.rc < 0 else signal.SIGKILL
        if note:
            return f"out of memory: bench {note}{where}; log: {log}"
        if sig == signal.SIGKILL:
            return (f"bench killed by SIGKILL{where}: probably out of memory (the kernel's OOM killer; "
                    f"the problem may not fit this machine); log: {log}")
        return f"bench killed by signal {sig}{where}; log: {log}"
    if _names_oom(last) or note:
        return f"out of memory: {note or last[:300]}{where}; log: {log}"
    return f"bench exited with status {proc.rc}{where}: {last[:300] or 'no output'}; log: {log}"


def _fill_from_bench(result: TaskResult, data: dict[str, Any], *, had_solution: bool) -> None:
    result.device = data.get("device")
    result.eager_ms = _num(data.get("eager_ms"))
    result.compile_ms = _num(data.get("compile_ms"))
    result.compile_note = str(data.get("compile_note") or "")
    result.oom = bool(data.get("oom"))
    result.suspect = bool(data.get("suspect"))
    reason = str(data.get("reason") or "")
    if result.suspect and had_solution:  # correct outputs, but timings nobody can trust: shown, never counted
        result.correct = data.get("correct") is not False
        result.reason = reason
        result.runtime_ms = _num(data.get("runtime_ms"))
        result.speedup_vs_eager = _num(data.get("speedup_vs_eager"))
        result.speedup_vs_compile = _num(data.get("speedup_vs_compile"))
        return
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
    from looptree.engine.run.engine import Engine

    result = TaskResult(task=problem.stem, number=problem.number, project=str(project))
    try:
        engine = await Engine.create(project, config)
    except LooptreeError as exc:
        result.error, result.reason = True, str(exc)
        return result, False
    from looptree.engine.run.headless import drive

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
                  solutions: str | None = None, protocol: str | None = None) -> dict[str, Any]:
    """summary.json: per task ``task, correct, suspect, runtime_ms, speedup_vs_eager, reason, oom``…,
    and fast_p, where a task counts only when correct and not suspect.

    ``protocol="kernelbench"`` uses upstream's thresholds (p in 0, 0.5, 0.8, 1, 1.5, 2) and adds
    its geometric mean speed-up over correct tasks, so the figures sit beside published tables.
    """
    rows = [asdict(r) for r in results]
    kb = protocol == "kernelbench"
    ps = KB_FAST_P if kb else FAST_P
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
            "suspect": sum(1 for r in results if r.suspect),
        },
        "protocol": protocol or "looptree",
        "kernelbench_commit": KB_COMMIT,
        "results": rows,
        "fast_p": None,
        "fast_p_vs_compile": None,
    }
    if judged:  # fast_p over every task: one without a candidate verdict counts as not solved
        summary["fast_p"] = fast_p(rows, "speedup_vs_eager", ps)
        summary["fast_p_vs_compile"] = fast_p(rows, "speedup_vs_compile", ps)
        if kb:
            summary["geomean_speedup_correct"] = geomean_speedup(rows, "speedup_vs_eager")
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
        if r.suspect:
            correct = "SUSPECT"
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
        parts = [f"fast_{p} = {v:.2f} ({round(v * n)}/{n})" for p, v in values.items()]
        lines.append(f"{label} " + "  ".join(parts))
    suspects = summary.get("counts", {}).get("suspect", 0)
    if suspects:
        lines.append(f"suspect: {suspects} task(s) correct but with timings the bench could not trust; "
                     "not counted in fast_p")
    if summary.get("protocol") == "kernelbench":
        lines.append(f"protocol: KernelBench ({KB_COMMIT[:12]}): mean of 100 trials, fp tolerance by precision; "
                     f"geometric mean speed-up of correct tasks {summary.get('geomean_speedup_correct') or 0:.3g}x")
    lines.append(f"summary: {Path(summary['out']) / 'summary.json'}, {Path(summary['out']) / 'summary.csv'}")
    return "\n".join(lines) + "\n"
