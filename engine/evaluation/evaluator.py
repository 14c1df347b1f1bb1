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

Forged metrics: the engine keeps its own record of every bench run (`evidence.RunRecord`: when
each row arrived, how long the process ran, whether the file was rewritten or grew after the
process ended) and `engine.evidence` sets the candidate's beside the parent's; evidence of rows
the bench did not write makes the outcome `suspect` (never credited, never best).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looptree.engine.core.config import Config
from looptree.engine.core.metrics import Aggregate, CsvTail, MetricSpec, aggregate
from looptree.engine.core.terminal import safe_text
from looptree.engine.errors import LooptreeError, MetricsError
from looptree.engine.evaluation.evidence import RunRecord, shape_of, suspect_reason
from looptree.engine.evaluation.executor import LocalExecutor
from looptree.engine.evaluation.procs import Limits, ProcResult, run_command
from looptree.engine.evaluation.safefiles import (
    ProtectedFiles,
    UnsafePath,
    open_beneath,
    relative_beneath,
    unlink_beneath,
)
from looptree.engine.evaluation.sandbox import Sandbox, command_env

Emit = Callable[..., Any]
KEY_VARIABLES = ("OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENROUTER_API_KEY", "CBORG_API_KEY",
                 "DEEPSEEK_API_KEY", "LOCAL_API_KEY", "ANTHROPIC_API_KEY", "LOOPTREE_TEST_API_KEY")


_LEASE: contextvars.ContextVar[Any] = contextvars.ContextVar("looptree_lease", default=None)
"""The executor lease of the node this task evaluates (a context variable: nodes run concurrently)."""


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
    suspect: str | None = None  # evidence that the metrics were not written by the bench
    shape: dict[str, Any] | None = None  # evidence.shape_of the candidate's runs, for its children


def _tail_text(result: ProcResult, lines: int = 40) -> str:
    return "\n".join(result.tail.splitlines()[-lines:])


def printable(text: str) -> str:
    """A reason quoting the command's output, as it may be printed: escape sequences the code under
    test chose are shown, never obeyed by the user's terminal (engine/core/terminal.py)."""
    return safe_text(text)


def _failure_reason(stage: str, command: str, result: ProcResult, timeout: float) -> str:
    reason = _plain_reason(stage, command, result, timeout)
    return printable(f"{reason} ({result.note})" if result.note else reason)


def _plain_reason(stage: str, command: str, result: ProcResult, timeout: float) -> str:
    if result.timed_out:
        return f"{stage} timed out after {timeout:g} s (`{command}`; the whole process tree was killed)"
    last = next((line.strip() for line in reversed(result.tail.splitlines()) if line.strip()), "")
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


class _NoWatch:
    """No guard (eval-only, tests of the evaluator alone): nothing is checked."""

    problem: str | None = None

    async def __aenter__(self) -> _NoWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


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
    record: RunRecord | None = None
    metrics_tail: CsvTail | None = None
    worker: dict[str, Any] | None = None  # where it ran (executor lease): both sides of a pair must match


class _SafeTail(CsvTail):
    """``CsvTail`` on a file in the candidate's worktree, read without ever following a link.

    Each read opens the file component by component with ``O_NOFOLLOW`` (``safefiles``) and
    hands the tail the descriptor's ``/proc/self/fd`` name, so what is parsed is the regular file
    the bench wrote, not a symlink swapped in to make the engine read the user's hidden files,
    home or another run (into the metrics and the failure reason, both of which reach prompts),
    nor a FIFO that would block the engine's ``open``.
    """

    def __init__(self, root: Path, rel: str, *, absent: Path, label: str) -> None:
        super().__init__(root / rel, label=label)
        self._root, self._rel, self._real, self._absent = root, rel, root / rel, absent

    def _read(self, final: bool) -> list[dict[str, float]]:
        try:
            fd = open_beneath(self._root, self._rel)
        except UnsafePath as exc:
            raise MetricsError(printable(f"metrics file {exc}")) from None
        try:
            # None: not there (yet); `absent` is a name nobody creates, the tail's "missing" case.
            self.path = self._absent if fd is None else Path(f"/proc/self/fd/{fd}")
            return super()._read(final)
        finally:
            self.path = self._real
            if fd is not None:
                os.close(fd)

    def size_now(self) -> int | None:
        try:
            fd = open_beneath(self._root, self._rel)
        except (UnsafePath, OSError):
            return None
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)


