"""The run lifecycle: start or resume a run, grow the tree, obey the control channel.

Why this shape: every decision is written to the event log before it is acted on, and every
step first asks the folded state whether it already happened. So a run that was killed at any
moment resumes by folding its log and calling `run()` again: finished nodes are skipped,
replies already paid for are re-applied rather than re-asked, and interrupted evaluations are
redone from a fresh worktree.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Literal

import tomli_w

from looptree.engine.agents.calls import AgentCaller, ideas_failure, make_backend
from looptree.engine.agents.components import call_components, template_hashes
from looptree.engine.agents.llm.budget import TokenBudget
from looptree.engine.agents.llm.types import LLMBackend
from looptree.engine.agents.prompts import (
    PromptBuilder,
    format_results,
    load_templates,
    parse_ideas,
    prompt_hash,
    scrubber_for,
)
from looptree.engine.cluster.factory import make_executor
from looptree.engine.core.config import Config, validate_config
from looptree.engine.core.events import EventLog, RunLock, TelemetryLog
from looptree.engine.core.metrics import MetricSpec, parse_header
from looptree.engine.core.runs import check_resumable, node_dir, runs_root, worktrees_root
from looptree.engine.core.schema import SCHEMA_VERSION
from looptree.engine.core.state import NodeState, RunState
from looptree.engine.edits.access import AccessPolicy, check_patterns
from looptree.engine.edits.blocks import apply_edits, parse_change_reply
from looptree.engine.errors import BudgetExhausted, EditError, GitError, LooptreeError
from looptree.engine.evaluation.evaluator import EvalOutcome, Evaluator
from looptree.engine.evaluation.procs import kill_jobs_with_prefix, run_limits
from looptree.engine.evaluation.sandbox import resolve_sandbox
from looptree.engine.run import search
from looptree.engine.run.control import ControlTail, control_key, new_budget
from looptree.engine.vcs import gitops
from looptree.engine.vcs.guard import RepoGuard
from looptree.gpu.devices.slots import DeviceSlots, env_for, parse_devices
from looptree.gpu.devices.telemetry import TelemetryBackend, choose_backend, sample_loop

CONTROL_POLL_S = 0.2


KILL_RECHECK_S = 1.0  # how often a kill that has not taken effect is repeated

class _Stop(Exception):
    """Raised inside the search when the run must end (budget spent, user stop)."""


def job_prefix(run_dir: Path) -> str:
    """Every process of this run carries LOOPTREE_JOB=<prefix><node>…, so a resume can find orphans."""
    return "lt-" + hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10] + ":"


class Engine:
    def __init__(self, *, project_dir: Path, run_dir: Path, config: Config, repo: gitops.Repo,
                 log: EventLog, state: RunState, lock: RunLock, backend: LLMBackend | None = None,
                 telemetry: TelemetryBackend | None = None) -> None:
        self.project_dir = project_dir
        self.run_dir = run_dir
        self.config = config
        self.repo = repo
        self.log = log
        self.state = state
        self.lock = lock
        self.policy = AccessPolicy(config.project.writable, config.project.readonly, config.project.hidden,
                                   config.project.hidden_needed)
        # The one redaction step before any prompt: hidden text and secret values never reach an LLM.
        self.scrubber = scrubber_for(project_dir, self.policy, [config.agent.api_key_env],
                                     cassette=project_dir / config.agent.cassette)
        self.prompts = PromptBuilder(load_templates(config.prompts.model_dump(), project_dir), config.project.goal, self.policy,
                                     config.project.writable, config.project.readonly, scrub=self.scrubber)
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
        limits, self.memory = run_limits(config)
        self.evaluator = Evaluator(config, limits)
        self.telemetry = telemetry if telemetry is not None else choose_backend(config.gpu.telemetry)
        # On a Ray cluster (engine/cluster/) the workers hold the devices; this machine's are not used.
        self.remote = config.cluster.backend == "ray"
        self.gpu_devices = [] if config.bench.device == "cpu" or self.remote else parse_devices(config.gpu.devices,
                                                                                               self.telemetry)
        if config.bench.device == "gpu" and not self.gpu_devices and not self.remote:
            raise LooptreeError(f"bench.device = 'gpu' but no GPU can be used: "
                                f"{getattr(self.telemetry, 'reason', None) or 'gpu.devices selects none'}")
        # Every project command runs contained (engine/evaluation/sandbox.py); "on" refuses to start without it.
        self.containment = resolve_sandbox(config, hide=[repo.root, project_dir], telemetry=self.telemetry,
                                           devices=self.gpu_devices)
        self.evaluator.sandbox = self.containment.sandbox
        self.executor = make_executor(config, telemetry=self.telemetry, sandbox=self.containment.sandbox,
                                      say=lambda text: self.emit("message", text=text))
        self.evaluator.executor = self.executor
        self.slots = DeviceSlots(self.gpu_devices or "none")
        self.workers = asyncio.Semaphore(config.search.num_workers)
        self.bench_slots = asyncio.Semaphore(config.bench.concurrency)
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self.stop_reason: str | None = None
        self.node_tasks: dict[str, asyncio.Task[Any]] = {}
        self.killed: set[str] = set()
        self.fork_tasks: set[asyncio.Task[Any]] = set()
        # Only lines signed with this run's key are obeyed (engine/run/control.py).
        self.control = ControlTail(run_dir / "control.jsonl", key=control_key(run_dir))
        # After every stage: the user's refs, config, hooks and this run's branches as before.
        self.guard = RepoGuard(repo, project_dir, self._run_branches, self.emit)
        self.evaluator.guard = self.guard
        self.job_prefix = job_prefix(run_dir)
        self._main_task: asyncio.Task[Any] | None = None
        self._git_lock = asyncio.Lock()
        log.add_listener(state.apply)  # the fold sees every event first, then any printer
        self.listeners = log.listeners
        self._cleaned = False
        if state.paused:
            self.unpaused.clear()  # a run paused before a crash or stop stays paused on resume

    # -- events ----------------------------------------------------------------------------
    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        return self.log.append(type_, **fields)

    def say_containment(self) -> None:
        """One line at start when project commands run uncontained (the reason is in the event too)."""
        if self.containment.line:
            self.emit("message", text=self.containment.line)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    async def create(cls, project_dir: Path, config: Config, *, run_dir: Path | None = None,
                     backend: LLMBackend | None = None, telemetry: TelemetryBackend | None = None) -> Engine:
        """Start run N+1: numbered run dir, lock, baseline snapshot, `run_started`."""
        project_dir = project_dir.resolve()
        check_patterns(config, project_dir)
        if backend is None and config.agent.provider != "replay":
            from looptree.engine.agents.llm.providers import resolve_endpoint

            resolve_endpoint(config.agent.provider, config.agent.base_url, config.agent.api_key_env)
            from looptree.engine.agents.llm.preflight import require_endpoints

            # One cheap request per endpoint before the baseline: a wrong port, a base_url
            # without /v1, a refused key or an unknown model is one line and a non-zero exit.
            await require_endpoints(config)
        repo = await gitops.open_repo(project_dir)
        if run_dir is None:
            run_dir = allocate_run_dir(project_dir)
            while await gitops.ref_exists(repo, f"refs/heads/looptree/{run_dir.name}"):
                # .looptree was deleted but the branches remain: never overwrite the user's refs.
                run_dir.rmdir()
                run_dir = allocate_run_dir(project_dir, start=int(run_dir.name) + 1)
        lock = RunLock(run_dir)
        lock.acquire()
        log: EventLog | None = None
        try:
            (run_dir / "config.toml").write_text(tomli_w.dumps(_toml_safe(config.to_dict())))
            base = await gitops.snapshot_working_tree(repo, "looptree: baseline snapshot of the working tree")
            log = EventLog(run_dir)
            state = RunState()
            engine = cls(project_dir=project_dir, run_dir=run_dir, config=config, repo=repo, log=log,
                         state=state, lock=lock, backend=backend, telemetry=telemetry)
            engine.emit("run_started", run=int(run_dir.name), project=str(project_dir), config=config.to_dict(),
                        base_commit=base, pid=os.getpid(), host=socket.gethostname(),
                        prompt_components=template_hashes(engine.prompts.templates),
                        sandbox=engine.containment.record, memory=engine.memory.record(),
                        schema_version=SCHEMA_VERSION)
            engine.say_containment()
            return engine
        except BaseException:
            if log is not None:
                log.close()
            lock.release()
            _discard_empty_run(run_dir)
            raise

    @classmethod
    async def reopen(cls, run_dir: Path, *, backend: LLMBackend | None = None,
                     telemetry: TelemetryBackend | None = None) -> Engine:
        """Resume: take the lock, fold the log, clear what the dead engine left (processes, worktrees)."""
        run_dir = run_dir.resolve()
        if not (run_dir / "events.jsonl").exists():
            raise LooptreeError(f"{run_dir} is not a looptree run directory (no events.jsonl)")
        lock = RunLock(run_dir)
        lock.acquire()
        try:
            state = RunState.load(run_dir)  # the one pass over the log a resume makes
            if state.run is None:
                raise LooptreeError(f"{run_dir}/events.jsonl has no run_started event")
            check_resumable(state, run_dir, "resume")
            config = validate_config(state.config, source=f"{run_dir}/config.toml")
            if backend is None and config.agent.provider != "replay":
                from looptree.engine.agents.llm.preflight import require_endpoints

                await require_endpoints(config)  # a resume against a dead endpoint: say so now
            # The run lives in <project>/.looptree/runs/<N>: trust that over the recorded path,
            # which is wrong once the project was moved or is mounted elsewhere.
            project_dir = run_dir.parents[2]
            repo = await gitops.open_repo(project_dir, create=False)
            killed = await asyncio.to_thread(kill_jobs_with_prefix, job_prefix(run_dir))
            removed = await gitops.prune_worktrees(repo, worktrees_root(run_dir))
            log = EventLog(run_dir)
            engine = cls(project_dir=project_dir, run_dir=run_dir, config=config, repo=repo, log=log,
                         state=state, lock=lock, backend=backend, telemetry=telemetry)
            engine.control.offset = state.control_offset  # commands already acted on are not replayed
            engine.emit("engine_attached", pid=os.getpid(), orphans_killed=killed, worktrees_removed=removed,
                        sandbox=engine.containment.record, memory=engine.memory.record(),
                        schema_version=SCHEMA_VERSION)
            engine.say_containment()
            engine.rewrite_metrics_csv()
            return engine
        except BaseException:
            lock.release()
            raise

    # -- the run ---------------------------------------------------------------------------
    async def run(self) -> str:
        """Drive the run to its end; return the finish reason (also written as `run_finished`)."""
        control = asyncio.create_task(self._control_loop(), name="control")
        telemetry_stop = asyncio.Event()
        telemetry = asyncio.create_task(self._telemetry_loop(telemetry_stop), name="telemetry")
        self._main_task = asyncio.create_task(self._search_on_executor(), name="search")
        reason: str
        try:
            reason = await self._main_task
        except asyncio.CancelledError:
            reason = self.stop_reason or "stopped by user"
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
        await self.executor.start(self.job_prefix)
        if self.remote:
            workers = self.executor.workers()
            self.emit("message", text=f"cluster: {len(workers)} Ray bench worker(s): " + ", ".join(
                f"{w['host']}/{w['device']}" for w in workers))
        return await self._search()

    async def _cleanup(self, control: asyncio.Task[Any], telemetry: asyncio.Task[Any],
                       telemetry_stop: asyncio.Event) -> None:
        """Stop the helpers (control, telemetry, forks, the LLM client) before the log closes."""
        if self._cleaned:
            return
        self._cleaned = True
        self.stop_reason = self.stop_reason or "finishing"
        control.cancel()
        telemetry_stop.set()
        telemetry.cancel()
        for task in list(self.fork_tasks):
            task.cancel()
        await asyncio.gather(control, telemetry, *self.fork_tasks, return_exceptions=True)
        try:  # nothing of the run may outlive it, on this machine or on any worker
            await asyncio.wait_for(self.executor.close(), 120)
        except (TimeoutError, Exception):
            pass
        try:
            self.telemetry.close()
        except Exception:
            pass
        try:
            await asyncio.wait_for(self.caller.aclose(), 10)
        except (TimeoutError, Exception):
            pass

    def _finish(self, reason: str) -> None:
        if self.log._fd < 0:
            return
        if self.state.finished is None:
            best = self.state.best()
            self.emit("run_finished", reason=reason, tokens=self.budget.spent, evaluated=self.state.evaluated,
                      best=best.id if best else None)
        self.log.close()
        self.lock.release()

    async def _search(self) -> str:
        cfg = self.config.search
        try:
            repaired = await self.guard.start()
            if repaired:
                self.emit("message", text=f"WARNING: this run's branches were changed while no stage ran: "
                          f"{'; '.join(repaired)}", alert="repository_changed", changes=repaired)
            base = await self._ensure_baseline()
            if not base.ok:
                raise LooptreeError(f"the baseline failed at {base.failure_stage}: {base.failure_reason}")
            ideas = self.state.ideas
            if ideas is None:
                ideas = await self._brainstorm()
            self._resume_forks()
            for phase in range(cfg.num_phases):
                if phase in self.state.phases_finished:
                    continue
                await self._run_phase(phase, ideas)
                improved = search.improved_since(self.state, self.state.phase_best_before.get(phase))
                best = self.state.best()
                self.emit("phase_finished", phase=phase, best=best.id if best else None, improved=improved)
                patience = cfg.early_stop_patience
                if patience and search.phases_without_improvement(self.state) >= patience and phase + 1 < cfg.num_phases:
                    await self._drain_forks()
                    return self._outcome("early stop")
            await self._drain_forks()
            return self._outcome("phases done")
        except _Stop:
            return self.stop_reason or "stopped by user"
        except BudgetExhausted:
            self.stop_reason = "budget spent"
            await self._drain_forks(cancel=True)
            return "budget spent"

    def _outcome(self, reason: str) -> str:
        """A run whose agent calls all failed did not do its job: end it as an error, with why."""
        failure = self.caller.no_call_succeeded()
        if failure and not self.state.consumed_replies:
            return f"error: {failure}"
        return reason

    async def _drain_forks(self, cancel: bool = False) -> None:
        while self.fork_tasks:
            tasks = list(self.fork_tasks)
            if cancel:
                for task in tasks:
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.fork_tasks.difference_update(tasks)

    async def _ensure_baseline(self) -> NodeState:
        base_id = str(self.state.run)
        if base_id not in self.state.nodes:
            self.emit("node_created", id=base_id, parent=None, phase=-1, kind="baseline")
        node = self.state.nodes[base_id]
        if node.commit is None:
            branch = await gitops.set_branch(self.repo, base_id, self.state.base_commit or "")
            self.emit("edits_applied", id=base_id, files=[], commit=self.state.base_commit, branch=branch)
        if not node.terminal:
            await self._run_node(base_id)
        return self.state.nodes[base_id]

    async def _brainstorm(self) -> list[str]:
        """One ideas call on the baseline; a malformed reply still lets the run go on without seeds."""
        cfg = self.config.search
        wt = worktrees_root(self.run_dir) / "ideas"
        base = self.state.baseline
        assert base is not None
        await self._add_worktree(wt, base.commit or "")
        try:
            user = self.prompts.ideas(self.repo.project_in(wt), cfg.num_samples, self._metric_names(),
                                      format_results(base.metrics, self.state.specs))
        finally:
            await self._remove_worktree(wt)
        messages = self.prompts.messages(user)
        await self._gate()
        async with self.workers:
            self.emit("agent_started", id=None, role="ideas")
            try:
                response = await self.caller.call("ideas", None, messages, prompt_hash(messages))
            except BudgetExhausted:
                raise
            except LooptreeError as exc:
                self.emit("agent_failed", id=None, role="ideas", reason=str(exc))
                self.emit("ideas_generated", ideas=[], reason=str(exc))
                return []
        ideas = parse_ideas(response.text, cfg.num_samples)
        (self.run_dir / "ideas.md").write_text(response.text)
        unread = {} if ideas else {"reason": ideas_failure(response, self.config.agent.max_tokens,
                                                           self.run_dir / "ideas.md")}
        self.emit("ideas_generated", ideas=ideas, text=response.text, usage={"prompt_tokens": response.prompt_tokens,
                                                          "completion_tokens": response.completion_tokens},
                  prompt_components=call_components(self.prompts.templates, "ideas"), **unread)
        return ideas

    async def _run_phase(self, phase: int, ideas: list[str]) -> None:
        cfg = self.config.search
        if phase not in self.state.phases_started:
            if phase == 0:
                parents = [str(self.state.run)] * cfg.num_samples
            else:
                parents = search.choose_parents(self.state, cfg.num_samples, cfg.expand_top)
            best = self.state.best()
            self.emit("phase_started", phase=phase, parents=parents, best_before=best.id if best else None)
        parents = self.state.phases_started[phase]
        existing = search.phase_nodes(self.state, phase)
        for index in range(len(existing), len(parents)):
            parent = parents[index]
            node_id = self.state.next_child_id(parent)
            if phase == 0:
                idea = ideas[index] if index < len(ideas) else None
                self.emit("node_created", id=node_id, parent=parent, phase=0, kind="idea", idea=idea)
            else:
                self.emit("node_created", id=node_id, parent=parent, phase=phase, kind="improve")
        nodes = [n.id for n in search.phase_nodes(self.state, phase)]
        results = await asyncio.gather(*(self._run_chain(n) for n in nodes), return_exceptions=True)
        for result in results:
            if isinstance(result, (BudgetExhausted, _Stop)):
                raise result
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        if self.stop_reason:
            raise _Stop()

    async def _run_chain(self, node_id: str) -> None:
        """A node, then its fix attempts while it fails and attempts remain."""
        current: str | None = node_id
        while current is not None:
            if self.state.nodes[current].pruned and not self.state.nodes[current].terminal:
                self.emit("node_failed", id=current, stage="pruned", reason="pruned by user before it ran")
                return
            await self._run_node(current)
            node = self.state.nodes[current]
            if self.stop_reason or current in self.killed:
                return
            if node.status == "failed":
                if search.may_fix(self.state, node, self.config.search.max_fix_attempts):
                    fix_id = self.state.next_child_id(current)
                    self.emit("node_created", id=fix_id, parent=current, phase=node.phase, kind="fix", fix_of=current)
                    current = fix_id
                    continue
                # After a resume, a fix created before the crash may still be waiting.
                current = next((c for c in node.children if self.state.nodes[c].kind == "fix"), None)
                continue
            current = None

    async def _run_node(self, node_id: str) -> None:
        """One node as a cancellable task, so `kill ID` stops just it."""
        node = self.state.nodes[node_id]
        if node.terminal:
            return
        task = asyncio.create_task(self._process_node(node_id), name=f"node {node_id}")
        self.node_tasks[node_id] = task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and node_id in self.killed and not self.stop_reason:
                if not self.state.nodes[node_id].terminal:
                    during = self.state.nodes[node_id].stage or "agent"
                    self.emit("node_failed", id=node_id, stage="killed", reason=f"killed by user during {during}")
                return
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            self.node_tasks.pop(node_id, None)

    async def _process_node(self, node_id: str) -> None:
        node = self.state.nodes[node_id]
        wt = worktrees_root(self.run_dir) / node_id
        ndir = node_dir(self.run_dir, node_id)
        ndir.mkdir(parents=True, exist_ok=True)
        try:
            if node.commit is None:
                base_commit = self._base_commit_for(node)
                await self._add_worktree(wt, base_commit)
                project = self.repo.project_in(wt)
                if node.reply_text is None:
                    await self._ask_agent(node, project, ndir)
                    if node.status == "failed":
                        return
                if not await self._apply_reply(node, wt, project, ndir):
                    return
            else:
                await self._add_worktree(wt, node.commit)
            await self._evaluate(node, wt, ndir)
        finally:
            await self._remove_worktree(wt)

    def _base_commit_for(self, node: NodeState) -> str:
        parent = self.state.nodes.get(node.parent or "")
        if parent is None:
            return self.state.base_commit or ""
        if parent.commit:
            return parent.commit
        # A fix of a node whose edits never applied starts from that node's own parent.
        return self._base_commit_for(parent)

    async def _ask_agent(self, node: NodeState, project: Path, ndir: Path) -> None:
        role = "fix" if node.kind == "fix" else "optimize"
        user = await asyncio.to_thread(self._user_prompt, node, project)
        messages = self.prompts.messages(user)
        digest = prompt_hash(messages)
        (ndir / "prompt.md").write_text(f"## system\n\n{messages[0]['content']}\n\n## user\n\n{user}\n")
        await self._gate()
        async with self.workers:
            await self._gate()
            self.emit("agent_started", id=node.id, role=role)
            started = time.monotonic()
            try:
                response = await self.caller.call(role, node.id, messages, digest)
            except BudgetExhausted as exc:
                self.emit("agent_failed", id=node.id, role=role, reason=f"budget spent: {exc}")
                raise
            except asyncio.CancelledError:
                self.emit("agent_failed", id=node.id, role=role, reason="cancelled")
                raise
            except LooptreeError as exc:
                self.emit("agent_failed", id=node.id, role=role, reason=str(exc))
                self.emit("node_failed", id=node.id, stage="agent", reason=str(exc))
                return
        try:
            description = parse_change_reply(response.text).description
        except EditError:
            description = response.text.strip().split("\n\n", 1)[0][:300]
        (ndir / "response.md").write_text(response.text)
        self.emit("agent_finished", id=node.id, role=role, text=response.text, description=description,
                  usage={"prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens,
                         "total_tokens": response.prompt_tokens + response.completion_tokens},
                  model=response.model, prompt_hash=digest, finish_reason=response.finish_reason,
                  prompt_components=call_components(self.prompts.templates, role, node.kind),
                  duration_s=round(time.monotonic() - started, 3), cost_usd=response.cost_usd,
                  **({"cut_off": self.caller.cut_off[node.id]} if node.id in self.caller.cut_off else {}))

    def _user_prompt(self, node: NodeState, project: Path) -> str:
        parent = self.state.nodes.get(node.parent or "")
        names = self._metric_names()
        if node.kind == "fix" and parent is not None:
            log_tail = _read_tail(node_dir(self.run_dir, parent.id), parent.failure_stage)
            return self.prompts.fix(project, parent.failure_stage or "unknown", parent.failure_reason or "",
                                    log_tail, parent.reply_text or "")
        results = format_results(parent.metrics if parent else None, self.state.specs)
        if node.kind == "idea" and node.idea:
            return self.prompts.optimize(project, node.idea, parent.id if parent else "?", names, results)
        history = self._history(parent.id) if parent else ""
        others = self._others() if self.config.context.scope == "all" else ""
        return self.prompts.improve(project, parent.id if parent else "?", names, results, history, others,
                                    hint=node.hint)

    def _history(self, node_id: str) -> str:
        lines = []
        for step in self.state.path(node_id):
            what = step.description or step.kind
            lines.append(f"- {step.id}: {what} → {format_results(step.metrics, self.state.specs)}")
        return "\n".join(lines)

    def _others(self) -> str:
        lines = []
        for node_id in self.state.order[-40:]:
            n = self.state.nodes[node_id]
            if n.terminal and n.kind != "baseline":
                result = format_results(n.metrics, self.state.specs) if n.ok else f"failed at {n.failure_stage}"
                lines.append(f"- {n.id}: {(n.description or n.kind)[:120]} → {result}")
        return "\n".join(lines)

    async def _apply_reply(self, node: NodeState, wt: Path, project: Path, ndir: Path) -> bool:
        try:
            parsed = parse_change_reply(node.reply_text or "")
            # Shielded: a thread cannot be cancelled, so let it finish before the worktree goes away.
            result = await asyncio.shield(asyncio.to_thread(apply_edits, project, parsed.edits, self.policy))
        except EditError as exc:
            cut = self.caller.cut_off.get(node.id)  # "no edit blocks" alone hides the real cause
            reason = f"{cut}: {exc}" if cut else str(exc)
            self.emit("edits_rejected", id=node.id, reason=reason)
            self.emit("node_failed", id=node.id, stage="edit", reason=reason)
            return False
        files = sorted(set(result.changed_files) | set(result.created_files))
        message = f"looptree {node.id}: {(node.description or node.kind)[:72]}\n\nnode: {node.id}\nparent: {node.parent}\nkind: {node.kind}\n"
        try:
            commit = await gitops.commit_worktree(wt, [self.repo.prefix + f for f in files], message)
            async with self._git_lock:
                branch = await gitops.set_branch(self.repo, node.id, commit)
        except GitError as exc:
            self.emit("edits_rejected", id=node.id, reason=f"could not commit the change: {exc}")
            self.emit("node_failed", id=node.id, stage="edit", reason=f"could not commit the change: {exc}")
            return False
        try:
            parent_commit = self._base_commit_for(node)
            (ndir / "diff.patch").write_text(await gitops.diff(self.repo, parent_commit, commit))
        except LooptreeError:
            pass
        self.emit("edits_applied", id=node.id, files=files, commit=commit, branch=branch)
        return True

    def _reference_for(self, node: NodeState) -> NodeState | None:
        """The nearest evaluated ancestor: what the candidate is timed against, back to back."""
        current = self.state.nodes.get(node.parent or "")
        while current is not None and not (current.credible and current.commit):  # never a suspect one
            current = self.state.nodes.get(current.parent or "")
        return current

    async def _evaluate(self, node: NodeState, wt: Path, ndir: Path) -> None:
        reference = self._reference_for(node) if self.config.bench.compare == "interleaved" else None
        shape_ref = self._reference_for(node)  # its recorded shape: the yardstick for forged rows
        ref_wt = worktrees_root(self.run_dir) / f"{node.id}.ref"
        await self._gate()
        kind: Literal["gpu", "cpu"] = "gpu" if self.gpu_devices else "cpu"
        try:  # on a cluster the executor's lease is the slot (one bench per worker, its own lock)
            async with self.bench_slots if kind == "cpu" and not self.remote else contextlib.nullcontext():
                async with self.slots.acquire(kind, holder=node.id) as device, \
                        (self._device_lock(node.id, device) if not self.remote else contextlib.nullcontext()):
                    await self._gate()
                    for name in ("build.log", "check.log", "bench.log", "bench_metrics.csv", "parent_bench.log",
                                 "parent_build.log"):
                        (ndir / name).unlink(missing_ok=True)
                    if reference is not None:
                        await self._add_worktree(ref_wt, reference.commit or "")
                    outcome = await self.evaluator.evaluate(
                        node_id=node.id, project_dir=self.repo.project_in(wt), node_dir=ndir, run_dir=self.run_dir,
                        job_tag=f"{self.job_prefix}{node.id}", emit=self.emit, device=device,
                        device_env=env_for(device),
                        reference_dir=self.repo.project_in(ref_wt) if reference is not None else None,
                        expected_shape=shape_ref.shape if shape_ref is not None else None)
        finally:
            await self.evaluator.discard_private(ndir)
            if reference is not None:
                await self._remove_worktree(ref_wt)
        if outcome.verdict is not None and reference is not None:
            outcome.verdict["against"] = reference.id
        self._record_outcome(node, outcome, ndir, device)

    def _device_lock(self, node_id: str, device: int | None) -> Any:
        """The machine-wide lock on the bench's device (gpu/devices/locks.py): two runs, or a run and an
        eval, never time on one device at once; the second waits and says so."""
        from looptree.gpu.devices.locks import hold_async, key_with_telemetry

        key = key_with_telemetry(device, self.telemetry, self.config.bench.concurrency)
        owner = f"looptree run {self.run_dir} node {node_id}"
        return hold_async(key, owner, on_wait=lambda who: self.emit(
            "message", text=f"{node_id}: waiting for device lock {key}, held by {who}"))

    def _record_outcome(self, node: NodeState, outcome: EvalOutcome, ndir: Path, device: Any = None) -> None:
        if not outcome.ok or outcome.aggregate is None or outcome.specs is None:
            (ndir / "failure.txt").write_text(f"{outcome.stage}: {outcome.reason}\n\n{outcome.log_tail}\n")
            self.emit("node_failed", id=node.id, stage=outcome.stage, reason=outcome.reason)
            return
        columns = [s.column for s in outcome.specs]
        if self.state.specs and [s.column for s in self.state.specs] != columns:
            reason = f"metric columns {columns} differ from the run's {[s.column for s in self.state.specs]}"
            self.emit("node_failed", id=node.id, stage="metrics", reason=reason)
            return
        iteration = self.state.evaluated + 1
        self.emit("node_evaluated", id=node.id, iteration=iteration, metrics=outcome.aggregate.values,
                  spread=outcome.aggregate.spread, columns=columns, verdict=outcome.verdict, device=device,
                  repeats=len(outcome.rows), suspect=outcome.suspect, shape=outcome.shape)
        self._append_metrics_csv(node.id)
        (ndir / "analysis.md").write_text(analysis_text(self.state, node.id))

    # -- metrics.csv -----------------------------------------------------------------------
    def _append_metrics_csv(self, node_id: str) -> None:
        path = self.run_dir / "metrics.csv"
        specs = self.state.specs or []
        node = self.state.nodes[node_id]
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as fh:
            if new:
                fh.write(_csv_line(["iteration", "node", *[s.column for s in specs]]))
            fh.write(_csv_line([str(node.iteration), node.id, *[repr(node.metrics[s.column]) if s.column in node.metrics else "" for s in specs]]))

    def rewrite_metrics_csv(self) -> None:
        """After a crash the CSV may miss its last row: rebuild it from the log, which is the truth."""
        path = self.run_dir / "metrics.csv"
        path.unlink(missing_ok=True)
        for node in sorted((n for n in self.state.nodes.values() if n.ok), key=lambda n: n.iteration or 0):
            self._append_metrics_csv(node.id)

    # -- helpers ---------------------------------------------------------------------------
    def _metric_names(self) -> str:
        return ", ".join(s.column for s in self.state.specs) if self.state.specs else "(not measured yet)"

    async def _add_worktree(self, path: Path, commit: str) -> None:
        async with self._git_lock:
            await gitops.add_worktree(self.repo, path, commit)
        # Hidden files stay out of a candidate's worktree unless a command needs them (project.hidden_needed).
        await asyncio.to_thread(self.policy.drop_hidden, self.repo.project_in(path))

    def _run_branches(self) -> dict[str, str]:
        """Every node with a commit keeps `looptree/<ID>` pointing at it (checked by the guard)."""
        return {f"refs/heads/{self.repo.branch(n.id)}": n.commit for n in self.state.nodes.values() if n.commit}

    async def _remove_worktree(self, path: Path) -> None:
        async with self._git_lock:
            await asyncio.shield(gitops.remove_worktree(self.repo, path))

    async def _gate(self) -> None:
        """Wait while paused; raise when the run is stopping."""
        if self.stop_reason:
            raise _Stop()
        if not self.unpaused.is_set():
            await self.unpaused.wait()
        if self.stop_reason:
            raise _Stop()

    # -- GPU telemetry -----------------------------------------------------------------------
    async def _telemetry_loop(self, stop: asyncio.Event) -> None:
        """One GPU sample per device per interval, naming the node benchmarking on it.

        Samples go to telemetry.jsonl, not the event log (see `TelemetryLog`); the fold still
        sees each one, so the in-process state and printers stay current.
        """
        count = self.telemetry.device_count()
        self.emit("gpu_status", available=count > 0, devices=self.gpu_devices, backend=self.telemetry.name,
                  reason=None if count else (getattr(self.telemetry, "reason", None) or "no GPU"))
        # A Ray run's GPUs are on the workers: sampled there (engine.cluster.telemetry) every few
        # seconds. `cluster_sampler` is a seam: tests inject a fake sampler (no GPU, no Ray here).
        cluster_sampler = getattr(self, "cluster_sampler", None)
        if cluster_sampler is None and self.remote:
            from looptree.engine.cluster.telemetry import sample_cluster as cluster_sampler
        if not count and cluster_sampler is None:
            return
        samples = TelemetryLog(self.run_dir)

        def on_sample(sample: Any) -> None:
            fields = sample.event_fields()
            fields["node"] = self.slots.busy().get(sample.index)
            self.state.apply(samples.append(sample.index, fields))

        def on_cluster_sample(device: str, fields: dict[str, Any]) -> None:
            self.state.apply(samples.append(device, fields))  # type: ignore[arg-type]  # "host:index"

        loops = []
        if count:
            loops.append(sample_loop(self.telemetry, self.config.gpu.sample_interval, on_sample, stop))
        if cluster_sampler is not None:
            from looptree.engine.cluster.telemetry import cluster_sample_loop

            interval = max(self.config.gpu.sample_interval, getattr(self, "cluster_sample_interval", 5.0))
            loops.append(cluster_sample_loop(cluster_sampler, interval, on_cluster_sample, stop))
        try:
            await asyncio.gather(*loops)
        finally:
            samples.close()

    # -- control ---------------------------------------------------------------------------
    async def _control_loop(self) -> None:
        while True:
            refused = []
            for command in self.control.poll():
                if "_refused" in command:
                    refused.append(command)
                    continue
                try:
                    self.handle_command(command)
                except LooptreeError as exc:
                    self.emit("message", text=f"refused {command.get('cmd')}: {exc}")
                except Exception as exc:  # a bad command must never take the control channel down
                    self.emit("message", text=f"refused {command.get('cmd')}: internal error {exc!r}")
            if refused:
                self._refuse_lines(refused)
            if not self.stop_reason:
                for fork in list(self.state.pending_forks):
                    self._start_fork(fork)
            await asyncio.sleep(CONTROL_POLL_S)

    def _refuse_lines(self, refused: list[dict[str, Any]]) -> None:
        """Lines not written by `looptree ctl` or the dashboard: one loud event per poll, never obeyed."""
        reasons = list(dict.fromkeys(str(r["_refused"]) for r in refused))
        count = len(refused)
        self.emit("message", text=f"WARNING: refused {count} control line{'s' if count > 1 else ''} not written by "
                  f"`looptree ctl` or the dashboard ({'; '.join(reasons[:3])})", alert="control_refused",
                  count=count, reasons=reasons[:10], control_offset=max(int(r["_offset"]) for r in refused))

    def request_stop(self, reason: str = "stopped by user", offset: int | None = None) -> None:
        """End the run cleanly (it can be resumed); `reason` says who asked: the user, or a signal."""
        if self.stop_reason:
            return  # already stopping: a second stop must not interrupt the clean-up
        self.stop_reason = reason
        self.emit("stop_requested", reason=reason,
                  control_offset=self.control.offset if offset is None else offset)
        self.unpaused.set()
        if self._main_task is not None:
            self._main_task.cancel()

    def handle_command(self, command: dict[str, Any]) -> None:
        cmd, node_id = command.get("cmd"), str(command.get("id") or "")
        offset = command.get("_offset", self.control.offset)
        if node_id and node_id not in self.state.nodes:
            raise LooptreeError(f"no node {node_id} in run {self.state.run}")
        if cmd in ("prune", "pin", "unpin", "kill", "fork") and not node_id:
            raise LooptreeError(f"{cmd} needs a node ID")
        if cmd == "pause" and not self.state.paused:
            self.emit("run_paused", control_offset=offset)
            self.unpaused.clear()
        elif cmd == "resume" and self.state.paused:
            self.emit("run_unpaused", control_offset=offset)
            self.unpaused.set()
        elif cmd == "stop":
            self.request_stop("stopped by user", offset)
        elif cmd == "prune":
            self.emit("node_pruned", id=node_id, control_offset=offset)
            for sub in self.state.subtree(node_id):
                self._kill(sub)
        elif cmd == "pin":
            self.emit("node_pinned", id=node_id, control_offset=offset)
        elif cmd == "unpin":
            self.emit("node_unpinned", id=node_id, control_offset=offset)
        elif cmd == "kill":
            self.emit("message", text=f"kill {node_id}", control_offset=offset)
            self._kill(node_id)
        elif cmd == "fork":
            node = self.state.nodes[node_id]
            if not node.ok:
                raise LooptreeError(f"node {node_id} has no successful evaluation to fork from")
            if node.pruned:
                raise LooptreeError(f"node {node_id} is pruned; unprune is not supported, fork another node")
            self.emit("fork_requested", id=node_id, hint=command.get("hint", ""), control_offset=offset)
        elif cmd == "budget":
            new_cap = new_budget(self.budget.cap, str(command.get("tokens", "")))
            self.budget.set_cap(new_cap)
            self.emit("budget_changed", max_tokens=new_cap, control_offset=offset)

    def _kill(self, node_id: str) -> None:
        task = self.node_tasks.get(node_id)
        if task is not None and not task.done():
            self.killed.add(node_id)
            task.cancel()
            asyncio.get_running_loop().call_later(KILL_RECHECK_S, self._kill_again, node_id, task)

    def _kill_again(self, node_id: str, task: asyncio.Task[Any]) -> None:
        """Cancel again until the node's task is gone.

        A cancellation can be swallowed: on Python 3.11 `asyncio.wait_for` returns the inner
        result when it finishes at the moment the cancel lands. A killed node must not run on
        into a 30-minute benchmark because of that; `engine.procs` survives a second cancel
        during its cleanup (it then kills the process group synchronously).
        """
        if task.done() or self.node_tasks.get(node_id) is not task:
            return
        task.cancel()
        asyncio.get_running_loop().call_later(KILL_RECHECK_S, self._kill_again, node_id, task)

    def _start_fork(self, fork: dict[str, Any]) -> None:
        parent = fork["id"]
        node_id = self.state.next_child_id(parent)
        phase = self.state.nodes[parent].phase + 1
        self.emit("node_created", id=node_id, parent=parent, phase=phase, kind="fork", hint=fork.get("hint", ""))
        self._spawn_fork_chain(node_id)

    def _spawn_fork_chain(self, node_id: str) -> None:
        task = asyncio.create_task(self._run_chain(node_id), name=f"fork {node_id}")
        self.fork_tasks.add(task)
        task.add_done_callback(self.fork_tasks.discard)

    def _resume_forks(self) -> None:
        """Forks in flight when the engine died are carried on, with their fix chains."""
        for node_id in self.state.order:
            node = self.state.nodes[node_id]
            if node.kind == "fork" and (not node.terminal or search.may_fix(
                    self.state, node, self.config.search.max_fix_attempts) or any(
                    not self.state.nodes[c].terminal for c in self.state.subtree(node_id)
                    if self.state.nodes[c].kind == "fix")):
                self._spawn_fork_chain(node_id)


def _read_tail(ndir: Path, stage: str | None, limit: int = 6000) -> str:
    names = {"build": "build.log", "check": "check.log", "bench": "bench.log", "timeout": "bench.log",
             "metrics": "bench.log"}
    name = names.get(stage or "")
    if name is None:
        return ""
    path = ndir / name
    if stage == "timeout":
        for candidate in ("bench.log", "check.log", "build.log"):
            if (ndir / candidate).exists():
                path = ndir / candidate
                break
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - limit))
            data = fh.read(limit)
    except OSError:
        return ""
    return data.decode(errors="replace")


def _csv_line(cells: list[str]) -> str:
    def quote(cell: str) -> str:
        if any(ch in cell for ch in ',"\n'):
            return '"' + cell.replace('"', '""') + '"'
        return cell

    return ",".join(quote(c) for c in cells) + "\n"


def _toml_safe(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _toml_safe(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_toml_safe(v) for v in data]
    return data


def analysis_text(state: RunState, node_id: str) -> str:
    """A short, factual comparison against the parent and the baseline."""
    node = state.nodes[node_id]
    parent = state.nodes.get(node.parent or "")
    base = state.baseline
    lines = [f"# {node.id}: {node.description or node.kind}", ""]
    for spec in state.specs or []:
        value = node.metrics.get(spec.column)
        if value is None:
            continue
        parts = [f"{spec.column}: {value:.6g}"]
        for label, other in (("parent", parent), ("baseline", base)):
            if other is not None and other.ok and other is not node and other.metrics.get(spec.column):
                ref = other.metrics[spec.column]
                ratio = (ref / value if not spec.higher_is_better else value / ref) if value else float("inf")
                parts.append(f"{ratio:.3g}x {'better' if ratio > 1 else 'worse' if ratio < 1 else 'same'} than {label} {other.id}")
        spread = node.spread.get(spec.column, {})
        if spread:
            parts.append(f"n={int(spread.get('n', 0))}, min {spread.get('min', 0):.6g}, max {spread.get('max', 0):.6g}")
        lines.append("- " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _discard_empty_run(run_dir: Path) -> None:
    """A start refused before its first event leaves no run behind (`tree .` must not pick it)."""
    events = run_dir / "events.jsonl"
    if events.exists() and events.stat().st_size > 0:
        return
    if (run_dir / "engine.log").exists():
        # Started by the dashboard launcher: it reads the log for the error, then removes the run.
        for name in ("events.jsonl", "config.toml", "engine.lock"):
            (run_dir / name).unlink(missing_ok=True)
        return
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


def allocate_run_dir(project_dir: Path, start: int = 1) -> Path:
    """Runs are numbered 1, 2, 3…; mkdir is atomic, so two starts at once get different numbers."""
    root = runs_root(project_dir)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    n = max(max(numbers, default=0) + 1, start)
    while True:
        try:
            (root / str(n)).mkdir()
            return root / str(n)
        except FileExistsError:
            n += 1


__all__ = ["Engine", "allocate_run_dir", "analysis_text", "job_prefix", "MetricSpec", "parse_header"]
