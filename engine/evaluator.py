"""Evaluate one candidate: build → check → bench (× repeats) in its worktree.

Why one module: the order of stages, what each failure means and which reason the fix step
reads are one policy. Processes come from `engine.procs` (timeouts, whole-tree kill, rlimits);
the metrics CSV is tailed live through `engine.metrics.CsvTail`, each new row becoming an event
while the bench still runs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.config import Config
from engine.errors import MetricsError
from engine.metrics import Aggregate, CsvTail, MetricSpec, aggregate
from engine.procs import Limits, ProcResult, run_command

Emit = Callable[..., Any]


@dataclass
class EvalOutcome:
    ok: bool
    stage: str | None = None  # the failing stage
    reason: str | None = None
    log_tail: str = ""
    aggregate: Aggregate | None = None
    specs: list[MetricSpec] | None = None
    rows: list[list[dict[str, float]]] = field(default_factory=list)


def _tail_text(result: ProcResult, lines: int = 40) -> str:
    return "\n".join(result.tail.splitlines()[-lines:])


def _failure_reason(stage: str, command: str, result: ProcResult, timeout: float) -> str:
    if result.timed_out:
        return f"{stage} timed out after {timeout:g} s (`{command}`; the whole process tree was killed)"
    last = next((l.strip() for l in reversed(result.tail.splitlines()) if l.strip()), "")
    why = f": {last[:300]}" if last else ""
    if result.rc is not None and result.rc < 0:
        return f"{stage} crashed with signal {-result.rc} (`{command}`){why}"
    return f"{stage} failed with exit status {result.rc} (`{command}`){why}"


@dataclass
class Evaluator:
    config: Config
    limits: Limits = field(default_factory=Limits)

    def _env(self, node_id: str, run_dir: Path, metrics_path: Path, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPTREE_JOB", "GIT_"))}
        env.update({
            "LOOPTREE_NODE": node_id,
            "LOOPTREE_RUN_DIR": str(run_dir),
            "LOOPTREE_METRICS": str(metrics_path),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(extra)
        return env

    async def evaluate(self, *, node_id: str, project_dir: Path, node_dir: Path, run_dir: Path,
                       job_tag: str, emit: Emit, device_env: dict[str, str] | None = None,
                       device: Any = None, repeats: int | None = None) -> EvalOutcome:
        """Run every stage; emit stage/metric events; return what happened (never raises on project failure)."""
        cfg = self.config
        node_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = project_dir / cfg.bench.metrics
        env = self._env(node_id, run_dir, metrics_path, device_env or {})
        stages = [("build", cfg.build.command, cfg.build.timeout), ("check", cfg.check.command, cfg.check.timeout)]
        for stage, command, timeout in stages:
            if not command:
                continue
            emit("stage_started", id=node_id, stage=stage, device=device)
            result = await run_command(command, cwd=project_dir, env=env, timeout=timeout,
                                       log_path=node_dir / f"{stage}.log", job_tag=f"{job_tag}:{stage}", limits=self.limits)
            ok = result.rc == 0 and not result.timed_out
            reason = None if ok else _failure_reason(stage, command, result, timeout)
            emit("stage_finished", id=node_id, stage=stage, ok=ok, rc=result.rc,
                 duration_s=round(result.duration_s, 4), reason=reason)
            if not ok:
                return EvalOutcome(False, "timeout" if result.timed_out else stage, reason, _tail_text(result))
        return await self._bench(node_id, project_dir, node_dir, job_tag, env, emit, device, repeats or cfg.bench.repeats)

    async def _bench(self, node_id: str, project_dir: Path, node_dir: Path, job_tag: str, env: dict[str, str],
                     emit: Emit, device: Any, repeats: int) -> EvalOutcome:
        cfg = self.config.bench
        metrics_path = project_dir / cfg.metrics
        all_rows: list[list[dict[str, float]]] = []
        specs: list[MetricSpec] | None = None
        raw_csv = node_dir / "bench_metrics.csv"
        for repeat in range(repeats):
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
                    emit("metric_row", id=node_id, repeat=repeat, iteration=iteration, values=row, columns=columns)

            async def on_tick() -> None:
                publish(tail.poll())

            emit("stage_started", id=node_id, stage="bench", repeat=repeat, device=device)
            started = time.monotonic()
            result = await run_command(cfg.command, cwd=project_dir, env=env, timeout=cfg.timeout,
                                       log_path=node_dir / "bench.log", job_tag=f"{job_tag}:bench{repeat}",
                                       limits=self.limits, on_tick=on_tick)
            ok = result.rc == 0 and not result.timed_out
            reason = None if ok else _failure_reason("bench", cfg.command, result, cfg.timeout)
            if ok:
                try:
                    publish(tail.poll())
                    publish(tail.finish())
                    if not metrics_path.exists():
                        raise MetricsError(f"bench command did not write {cfg.metrics}")
                    if not rows:
                        raise MetricsError(f"metrics file {cfg.metrics} has a header but no rows")
                except MetricsError as exc:
                    ok, reason = False, str(exc)
                    emit("stage_finished", id=node_id, stage="bench", repeat=repeat, ok=False, rc=result.rc,
                         duration_s=round(time.monotonic() - started, 4), reason=reason)
                    return EvalOutcome(False, "metrics", reason, _tail_text(result))
            emit("stage_finished", id=node_id, stage="bench", repeat=repeat, ok=ok, rc=result.rc,
                 duration_s=round(time.monotonic() - started, 4), reason=reason)
            if not ok:
                return EvalOutcome(False, "timeout" if result.timed_out else "bench", reason, _tail_text(result))
            if specs is None:
                specs = tail.specs
            elif tail.specs and [s.column for s in tail.specs] != [s.column for s in specs]:
                reason = "metrics columns changed between repeats"
                return EvalOutcome(False, "metrics", reason, "")
            all_rows.append(rows)
            try:
                with open(raw_csv, "a") as fh:
                    if repeat == 0:
                        fh.write("repeat,iteration," + ",".join(s.column for s in specs or []) + "\n")
                    for row in rows:
                        fh.write(f"{repeat},," + ",".join(repr(row.get(s.column)) for s in specs or []) + "\n")
            except OSError:
                pass
        assert specs is not None
        return EvalOutcome(True, aggregate=aggregate(all_rows, specs), specs=specs, rows=all_rows)