def _metrics_tail(project_dir: Path, metrics: str, node_dir: Path) -> CsvTail:
    """The tail of the bench's metrics file: link-safe inside the worktree, plain for a host path."""
    rel = relative_beneath(project_dir, metrics)
    if rel is None or not Path("/proc/self/fd").is_dir():
        return CsvTail(project_dir / metrics)
    return _SafeTail(project_dir, rel, absent=node_dir / ".looptree-no-metrics" / "absent", label=Path(rel).name)


MAX_LIVE_ROWS = 2000
"""``metric_row`` events per bench run, at most: every row still counts (and is kept in
bench_metrics.csv), but a bench writing 100,000 rows per repeat must not grow the event log,
which every resume, attach and `tree` reads, by megabytes per node (the dashboard keeps 2,000)."""


class _StopBench(Exception):
    """Raised from the bench's tick hook to have run_command kill the bench (its metrics are already bad)."""


def _late_bytes(run: _BenchRun | None) -> None:
    """Record bytes that reached a finished run's metrics file after its process tree had ended."""
    if run is None or run.record is None or run.metrics_tail is None:
        return
    size = run.metrics_tail.size_now()
    if size is not None and size > run.metrics_tail.consumed:
        run.record.late_bytes = max(run.record.late_bytes, size - run.metrics_tail.consumed)


