"""The engine: builds one run's parts, drives the search to its end, and closes everything after.

Why this shape: every decision is written to the event log before it is acted on, and every
step first asks the folded state whether it already happened. So a run that was killed at any
moment resumes by folding its log and calling `run()` again: finished nodes are skipped,
replies already paid for are re-applied rather than re-asked, and interrupted evaluations are
redone from a fresh worktree.

Each job has its own class; this one only wires them and owns the run's start and end:
  lifecycle.py           open a new run directory, or take one back (lock, fold, orphans)
  scheduler.py           the phases, fix chains, forks and kills as asyncio tasks
  node_runner.py         one node: ask the agent, apply and commit its edits, evaluate, record
  ideas.py               the brainstorm on the baseline
  prompt_context.py      what an agent is told about the tree
  artifacts.py           metrics.csv and each node's files (views of the log)
  commands.py            the control commands (pause, stop, prune, kill, fork, budget)
  telemetry_recorder.py  GPU samples while the run lives
  gate.py, worktrees.py, context.py: the pause/stop switch, serialized git, the shared record
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from pathlib import Path
from typing import Any

from looptree.engine.agents.calls import AgentCaller, make_backend
from looptree.engine.agents.components import template_hashes
from looptree.engine.agents.llm.budget import TokenBudget
from looptree.engine.agents.llm.types import LLMBackend
from looptree.engine.agents.prompts import PromptBuilder, load_templates, scrubber_for
from looptree.engine.cluster.factory import make_executor
from looptree.engine.core.config import Config
from looptree.engine.core.metrics import MetricSpec, parse_header
from looptree.engine.core.schema import SCHEMA_VERSION
from looptree.engine.edits.access import AccessPolicy
from looptree.engine.errors import LooptreeError
from looptree.engine.evaluation.evaluator import Evaluator
from looptree.engine.evaluation.procs import run_limits
from looptree.engine.evaluation.sandbox import resolve_sandbox
from looptree.engine.run.artifacts import RunArtifacts, analysis_text
from looptree.engine.run.commands import CONTROL_POLL_S, CommandHandler
from looptree.engine.run.context import RunContext
from looptree.engine.run.control import ControlTail, control_key
from looptree.engine.run.gate import RunGate
from looptree.engine.run.ideas import brainstorm
from looptree.engine.run.lifecycle import OpenedRun, allocate_run_dir, job_prefix, open_new_run, reopen_run
from looptree.engine.run.node_runner import BenchPlaces, NodeRunner
from looptree.engine.run.scheduler import TreeSearch
from looptree.engine.run.telemetry_recorder import TelemetryRecorder
from looptree.engine.run.worktrees import Worktrees
from looptree.engine.vcs.guard import RepoGuard
from looptree.gpu.devices.slots import DeviceSlots, parse_devices
from looptree.gpu.devices.telemetry import TelemetryBackend, choose_backend

#: How long the end of a run waits for each helper to close (the executor, the LLM client).
EXECUTOR_CLOSE_S = 120
CLIENT_CLOSE_S = 10


class Engine:
    def __init__(self, opened: OpenedRun, *, backend: LLMBackend | None = None,
                 telemetry: TelemetryBackend | None = None) -> None:
        config, state, run_dir, project_dir = opened.config, opened.state, opened.run_dir, opened.project_dir
        self.project_dir = project_dir
        self.run_dir = run_dir
        self.config = config
        self.repo = opened.repo
        self.log = opened.log
        self.state = state
        self.lock = opened.lock
        self.gate = RunGate(paused=state.paused)
        self.ctx = RunContext(project_dir=project_dir, run_dir=run_dir, config=config, repo=opened.repo,
                              log=opened.log, state=state, gate=self.gate, job_prefix=job_prefix(run_dir))
        self.log.add_listener(state.apply)  # the fold sees every event first, then any printer
        self.listeners = self.log.listeners

        # -- agents: prompts (scrubbed), the LLM backend, the token budget -----------------
        self.policy = AccessPolicy(config.project.writable, config.project.readonly, config.project.hidden,
                                   config.project.hidden_needed)
        # The one redaction step before any prompt: hidden text and secret values never reach an LLM.
        scrubber = scrubber_for(project_dir, self.policy, [config.agent.api_key_env],
                                cassette=project_dir / config.agent.cassette)
        self.prompts = PromptBuilder(load_templates(config.prompts.model_dump(), project_dir), config.project.goal,
                                     self.policy, config.project.writable, config.project.readonly, scrub=scrubber)
        self.backend = backend or make_backend(config, project_dir, run_dir)
        cap = state.max_tokens if state.max_tokens is not None else config.budget.max_tokens
        self.budget = TokenBudget(cap, config.budget.max_cost_usd)
        if state.tokens_spent or state.cost_usd:
            self.budget.restore(state.tokens_spent, state.cost_usd, prompt_tokens=state.prompt_tokens,
                                completion_tokens=state.completion_tokens)
        mark_used = getattr(self.backend, "mark_used", None)
        if mark_used is not None:  # a resumed replay must not hand out replies already consumed
            mark_used(state.consumed_replies)
        self.caller = AgentCaller(self.backend, self.budget, config, self.emit)

        # -- evaluation: limits, devices, containment, the executor ------------------------
        limits, self.memory = run_limits(config)
        self.evaluator = Evaluator(config, limits)
        self.telemetry = telemetry if telemetry is not None else choose_backend(config.gpu.telemetry)
        # On a Ray cluster (engine/cluster/) the workers hold the devices; this machine's are not used.
        remote = config.cluster.backend == "ray"
        self.gpu_devices = [] if config.bench.device == "cpu" or remote else parse_devices(config.gpu.devices,
                                                                                          self.telemetry)
        if config.bench.device == "gpu" and not self.gpu_devices and not remote:
            raise LooptreeError(f"bench.device = 'gpu' but no GPU can be used: "
                                f"{getattr(self.telemetry, 'reason', None) or 'gpu.devices selects none'}")
        # Every project command runs contained (engine/evaluation/sandbox.py); "on" refuses to start without it.
        self.containment = resolve_sandbox(config, hide=[opened.repo.root, project_dir], telemetry=self.telemetry,
                                           devices=self.gpu_devices)
        self.evaluator.sandbox = self.containment.sandbox
        self.executor = make_executor(config, telemetry=self.telemetry, sandbox=self.containment.sandbox,
                                      say=lambda text: self.emit("message", text=text))
        self.evaluator.executor = self.executor
        # After every stage: the user's refs, config, hooks and this run's branches as before.
        self.guard = RepoGuard(opened.repo, project_dir, self.ctx.run_branches, self.emit)
        self.evaluator.guard = self.guard
        slots = DeviceSlots(self.gpu_devices or "none")
        places = BenchPlaces(slots=slots, gpu_devices=self.gpu_devices, remote=remote, telemetry=self.telemetry,
                             cpu_slots=asyncio.Semaphore(config.bench.concurrency))

        # -- the parts that drive the run -------------------------------------------------
        worktrees = Worktrees(opened.repo, self.policy)
        self.artifacts = RunArtifacts(run_dir, state)
        agents = asyncio.Semaphore(config.search.num_workers)
        runner = NodeRunner(self.ctx, worktrees=worktrees, artifacts=self.artifacts, prompts=self.prompts,
                            caller=self.caller, evaluator=self.evaluator, policy=self.policy, places=places,
                            agents=agents)
        self.search = TreeSearch(self.ctx, runner=runner, worktrees=worktrees, guard=self.guard, caller=self.caller,
                                 brainstorm=functools.partial(brainstorm, self.ctx, worktrees=worktrees,
                                                              prompts=self.prompts, caller=self.caller,
                                                              artifacts=self.artifacts, agents=agents))
        # Only lines signed with this run's key are obeyed (engine/run/control.py).
        self.control = ControlTail(run_dir / "control.jsonl", key=control_key(run_dir))
        self.commands = CommandHandler(self.ctx, control=self.control, budget=self.budget, search=self.search,
                                       request_stop=self.request_stop)
        self.telemetry_recorder = TelemetryRecorder(self.ctx, backend=self.telemetry, devices=self.gpu_devices,
                                                    slots=slots, remote=remote)
        self._main_task: asyncio.Task[Any] | None = None
        self._cleaned = False

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        return self.ctx.emit(type_, **fields)

    @property
    def stop_reason(self) -> str | None:
        return self.gate.stop_reason

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    async def create(cls, project_dir: Path, config: Config, *, run_dir: Path | None = None,
                     backend: LLMBackend | None = None, telemetry: TelemetryBackend | None = None) -> Engine:
        """Start run N+1: numbered run dir, lock, baseline snapshot, `run_started`."""
        opened = await open_new_run(project_dir, config, run_dir, check_endpoints=backend is None)
        with opened.undone_on_error():
            engine = cls(opened, backend=backend, telemetry=telemetry)
            engine.emit("run_started", run=int(opened.run_dir.name), project=str(opened.project_dir),
                        config=config.to_dict(), base_commit=opened.base_commit, pid=os.getpid(),
                        host=socket.gethostname(), prompt_components=template_hashes(engine.prompts.templates),
                        sandbox=engine.containment.record, memory=engine.memory.record(),
                        schema_version=SCHEMA_VERSION)
            engine.say_containment()
        return engine

    @classmethod
    async def reopen(cls, run_dir: Path, *, backend: LLMBackend | None = None,
                     telemetry: TelemetryBackend | None = None) -> Engine:
        """Resume: take the lock, fold the log, clear what the dead engine left (processes, worktrees)."""
        opened = await reopen_run(run_dir, check_endpoints=backend is None)
        with opened.undone_on_error():
            engine = cls(opened, backend=backend, telemetry=telemetry)
            engine.control.offset = opened.state.control_offset  # commands already acted on are not replayed
            engine.emit("engine_attached", pid=os.getpid(), orphans_killed=opened.orphans_killed,
                        worktrees_removed=opened.worktrees_removed, sandbox=engine.containment.record,
                        memory=engine.memory.record(), schema_version=SCHEMA_VERSION)
            engine.say_containment()
            await engine.artifacts.rewrite_metrics_csv()
        return engine

    def say_containment(self) -> None:
        """One line at start when project commands run uncontained (the reason is in the event too)."""
        if self.containment.line:
            self.emit("message", text=self.containment.line)

    # -- the run -----------------------------------------------------------------------------
    async def run(self) -> str:
        """Drive the run to its end; return the finish reason (also written as `run_finished`)."""
        control = asyncio.create_task(self.commands.loop(), name="control")
        telemetry_stop = asyncio.Event()
        telemetry = asyncio.create_task(self.telemetry_recorder.run(telemetry_stop), name="telemetry")
        self._main_task = asyncio.create_task(self._search_on_executor(), name="search")
        reason: str
        try:
            reason = await self._main_task
        except asyncio.CancelledError:
            reason = self.gate.stop_reason or "stopped by user"
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                await asyncio.shield(self._cleanup(control, telemetry, telemetry_stop))
                self._finish(reason)
                raise
        except LooptreeError as exc:
            reason = f"error: {exc}"
        except Exception as exc:
            await self._cleanup(control, telemetry, telemetry_stop)
            self._finish(f"error: internal: {exc!r}")
            raise
        await self._cleanup(control, telemetry, telemetry_stop)
        self._finish(reason)
        return reason

    async def _search_on_executor(self) -> str:
        """Start the executor (a resume's first act there: orphans on every worker die), then search."""
        await self.executor.start(self.ctx.job_prefix)
        if self.config.cluster.backend == "ray":
            workers = self.executor.workers()
            self.emit("message", text=f"cluster: {len(workers)} Ray bench worker(s): " + ", ".join(
                f"{w['host']}/{w['device']}" for w in workers))
        return await self.search.run()

    def request_stop(self, reason: str = "stopped by user", offset: int | None = None) -> None:
        """End the run cleanly (it can be resumed); `reason` says who asked: the user, or a signal."""
        if not self.gate.stop(reason):
            return  # already stopping: a second stop must not interrupt the clean-up
        self.emit("stop_requested", reason=reason, control_offset=self.control.offset if offset is None else offset)
        if self._main_task is not None:
            self._main_task.cancel()

    def handle_command(self, command: dict[str, Any]) -> None:
        """One control command, as if read from the control file (experiments and tests call this)."""
        self.commands.handle(command)

    async def _cleanup(self, control: asyncio.Task[Any], telemetry: asyncio.Task[Any],
                       telemetry_stop: asyncio.Event) -> None:
        """Stop the helpers (control, telemetry, forks, the LLM client) before the log closes."""
        if self._cleaned:
            return
        self._cleaned = True
        self.gate.stop("finishing")
        control.cancel()
        telemetry_stop.set()
        telemetry.cancel()
        await asyncio.gather(control, telemetry, self.search.cancel_forks(), return_exceptions=True)
        # Nothing of the run may outlive it, on this machine or on any worker; a helper that
        # will not close is given up on rather than holding the run open.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.executor.close(), EXECUTOR_CLOSE_S)
        with contextlib.suppress(Exception):
            self.telemetry.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.caller.aclose(), CLIENT_CLOSE_S)

    def _finish(self, reason: str) -> None:
        if self.log.closed:
            return
        if self.state.finished is None:
            best = self.state.best()
            self.emit("run_finished", reason=reason, tokens=self.budget.spent, evaluated=self.state.evaluated,
                      best=best.id if best else None)
        self.log.close()
        self.lock.release()


__all__ = ["CONTROL_POLL_S", "Engine", "MetricSpec", "allocate_run_dir", "analysis_text", "job_prefix",
           "parse_header"]
