"""Evaluate one candidate: build → check → bench (× repeats) in its worktree.

Why one module: the order of stages, what each failure means and which reason the fix step
reads are one policy. Processes come from `engine.procs` (timeouts, whole-tree kill, rlimits);
the metrics CSV is tailed live through `engine.metrics.CsvTail`, each new row becoming an event
while the bench still runs.

Acceptance under noise: when a reference (the parent's worktree) is given, parent and candidate
bench runs alternate back to back (P C C P P C …, so slow drift hits both sides alike), and
`engine.stats.compare` decides "better" / "no significant change" / "worse" on the leading metric
(by default a signed-rank test on the back-to-back pairs). Close calls get more repeats, up to
`bench.max_repeats`, each look at its own level from `engine.sequential` (alpha spending). The
parent's runs against themselves give the A/A noise figure recorded beside the verdict.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from looptree.engine.config import Config
from looptree.engine.errors import MetricsError
from looptree.engine.metrics import Aggregate, CsvTail, MetricSpec, aggregate
from looptree.engine.procs import Limits, ProcResult, run_command

Emit = Callable[..., Any]
KEY_VARIABLES = ("OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENROUTER_API_KEY", "CBORG_API_KEY",
                 "DEEPSEEK_API_KEY", "LOCAL_API_KEY", "ANTHROPIC_API_KEY", "LOOPTREE_TEST_API_KEY")


@dataclass
class EvalOutcome:
    ok: bool
    stage: str | None = None  # the failing stage
    reason: str | None = None
    log_tail: str = ""
    aggregate: Aggregate | None = None
    specs: list[MetricSpec] | None = None
    rows: list[list[dict[str, float]]] = field(default_factory=list)
    parent_rows: list[list[dict[str, float]]] = field(default_factory=list)
    verdict: dict[str, Any] | None = None


def _tail_text(result: ProcResult, lines: int = 40) -> str:
    return "\n".join(result.tail.splitlines()[-lines:])


def _failure_reason(stage: str, command: str, result: ProcResult, timeout: float) -> str:
    if result.timed_out:
        return f"{stage} timed out after {timeout:g} s (`{command}`; the whole process tree was killed)"
    last = next((l.strip() for l in reversed(result.tail.splitlines()) if l.strip()), "")
    why = f": {last[:300]}" if last else ""
    signum = -result.rc if result.rc is not None and result.rc < 0 else (
        result.rc - 128 if result.rc is not None and 128 < result.rc < 160 else None)  # the shell's 128+N
    if signum is not None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "unknown"
        return f"{stage} crashed with signal {signum} ({name}) (`{command}`){why}"
    return f"{stage} failed with exit status {result.rc} (`{command}`){why}"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class _BenchRun:
    ok: bool
    rows: list[dict[str, float]] = field(default_factory=list)
    specs: list[MetricSpec] | None = None
    stage: str | None = None
    reason: str | None = None
    tail: str = ""


@dataclass
class Evaluator:
    config: Config
    limits: Limits = field(default_factory=Limits)

    def _env(self, node_id: str, run_dir: Path, metrics_path: Path, extra: dict[str, str]) -> dict[str, str]:
        # Agent-written code runs here: it must not see the LLM API keys the run pays with.
        secret = {self.config.agent.api_key_env, *KEY_VARIABLES} - {""}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LOOPTREE_JOB", "GIT_")) and k not in secret}
        env.update({
            "LOOPTREE_NODE": node_id,
            "LOOPTREE_RUN_DIR": str(run_dir),
            "LOOPTREE_METRICS": str(metrics_path),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(extra)
        return env

    async def _stage(self, stage: str, command: str, timeout: float, *, node_id: str, project_dir: Path,
                     log_path: Path, job_tag: str, env: dict[str, str], emit: Emit, device: Any,
                     quiet: bool = False) -> tuple[bool, str | None, ProcResult]:
        if not quiet:
            emit("stage_started", id=node_id, stage=stage, device=device)
        result = await run_command(command, cwd=project_dir, env=env, timeout=timeout, log_path=log_path,
                                   job_tag=job_tag, limits=self.limits)
        ok = result.rc == 0 and not result.timed_out
        reason = None if ok else _failure_reason(stage, command, result, timeout)
        if not quiet:
            emit("stage_finished", id=node_id, stage=stage, ok=ok, rc=result.rc,
                 duration_s=round(result.duration_s, 4), reason=reason)
        return ok, reason, result

    async def evaluate(self, *, node_id: str, project_dir: Path, node_dir: Path, run_dir: Path,
                       job_tag: str, emit: Emit, device_env: dict[str, str] | None = None,
                       device: Any = None, repeats: int | None = None,
                       reference_dir: Path | None = None) -> EvalOutcome:
        """Run every stage; emit stage/metric events; return what happened (never raises on project failure)."""
        cfg = self.config
        node_dir.mkdir(parents=True, exist_ok=True)
        env = self._env(node_id, run_dir, project_dir / cfg.bench.metrics, device_env or {})
        stages = [("build", cfg.build.command, cfg.build.timeout), ("check", cfg.check.command, cfg.check.timeout)]
        for stage, command, timeout in stages:
            if not command:
                continue
            ok, reason, result = await self._stage(stage, command, timeout, node_id=node_id, project_dir=project_dir,
                                                   log_path=node_dir / f"{stage}.log", job_tag=f"{job_tag}:{stage}",
                                                   env=env, emit=emit, device=device)
            if not ok:
                return EvalOutcome(False, "timeout" if result.timed_out else stage, reason, _tail_text(result))
        ref_env = None
        if reference_dir is not None and cfg.bench.compare == "interleaved":
            ref_env = self._env(node_id, run_dir, reference_dir / cfg.bench.metrics, device_env or {})
            if cfg.build.command:
                ok, reason, result = await self._stage(
                    "build", cfg.build.command, cfg.build.timeout, node_id=node_id, project_dir=reference_dir,
                    log_path=node_dir / "parent_build.log", job_tag=f"{job_tag}:refbuild", env=ref_env, emit=emit,
                    device=device, quiet=True)
                if not ok:
                    ref_env = None  # the parent no longer builds here: judge without it
                    emit("message", text=f"{node_id}: parent rebuild failed, no interleaved comparison ({reason})")
        return await self._bench(node_id, project_dir, node_dir, job_tag, env, emit, device,
                                 repeats or cfg.bench.repeats, reference_dir if ref_env else None, ref_env)

    async def _bench_once(self, node_id: str, project_dir: Path, node_dir: Path, job_tag: str, env: dict[str, str],
                          emit: Emit, device: Any, repeat: int, side: str) -> _BenchRun:
        cfg = self.config.bench
        metrics_path = project_dir / cfg.metrics
        if metrics_path.exists():
            metrics_path.unlink()
        tail = CsvTail(metrics_path)
        rows: list[dict[str, float]] = []
        columns: list[str] = []

        def publish(new_rows: list[dict[str, float]]) -> None:
            nonlocal columns
            if tail.specs and not columns:
                columns = [s.column for s in tail.specs]
            for row in new_rows:
                iteration = tail.iterations[len(rows)] if len(tail.iterations) > len(rows) else len(rows)
                rows.append(row)
                emit("metric_row", id=node_id, repeat=repeat, iteration=iteration, values=row, columns=columns,
                     side=side)

        async def on_tick() -> None:
            publish(tail.poll())

        log_name = "bench.log" if side == "candidate" else "parent_bench.log"
        emit("stage_started", id=node_id, stage="bench", repeat=repeat, device=device, side=side)
        started = time.monotonic()
        result = await run_command(cfg.command, cwd=project_dir, env=env, timeout=cfg.timeout,
                                   log_path=node_dir / log_name, job_tag=f"{job_tag}:{side[0]}{repeat}",
                                   limits=self.limits, on_tick=on_tick)
        ok = result.rc == 0 and not result.timed_out
        reason = None if ok else _failure_reason("bench", cfg.command, result, cfg.timeout)
        stage = None if ok else ("timeout" if result.timed_out else "bench")
        if ok:
            try:
                publish(tail.poll())
                publish(tail.finish())
                if not metrics_path.exists():
                    raise MetricsError(f"bench command did not write {cfg.metrics}")
                if not rows:
                    raise MetricsError(f"metrics file {cfg.metrics} has a header but no rows")
            except MetricsError as exc:
                ok, reason, stage = False, str(exc), "metrics"
        emit("stage_finished", id=node_id, stage="bench", repeat=repeat, ok=ok, rc=result.rc,
             duration_s=round(time.monotonic() - started, 4), reason=reason, side=side)
        return _BenchRun(ok, rows, tail.specs, stage, reason, _tail_text(result))

    async def _bench(self, node_id: str, project_dir: Path, node_dir: Path, job_tag: str, env: dict[str, str],
                     emit: Emit, device: Any, repeats: int, reference_dir: Path | None,
                     ref_env: dict[str, str] | None) -> EvalOutcome:
        cfg = self.config.bench
        cand_rows: list[list[dict[str, float]]] = []
        parent_rows: list[list[dict[str, float]]] = []
        specs: list[MetricSpec] | None = None
        target = repeats
        cap = max(repeats, cfg.max_repeats) if reference_dir is not None else repeats
        verdict: dict[str, Any] | None = None
        while len(cand_rows) < target:
            index = len(cand_rows)
            # Alternate which side goes first (PC CP PC …) so drift does not favour either.
            order = ["parent", "candidate"] if index % 2 == 0 else ["candidate", "parent"]
            for side in order:
                if side == "parent" and reference_dir is None:
                    continue
                run = await self._bench_once(node_id, reference_dir if side == "parent" else project_dir, node_dir,
                                             job_tag, ref_env if side == "parent" else env, emit, device, index, side)
                if side == "parent":
                    if not run.ok:  # the parent misbehaving is not the candidate's fault: stop comparing
                        emit("message", text=f"{node_id}: parent bench failed, no interleaved comparison ({run.reason})")
                        reference_dir, parent_rows, cap = None, [], repeats
                        target = min(target, cap)
                        continue
                    parent_rows.append(run.rows)
                    continue
                if not run.ok:
                    return EvalOutcome(False, run.stage, run.reason, run.tail)
                if specs is None:
                    specs = run.specs
                elif run.specs and [s.column for s in run.specs] != [s.column for s in specs]:
                    return EvalOutcome(False, "metrics", "metrics columns changed between repeats", "")
                cand_rows.append(run.rows)
                self._keep_raw(node_dir, index, run.rows, specs or [])
            if len(cand_rows) >= target and reference_dir is not None and specs and len(parent_rows) == len(cand_rows):
                verdict, more = self._judge(parent_rows, cand_rows, specs, repeats, cap)
                target += more
        assert specs is not None
        return EvalOutcome(True, aggregate=aggregate(cand_rows, specs), specs=specs, rows=cand_rows,
                           parent_rows=parent_rows, verdict=verdict)

    def _judge(self, parent_rows: list[list[dict[str, float]]], cand_rows: list[list[dict[str, float]]],
               specs: list[MetricSpec], first: int, cap: int) -> tuple[dict[str, Any], int]:
        """Verdict on the leading metric from per-repeat medians, and how many more pairs to run."""
        from looptree.engine.sequential import look_level
        from looptree.engine.stats import adaptive_repeats, compare, noise_floor

        lead = specs[0]
        parent = [_median([r[lead.column] for r in rows]) for rows in parent_rows]
        cand = [_median([r[lead.column] for r in rows]) for rows in cand_rows]
        # The A/A floor (parent against itself) is recorded as a diagnostic, not added to the test:
        # the rank test already accounts for the spread, and counting the noise twice made real 5%
        # speed-ups undetectable (benchmarks/noise_bench.py). A user margin is `bench.min_effect`.
        aa_floor = noise_floor(parent[0::2], parent[1::2]) if len(parent) >= 4 else None
        bench = self.config.bench
        # Adaptive repeats look at the data more than once (first → doubling → cap): each look gets
        # its nominal level from an O'Brien-Fleming alpha-spending plan, so that "better" is called
        # on an unchanged node with probability at most alpha over all looks together.
        # Runs were timed in back-to-back pairs (P C, C P, …): the paired test cancels slow spells
        # that hit both runs of a pair (bench.test, default "paired").
        paired = bench.test == "paired"
        level = look_level(len(cand), first, cap, bench.alpha, paired=paired)
        result = compare(parent, cand, lower_is_better=not lead.higher_is_better, alpha=level,
                         noise_floor=bench.min_effect, paired=paired)
        more = adaptive_repeats(result, max_repeats=cap)
        verdict = {"label": result.label, "metric": lead.column, "ratio": result.ratio, "ci_low": result.ci_low,
                   "ci_high": result.ci_high, "ci_level": result.ci_level, "p_value": result.p_value,
                   "alpha_look": level, "test": bench.test, "min_effect": result.noise_floor, "aa_noise": aa_floor,
                   "n_parent": result.n_parent, "n_candidate": result.n_candidate,
                   "parent_median": _median(parent), "candidate_median": _median(cand)}
        return verdict, more

    @staticmethod
    def _keep_raw(node_dir: Path, repeat: int, rows: list[dict[str, float]], specs: list[MetricSpec]) -> None:
        """Every row of every repeat, for `looptree show` and later analysis."""
        path = node_dir / "bench_metrics.csv"
        try:
            with open(path, "a") as fh:
                if repeat == 0 or not path.exists() or path.stat().st_size == 0:
                    fh.write("repeat,row," + ",".join(f'"{s.column}"' if "," in s.column else s.column for s in specs) + "\n")
                for index, row in enumerate(rows):
                    fh.write(f"{repeat},{index}," + ",".join(repr(row.get(s.column)) for s in specs) + "\n")
        except OSError:
            pass