@dataclass
class Evaluator:
    config: Config
    limits: Limits = field(default_factory=Limits)
    # engine.guard.RepoGuard: after each command, the user's repository is checked (and restored).
    guard: Any = None
    sandbox: Sandbox | None = None  # None: commands run uncontained (sandbox.mode "off" or impossible)
    # engine.cluster: where commands run (None: on this machine). Every stage of a node runs on the
    # one worker its lease holds, so both sides of an interleaved pair share a device.
    executor: Any = None
    _protect_cache: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    # Per worktree being evaluated: its read-only files as checked out, verified after every command.
    _intact: dict[str, ProtectedFiles] = field(default_factory=dict, repr=False)

    def _executor(self) -> Any:
        if self.executor is None:
            self.executor = LocalExecutor()
        return self.executor

    @staticmethod
    def _worker() -> dict[str, Any] | None:
        """The ``worker`` of the node being evaluated (node, host, device, uuid), for stage events."""
        lease = _LEASE.get()
        return dict(lease.worker) if lease is not None else None

    async def _command(self, command: str, **options: Any) -> ProcResult:
        """``run_command`` through the node's lease (on this machine or a cluster worker)."""
        lease = _LEASE.get()
        if lease is None:
            return await run_command(command, **options)
        return await lease.run(command, **options)

    def _watch(self, node_id: str, stage: str) -> Any:
        return self.guard.watch(node_id, stage) if self.guard is not None else _NoWatch()

    def _tampered(self, project_dir: Path, stage: str) -> str | None:
        """Why the command just run left the worktree's read-only files changed, or None."""
        intact = self._intact.get(str(project_dir))
        return intact.reason(stage) if intact is not None else None

    def _env(self, node_id: str, run_dir: Path, metrics_path: Path, extra: dict[str, str]) -> dict[str, str]:
        # Agent-written code runs here: an allow-listed environment (engine.sandbox), never the LLM
        # API keys the run pays with nor anything that leads to the run directory.
        env = command_env(os.environ, extra_names=self.config.sandbox.env,
                          secret_names={self.config.agent.api_key_env, *KEY_VARIABLES})
        env.update({
            "LOOPTREE_NODE": node_id,
            "LOOPTREE_METRICS": str(metrics_path),
            "PYTHONDONTWRITEBYTECODE": "1",
        })
        env.update(extra)
        return env

    def _private(self, node_dir: Path, side: str) -> Path | None:
        """The sandboxed HOME and caches of one side of a node: kept across its stages, never shared."""
        return node_dir / f"sandbox-{side}" if self.sandbox is not None else None

    def _protected(self, project_dir: Path) -> tuple[str, ...]:
        """The read-only binds of a sandboxed command: the worktree's readonly and hidden files."""
        return self._readonly_files(project_dir) if self.sandbox is not None else ()

    def _readonly_files(self, project_dir: Path) -> tuple[str, ...]:
        """The project's readonly and hidden files in this worktree: read-only to its commands.

        So a candidate's code cannot rewrite bench.py or check.py for its next repeat. Listed once
        per worktree (the policy's walk prunes folders no pattern reaches).
        """
        key = str(project_dir)
        if key not in self._protect_cache:
            if len(self._protect_cache) > 512:  # one entry per worktree path; the lists never go stale
                self._protect_cache.clear()     # (readonly and hidden files are the same in every commit)
            from looptree.engine.edits.access import AccessPolicy

            proj = self.config.project
            policy = AccessPolicy(proj.writable, proj.readonly, proj.hidden, proj.hidden_needed)
            try:
                files = [rel for rel, kind in policy.visible_files(project_dir).items() if kind == "readonly"]
                files += policy.hidden_files(project_dir)
            except OSError:
                files = []
            self._protect_cache[key] = tuple(files)
        return self._protect_cache[key]

    async def discard_private(self, node_dir: Path) -> None:
        """Remove a node's sandboxed HOMEs and caches once it is evaluated (they can be large)."""
        for side in ("candidate", "parent"):
            await asyncio.to_thread(shutil.rmtree, node_dir / f"sandbox-{side}", True)

    async def _stage(self, stage: str, command: str, timeout: float, *, node_id: str, project_dir: Path,
                     log_path: Path, job_tag: str, env: dict[str, str], emit: Emit, device: Any,
                     quiet: bool = False) -> tuple[bool, str | None, ProcResult]:
        async with self._watch(node_id, stage) as watch:  # the guard's snapshot is taken before the start
            if not quiet:
                emit("stage_started", id=node_id, stage=stage, device=device, worker=self._worker())
            result = await self._command(command, cwd=project_dir, env=env, timeout=timeout, log_path=log_path,
                                       job_tag=job_tag, limits=self.limits, sandbox=self.sandbox,
                                       private_dir=self._private(log_path.parent, "parent" if quiet else "candidate"),
                                       protect=self._protected(project_dir),
                                       device=device if isinstance(device, int) else None)
        tampered = self._tampered(project_dir, stage)
        ok = result.rc == 0 and not result.timed_out and not watch.problem and not tampered
        reason = None if ok else watch.problem or tampered or _failure_reason(stage, command, result, timeout)
        if not quiet:
            emit("stage_finished", id=node_id, stage=stage, ok=ok, rc=result.rc,
                 duration_s=round(result.duration_s, 4), reason=reason, worker=self._worker())
        return ok, reason, result

    async def evaluate(self, *, node_id: str, device: Any = None, **kwargs: Any) -> EvalOutcome:
        """Hold one worker of the executor for every stage of the node, then evaluate it there."""
        if _LEASE.get() is not None:  # already inside a lease (a caller holding one for several calls)
            return await self._evaluate(node_id=node_id, device=device, **kwargs)
        try:
            async with self._executor().lease(node_id, device if isinstance(device, int) else None) as lease:
                token = _LEASE.set(lease)
                try:
                    return await self._evaluate(node_id=node_id, device=device, **kwargs)
                finally:
                    _LEASE.reset(token)
        except LooptreeError as exc:  # no worker to run on: this node fails, the run goes on
            return EvalOutcome(False, "worker", str(exc))

    async def _evaluate(self, *, project_dir: Path, reference_dir: Path | None = None, **kwargs: Any) -> EvalOutcome:
        """Snapshot each worktree's read-only files before its first command, then run the stages."""
        dirs = [d for d in (project_dir, reference_dir) if d is not None]
        for folder in dirs:
            files = await asyncio.to_thread(self._readonly_files, folder)
            self._intact[str(folder)] = await asyncio.to_thread(ProtectedFiles, folder, files)
        try:
            return await self._stages(project_dir=project_dir, reference_dir=reference_dir, **kwargs)
        finally:
            for folder in dirs:
                self._intact.pop(str(folder), None)

    async def _stages(self, *, node_id: str, project_dir: Path, node_dir: Path, run_dir: Path,
                        job_tag: str, emit: Emit, device_env: dict[str, str] | None = None,
                        device: Any = None, repeats: int | None = None,
                        reference_dir: Path | None = None,
                        expected_shape: dict[str, Any] | None = None) -> EvalOutcome:
        """Run every stage; emit stage/metric events; return what happened (never raises on project failure).

        `expected_shape` is the reference node's recorded `shape` (evidence.shape_of), the yardstick
        for forged rows when no parent runs are timed beside the candidate.
        """
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
                                 repeats or cfg.bench.repeats, reference_dir if ref_env else None, ref_env,
                                 expected_shape)

    async def _bench_once(self, node_id: str, project_dir: Path, node_dir: Path, job_tag: str, env: dict[str, str],
                          emit: Emit, device: Any, repeat: int, side: str) -> _BenchRun:
        cfg = self.config.bench
        metrics_path = project_dir / cfg.metrics
        rel = relative_beneath(project_dir, cfg.metrics)
        try:  # never through a folder the candidate turned into a link (that would delete outside)
            if rel is None:
                metrics_path.unlink(missing_ok=True)
            else:
                unlink_beneath(project_dir, rel)
        except (OSError, UnsafePath) as exc:  # a directory or an unwritable path left by the candidate
            return _BenchRun(False, stage="metrics",
                             reason=printable(f"could not remove the old metrics file {cfg.metrics} before the bench: {exc}"))
        preexisting = metrics_path.exists() or metrics_path.is_symlink()
        tail = _metrics_tail(project_dir, cfg.metrics, node_dir)
        rows: list[dict[str, float]] = []
        columns: list[str] = []

        def publish(new_rows: list[dict[str, float]]) -> None:
            nonlocal columns
            if tail.specs and not columns:
                columns = [s.column for s in tail.specs]
            first = len(tail.rows) - len(new_rows)  # new rows are the tail's last ones (after a restart too)
            for k, row in enumerate(new_rows):
                index = first + k
                iteration = tail.iterations[index] if 0 <= index < len(tail.iterations) else len(rows)
                arrived = round(tail.arrived[index] - started, 4) if 0 <= index < len(tail.arrived) else None
                rows.append(row)
                if len(rows) <= MAX_LIVE_ROWS:
                    emit("metric_row", id=node_id, repeat=repeat, iteration=iteration, values=row, columns=columns,
                         side=side, arrived_s=arrived)
                elif len(rows) == MAX_LIVE_ROWS + 1:
                    emit("message", text=f"{node_id}: more than {MAX_LIVE_ROWS} metric rows in one bench run "
                                         f"({side}, repeat {repeat}): the rest are counted but not shown live")

        metrics_error: list[MetricsError] = []

        async def on_tick() -> None:
            try:
                publish(tail.poll())
            except MetricsError as exc:  # a malformed or hostile file: stop this bench, fail only this node
                metrics_error.append(exc)
                raise _StopBench from None

        log_name = "bench.log" if side == "candidate" else "parent_bench.log"
        started = time.monotonic()
        try:
            async with self._watch(node_id, "bench") as watch:  # the guard's snapshot is taken before the start
                emit("stage_started", id=node_id, stage="bench", repeat=repeat, device=device, side=side,
                     worker=self._worker())
                started = time.monotonic()
                result = await self._command(cfg.command, cwd=project_dir, env=env, timeout=cfg.timeout,
                                           log_path=node_dir / log_name, job_tag=f"{job_tag}:{side[0]}{repeat}",
                                           limits=self.limits, on_tick=on_tick, sandbox=self.sandbox,
                                           private_dir=self._private(node_dir, side),
                                           protect=self._protected(project_dir),
                                           device=device if isinstance(device, int) else None)
        except _StopBench:  # run_command killed the whole tree before re-raising
            result = ProcResult(rc=None, timed_out=False, cancelled=True, duration_s=time.monotonic() - started,
                                log_path=node_dir / log_name, tail="")
        ran_s = time.monotonic() - started  # by the engine's clock, before the final read
        tampered = self._tampered(project_dir, "bench")
        ok = result.rc == 0 and not result.timed_out and not watch.problem and not tampered
        reason = None if ok else watch.problem or tampered or _failure_reason("bench", cfg.command, result, cfg.timeout)
        stage = None if ok else ("bench" if watch.problem or tampered else "timeout" if result.timed_out else "bench")
        if metrics_error:
            ok, reason, stage = False, str(metrics_error[0]), "metrics"
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
             duration_s=round(time.monotonic() - started, 4), reason=reason, side=side, worker=self._worker())
        record = None
        if ok and tail.specs:
            lead = tail.specs[0].column
            record = RunRecord(side=side, iterations=list(tail.iterations), lead=[r[lead] for r in tail.rows],
                               arrived_s=[round(t - started, 4) for t in tail.arrived], duration_s=ran_s,
                               reads=tail.reads, restarts=tail.restarts, preexisting=preexisting)
        # The file as it ended is what counts (a restarted tail has dropped the rows it replaced).
        return _BenchRun(ok, list(tail.rows) if ok else rows, tail.specs, stage, reason, _tail_text(result),
                         record, tail, self._worker())

    async def _bench(self, node_id: str, project_dir: Path, node_dir: Path, job_tag: str, env: dict[str, str],
                     emit: Emit, device: Any, repeats: int, reference_dir: Path | None,
                     ref_env: dict[str, str] | None, expected_shape: dict[str, Any] | None = None) -> EvalOutcome:
        cfg = self.config.bench
        cand_rows: list[list[dict[str, float]]] = []
        parent_rows: list[list[dict[str, float]]] = []
        records: dict[str, list[RunRecord]] = {"candidate": [], "parent": []}
        last: dict[str, _BenchRun] = {}  # each side's previous run: did its file grow after it ended?
        specs: list[MetricSpec] | None = None
        target = repeats
        cap = max(repeats, cfg.max_repeats) if reference_dir is not None else repeats
        verdict: dict[str, Any] | None = None
        parent_columns: list[str] | None = None
        while len(cand_rows) < target:
            index = len(cand_rows)
            # Alternate which side goes first (PC CP PC …) so drift does not favour either.
            order = ["parent", "candidate"] if index % 2 == 0 else ["candidate", "parent"]
            for side in order:
                if side == "parent":
                    if reference_dir is None or ref_env is None:
                        continue
                    where, side_env = reference_dir, ref_env
                else:
                    where, side_env = project_dir, env
                _late_bytes(last.get(side))
                run = await self._bench_once(node_id, where, node_dir, job_tag, side_env, emit, device, index, side)
                last[side] = run
                if side == "parent":
                    if not run.ok:  # the parent misbehaving is not the candidate's fault: stop comparing
                        emit("message", text=f"{node_id}: parent bench failed, no interleaved comparison ({run.reason})")
                        reference_dir, parent_rows, cap = None, [], repeats
                        records["parent"] = []
                        target = min(target, cap)
                        continue
                    parent_rows.append(run.rows)
                    parent_columns = parent_columns or ([s.column for s in run.specs] if run.specs else None)
                    if run.record is not None:
                        records["parent"].append(run.record)
                    continue
                if not run.ok:
                    return EvalOutcome(False, run.stage, run.reason, run.tail)
                mine = [s.column for s in run.specs] if run.specs else None
                if reference_dir is not None and parent_columns and mine and mine != parent_columns:
                    # The bench is read-only: the parent's run of it names the columns a node reports.
                    return EvalOutcome(False, "metrics", f"metrics columns {mine} differ from the parent's "
                                                         f"{parent_columns} (the bench decides the columns)", "")
                if specs is None:
                    specs = run.specs
                elif run.specs and [s.column for s in run.specs] != [s.column for s in specs]:
                    return EvalOutcome(False, "metrics", "metrics columns changed between repeats", "")
                cand_rows.append(run.rows)
                if run.record is not None:
                    records["candidate"].append(run.record)
                self._keep_raw(node_dir, index, run.rows, specs or [])
            ran_on = {side: run.worker for side, run in last.items()}
            if reference_dir is not None and len(ran_on) == 2 and ran_on["parent"] != ran_on["candidate"]:
                # A verdict across different hardware compares the machines, not the code: refused.
                emit("message", text=f"{node_id}: no verdict: the parent ran on {ran_on['parent']} and the "
                                     f"candidate on {ran_on['candidate']} (a pair must share its device)")
                reference_dir, parent_rows, cap, verdict = None, [], repeats, None
                records["parent"] = []
                target = min(max(target, len(cand_rows)), cap)
            if len(cand_rows) >= target and reference_dir is not None and specs and len(parent_rows) == len(cand_rows):
                verdict, more = self._judge(parent_rows, cand_rows, specs, repeats, cap)
                target += more
        assert specs is not None
        for run in last.values():  # the last runs get the whole parent/candidate tail as grace
            _late_bytes(run)
        suspect = suspect_reason(records["candidate"], records["parent"], specs, expected_shape)
        if suspect:
            emit("message", text=f"{node_id}: SUSPECT metrics, not credited: {suspect}")
        return EvalOutcome(True, aggregate=aggregate(cand_rows, specs), specs=specs, rows=cand_rows,
                           parent_rows=parent_rows, verdict=verdict, suspect=suspect,
                           shape=shape_of(records["candidate"], specs))

    def _judge(self, parent_rows: list[list[dict[str, float]]], cand_rows: list[list[dict[str, float]]],
               specs: list[MetricSpec], first: int, cap: int) -> tuple[dict[str, Any], int]:
        """Verdict on the leading metric from per-repeat medians, and how many more pairs to run."""
        from looptree.engine.evaluation.sequential import look_level
        from looptree.engine.evaluation.stats import adaptive_repeats, compare, noise_floor

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
