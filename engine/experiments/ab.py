"""`looptree ab`: run a suite of tasks under a control and a test configuration, pair by pair.

Why pairs, run in-process one after the other: both arms of a pair optimize the same task, so
task difficulty cancels out of the comparison, and alternating which arm goes first cancels any
drift of the machine (or of a shared endpoint) over the experiment. Runs never overlap: their
benchmarks would disturb each other's timings. Each run is an ordinary looptree run in its task
project (`<task>/.looptree/runs/<N>/`: own budget, event log, branches), so `tree`, `show`,
`replay` and `runs` work on it as on any other.

The experiment's own directory holds its event log (`events.jsonl`: which run each arm got,
each finished arm's result, each finished pair with the statistics after it), `pairs.csv` and
`verdict.json`. Crash safety comes from the log: an arm's run directory is recorded before the
run starts, so `--resume` continues an interrupted run with `looptree resume`'s machinery
(orphans killed, no node evaluated twice) and never reruns a finished arm or pair.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looptree.engine.core.config import (
    CONFIG_NAME,
    Config,
    ExperimentSection,
    ValidationError,
    _ExperimentOnly,
    _format_error,
    apply_overrides,
    layer_data,
    merge_tables,
    resolve_config,
)
from looptree.engine.core.events import EventLog, RunLock, read_events
from looptree.engine.errors import ConfigError, LooptreeError
from looptree.engine.experiments.catalog import RunRef, summarize_run
from looptree.engine.experiments.sprt import PairOutcome, Sequential

ARMS = ("control", "test")
FORBIDDEN = ("project", "bench")
PAIR_COLUMNS = ["pair", "task", "first", *[f"{arm}_{key}" for arm in ARMS for key in
                ("success", "ratio", "tokens", "cost_usd", "gpu_hours", "wall_s", "status", "run_dir")],
                "decision_after"]


@dataclass
class Task:
    name: str
    project: Path


@dataclass
class Suite:
    kind: str  # "folder" or "kernelbench"
    spec: str
    tasks: list[Task]


@dataclass
class ArmResult:
    """What one run contributes to the experiment."""

    success: bool = False
    ratio: float | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    gpu_hours: float = 0.0
    wall_s: float | None = None
    status: str = ""
    run_dir: str | None = None
    best_node: str | None = None
    error: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ArmResult:
        return cls(success=bool(row.get("success")), ratio=row.get("best_ratio"), tokens=int(row.get("tokens") or 0),
                   cost_usd=float(row.get("cost_usd") or 0.0), gpu_hours=float(row.get("gpu_hours") or 0.0),
                   wall_s=row.get("wall_s"), status=str(row.get("status") or ""), run_dir=row.get("run_dir"),
                   best_node=row.get("best_node"))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- suite and arms


def load_suite(spec: str, out_dir: Path) -> Suite:
    """A folder of task projects (each sub-folder with a looptree.toml) or kernelbench:DATASET:LEVEL:TASKS."""
    if spec.startswith("kernelbench:"):
        parts = spec.split(":")
        if len(parts) != 4 or not all(parts[1:]):
            raise LooptreeError(f"--suite {spec!r}: expected kernelbench:DATASET:LEVEL:TASKS (e.g. kernelbench:KernelBench:1:1-20)")
        from looptree.gpu.kernelbench.problems import (
            list_problems,
            make_task_project,
            normalize_level,
        )

        level = normalize_level(parts[2])
        problems = list_problems(parts[1], level, parts[3])
        tasks = [Task(p.stem, make_task_project(p, out_dir / "tasks" / p.stem)) for p in problems]
        return Suite("kernelbench", spec, tasks)
    root = Path(spec).expanduser().resolve()
    if not root.is_dir():
        raise LooptreeError(f"--suite {spec}: not a directory (a folder of task projects, or kernelbench:DATASET:LEVEL:TASKS)")
    tasks = [Task(d.name, d) for d in sorted(root.iterdir()) if d.is_dir() and (d / CONFIG_NAME).is_file()]
    if not tasks:
        raise LooptreeError(f"--suite {spec}: no task projects (sub-folders with a {CONFIG_NAME})")
    return Suite("folder", spec, tasks)


def experiment_settings(control: Path, test: Path, overrides: list[str]) -> ExperimentSection:
    """The [experiment] tables of both overlays (they must agree), then experiment.* on the command line."""
    tables = []
    for overlay in (control, test):
        data, _ = layer_data(overlay)
        for table in FORBIDDEN:
            if table in data:
                raise ConfigError(f"{overlay.name}: [{table}] cannot be overlaid (both arms must measure the same task the same way)")
        table = data.get("experiment", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{overlay.name}: experiment must be a table")
        tables.append(table)
    for key in set(tables[0]) & set(tables[1]):
        if tables[0][key] != tables[1][key]:
            raise ConfigError(f"experiment.{key} differs between {control.name} and {test.name}; "
                              f"set it in one of them or on the command line")
    merged = merge_tables(tables[0], tables[1])
    cli = apply_overrides({}, [o for o in overrides if o.split("=", 1)[0].strip().startswith("experiment.")])
    merged = merge_tables(merged, cli.get("experiment", {}))
    try:
        return _ExperimentOnly.model_validate({"experiment": merged}).experiment
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, "experiment settings")) from None


def arm_config(task: Task, overlay: Path, overrides: list[str]) -> Config:
    """The task's own config, then the arm's overlay (table by table), then KEY=VALUE."""
    return resolve_config(task.project, None, overrides, layers=[overlay], forbid_in_layers=FORBIDDEN).config


# --------------------------------------------------------------------------- the experiment


@dataclass
class Experiment:
    control: Path
    test: Path
    suite: Suite
    out_dir: Path
    overrides: list[str]
    settings: ExperimentSection
    json_mode: bool = False
    say: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    arm_started: dict[tuple[str, str], str] = field(default_factory=dict)
    arm_done: dict[tuple[str, str], ArmResult] = field(default_factory=dict)
    pairs_done: dict[int, dict[str, Any]] = field(default_factory=dict)
    interrupted: bool = False
    log: EventLog | None = None
    _engine: Any = None

    # -- state from the log -----------------------------------------------------------------
    def fold(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            kind = e.get("type")
            if kind == "arm_started":
                self.arm_started[(e["task"], e["arm"])] = e["run_dir"]
            elif kind == "arm_finished":
                self.arm_done[(e["task"], e["arm"])] = ArmResult(**e["result"])
            elif kind == "pair_finished":
                self.pairs_done[int(e["pair"])] = e

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        assert self.log is not None
        return self.log.append(type_, **fields)

    # -- one arm --------------------------------------------------------------------------
    async def run_arm(self, pair: int, task: Task, arm: str) -> ArmResult:
        key = (task.name, arm)
        if key in self.arm_done:
            return self.arm_done[key]
        overlay = self.control if arm == "control" else self.test
        from looptree.engine.run.engine import Engine, allocate_run_dir

        run_dir = Path(self.arm_started[key]) if key in self.arm_started else None
        engine = None
        if run_dir is not None and (run_dir / "events.jsonl").exists():
            events = read_events(run_dir / "events.jsonl")
            finished = [e for e in events if e.get("type") == "run_finished"]
            attached = [e for e in events if e.get("type") == "engine_attached"]
            done = finished and finished[-1]["seq"] > (attached[-1]["seq"] if attached else -1)
            if done and finished[-1].get("reason") != "stopped by user":
                return self._finish_arm(pair, task, arm, run_dir)
            self.say(f"ab: pair {pair + 1}: {arm} on {task.name}: resuming {run_dir}")
            engine = await Engine.reopen(run_dir)
        else:
            if run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()  # allocated, then the experiment died before the run's first event
            try:
                config = arm_config(task, overlay, self.overrides)
            except LooptreeError as exc:
                return self._failed_arm(pair, task, arm, str(exc))
            run_dir = allocate_run_dir(task.project)
            self.emit("arm_started", pair=pair, task=task.name, arm=arm, run_dir=str(run_dir))
            self.arm_started[key] = str(run_dir)
            self.say(f"ab: pair {pair + 1}: {arm} on {task.name} -> {run_dir}")
            try:
                engine = await Engine.create(task.project, config, run_dir=run_dir)
            except LooptreeError as exc:
                return self._failed_arm(pair, task, arm, str(exc))
        self._engine = engine
        try:
            reason = await engine.run()
        finally:
            self._engine = None
        if self.interrupted:
            raise _Interrupted(reason)
        return self._finish_arm(pair, task, arm, run_dir)

    def _finish_arm(self, pair: int, task: Task, arm: str, run_dir: Path) -> ArmResult:
        rule = "kernelbench" if self.suite.kind == "kernelbench" else "verdict"
        row = summarize_run(RunRef(run_dir, str(self.out_dir), arm, task.name, rule))
        result = ArmResult.from_row(row)
        if not row.get("baseline_ok"):
            result.error = f"baseline not measured ({row.get('status')})"
            result.ratio = None
        self.arm_done[(task.name, arm)] = result
        self.emit("arm_finished", pair=pair, task=task.name, arm=arm, result=result.to_dict())
        return result

    def _failed_arm(self, pair: int, task: Task, arm: str, reason: str) -> ArmResult:
        result = ArmResult(status=f"error: {reason}", error=reason)
        self.arm_done[(task.name, arm)] = result
        self.emit("arm_finished", pair=pair, task=task.name, arm=arm, result=result.to_dict())
        self.say(f"ab: pair {pair + 1}: {arm} on {task.name} could not run: {reason}")
        return result

    # -- the loop -------------------------------------------------------------------------
    def spent_tokens(self) -> int:
        return sum(r.tokens for r in self.arm_done.values())

    async def run(self, resume: bool) -> dict[str, Any]:
        seq = Sequential(self.settings.alpha, self.settings.beta, self.settings.min_effect)
        tasks = self.suite.tasks
        limit = min(len(tasks), self.settings.max_pairs or len(tasks))
        if not resume:
            self.emit("experiment_started", control=str(self.control), test=str(self.test), suite=self.suite.spec,
                      suite_kind=self.suite.kind, tasks=[t.name for t in tasks], overrides=self.overrides,
                      settings=self.settings.model_dump(), max_pairs=limit)
        else:
            self.emit("experiment_resumed", pairs_done=len(self.pairs_done))
        self.say(f"ab: {len(tasks)} task(s), at most {limit} pair(s); alpha={self.settings.alpha:g} "
                 f"beta={self.settings.beta:g} min_effect={self.settings.min_effect:g}; out {self.out_dir}")
        stop_reason = "suite exhausted" if limit == len(tasks) else "max_pairs reached"
        for index in range(limit):
            if seq.decision is not None:
                stop_reason = f"decided by the {seq.decided_by} test"
                break
            if self.settings.max_tokens and self.spent_tokens() >= self.settings.max_tokens:
                stop_reason = "experiment token budget spent"
                break
            task = tasks[index]
            if index in self.pairs_done:
                seq.update(_outcome(self.arm_done[(task.name, "control")], self.arm_done[(task.name, "test")]))
                continue
            order = ARMS if index % 2 == 0 else tuple(reversed(ARMS))
            results = {}
            for arm in order:
                results[arm] = await self.run_arm(index, task, arm)
            seq.update(_outcome(results["control"], results["test"]))
            stats = seq.to_dict()
            event = self.emit("pair_finished", pair=index, task=task.name, first=order[0],
                              control=results["control"].to_dict(), test=results["test"].to_dict(),
                              decision=seq.decision, statistics=stats)
            self.pairs_done[index] = event
            self.say(_pair_line(index, task.name, results, seq))
            if self.json_mode:
                print(json.dumps({"pair": index, "task": task.name, "control": results["control"].to_dict(),
                                  "test": results["test"].to_dict(), "decision": seq.decision}), flush=True)
            self.write_pairs_csv()
        else:
            if seq.decision is not None:
                stop_reason = f"decided by the {seq.decided_by} test"
        verdict = self.verdict(seq, stop_reason, len(tasks))
        (self.out_dir / "verdict.json").write_text(json.dumps(verdict, indent=2) + "\n")
        self.write_pairs_csv()
        self.emit("experiment_finished", verdict=verdict["verdict"], pairs=verdict["pairs"], reason=stop_reason)
        return verdict

    def verdict(self, seq: Sequential, reason: str, n_tasks: int) -> dict[str, Any]:
        decision = seq.decision or "inconclusive"
        totals = {}
        for arm in ARMS:
            results = [self.arm_done[(self.suite.tasks[i].name, arm)] for i in sorted(self.pairs_done)]
            ratios = [r.ratio for r in results if r.ratio]
            totals[arm] = {"overlay": str(self.control if arm == "control" else self.test), "runs": len(results),
                           "successes": sum(r.success for r in results),
                           "success_rate": round(sum(r.success for r in results) / len(results), 6) if results else None,
                           "tokens": sum(r.tokens for r in results),
                           "dollars": round(sum(r.cost_usd for r in results), 6),
                           "gpu_hours": round(sum(r.gpu_hours for r in results), 6),
                           "wall_s": round(sum(r.wall_s or 0 for r in results), 3),
                           "geomean_ratio": round(math.exp(sum(math.log(x) for x in ratios) / len(ratios)), 6) if ratios else None,
                           "errors": sum(1 for r in results if r.error)}
        return {"verdict": decision, "pairs": seq.pairs, "stopped_early": seq.decision is not None and seq.pairs < n_tasks,
                "reason": reason, "tasks": n_tasks, "suite": self.suite.spec,
                "control": str(self.control), "test": str(self.test),
                "statistics": seq.to_dict(), "settings": self.settings.model_dump(), "arms": totals}

    def write_pairs_csv(self) -> None:
        path = self.out_dir / "pairs.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=PAIR_COLUMNS)
            writer.writeheader()
            for index in sorted(self.pairs_done):
                e = self.pairs_done[index]
                row: dict[str, Any] = {"pair": index, "task": e["task"], "first": e.get("first"),
                                       "decision_after": e.get("decision") or ""}
                for arm in ARMS:
                    result = e[arm]
                    for key in ("success", "ratio", "tokens", "cost_usd", "gpu_hours", "wall_s", "status", "run_dir"):
                        row[f"{arm}_{key}"] = result.get(key)
                writer.writerow(row)
        tmp.replace(path)


class _Interrupted(Exception):
    pass


def _outcome(control: ArmResult, test: ArmResult) -> PairOutcome:
    return PairOutcome(control.success, test.success, control.ratio, test.ratio)


def _fmt_arm(result: ArmResult) -> str:
    if result.error:
        return "not measured"
    ratio = f"{result.ratio:.3g}x" if result.ratio else "-"
    return f"{'success' if result.success else 'no gain'} {ratio} {result.tokens} tok"


def _pair_line(index: int, task: str, results: dict[str, ArmResult], seq: Sequential) -> str:
    s, m = seq.success, seq.speedup
    cs = m.confidence_sequence()
    cs_text = "unbounded" if not all(math.isfinite(x) for x in cs) else f"[{math.exp(cs[0]):.3g}x, {math.exp(cs[1]):.3g}x]"
    return (f"ab: pair {index + 1} {task}: control {_fmt_arm(results['control'])} | test {_fmt_arm(results['test'])}"
            f" || SPRT wins {s.wins}:{s.losses} llr {s.llr_test:.2f}/{s.llr_control:.2f} in [{s.lower:.2f}, {s.upper:.2f}]"
            f"; mixture {math.exp(min(m.log_evidence(), 50)):.3g}/{m.threshold:.3g}, CS {cs_text}"
            f"; decision {seq.decision or '-'}")


# --------------------------------------------------------------------------- entry point


def run_ab(control: str, test: str, suite: str | None, out: str | None, overrides: list[str], *,
           resume: bool = False, json_mode: bool = False) -> int:
    if resume and not out:
        raise LooptreeError("--resume needs --out DIR (the experiment to continue)")
    out_dir = Path(out or "ab_experiment").expanduser().resolve()
    log_path = out_dir / "events.jsonl"
    if resume:
        if not log_path.exists():
            raise LooptreeError(f"{out_dir} has no experiment to resume (no events.jsonl)")
        events = read_events(log_path)
        started = next((e for e in events if e.get("type") == "experiment_started"), None)
        if started is None:
            raise LooptreeError(f"{log_path} has no experiment_started event")
        control, test = started["control"], started["test"]
        suite = started["suite"]
        overrides = list(started.get("overrides", []))
    else:
        if log_path.exists():
            raise LooptreeError(f"{out_dir} already holds an experiment; use --resume --out {out} or another --out")
        if not suite:
            raise LooptreeError("--suite is required (a folder of task projects, or kernelbench:DATASET:LEVEL:TASKS)")
        events = []
    control_path, test_path = Path(control).expanduser().resolve(), Path(test).expanduser().resolve()
    for path in (control_path, test_path):
        if not path.is_file():
            raise LooptreeError(f"{path}: no such overlay file")
    settings = experiment_settings(control_path, test_path, overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    assert suite is not None
    the_suite = load_suite(suite, out_dir)
    run_overrides = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("experiment.")]
    for task in the_suite.tasks[:1]:  # a bad overlay or KEY=VALUE fails before any run
        for overlay in (control_path, test_path):
            arm_config(task, overlay, run_overrides)
    lock = RunLock(out_dir)
    lock.acquire()
    try:
        log = EventLog(out_dir, checked=False)  # an experiment's own vocabulary (arm_started, pair_finished, …)
        exp = Experiment(control_path, test_path, the_suite, out_dir, run_overrides, settings, json_mode=json_mode, log=log)
        exp.fold(events)
        verdict = asyncio.run(_drive(exp, resume))
    finally:
        lock.release()
    if verdict is None:
        print(f"looptree: ab: interrupted; continue with `looptree ab --resume --out {out_dir}`", file=sys.stderr)
        return 130
    if json_mode:
        print(json.dumps(verdict), flush=True)
    else:
        print(render_verdict(verdict))
    return 0


async def _drive(exp: Experiment, resume: bool) -> dict[str, Any] | None:
    """SIGINT/SIGTERM stop the current run cleanly; `--resume` continues it later."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if exp.interrupted:
            import os

            os._exit(130)
        exp.interrupted = True
        if exp._engine is not None:
            exp._engine.handle_command({"cmd": "stop"})

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await exp.run(resume)
    except _Interrupted:
        return None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def render_verdict(v: dict[str, Any]) -> str:
    early = ", stopped early" if v["stopped_early"] else ""
    lines = [f"verdict: {v['verdict']} after {v['pairs']} pair(s) of {v['tasks']} ({v['reason']}{early})"]
    for arm in ARMS:
        t = v["arms"][arm]
        ratio = f"{t['geomean_ratio']:.3g}x" if t["geomean_ratio"] else "-"
        lines.append(f"  {arm:7s} successes {t['successes']}/{t['runs']}, geomean speed-up {ratio}, tokens {t['tokens']}, "
                     f"${t['dollars']:.4f}, GPU-hours {t['gpu_hours']:.4f}  ({Path(t['overlay']).name})")
    s, m = v["statistics"]["success"], v["statistics"]["speedup"]
    lines.append(f"  success SPRT: wins {s['wins_test']}:{s['wins_control']}, llr {s['llr_test']:.3f}/{s['llr_control']:.3f}"
                 f" (accept H0 <= {s['lower']:.3f}, reject >= {s['upper']:.3f}; alpha/side {s['alpha_per_side']:g})")
    low, high = m["cs_ratio_low"], m["cs_ratio_high"]
    cs = f"[{low:.3g}x, {high:.3g}x]" if low is not None and high is not None else "unbounded"
    lines.append(f"  speed-up mixture SPRT: evidence {m['evidence']:.4g} of {m['threshold']:g}; "
                 f"{100 * (1 - m['alpha']):g}% confidence sequence for test/control {cs}")
    return "\n".join(lines)


__all__ = ["ArmResult", "Experiment", "arm_config", "experiment_settings", "load_suite", "run_ab"]
