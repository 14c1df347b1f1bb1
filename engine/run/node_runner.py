"""One node, from an agent's reply to a measured commit: ask, apply, commit, evaluate, record.

Why each step asks the folded state first: a resumed run calls `process` again on a node
that was in flight. A reply already paid for is re-applied rather than re-asked (its text is
in the log), a commit already made is evaluated again from a fresh worktree, and nothing is
done twice that the log says was done.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from looptree.engine.agents.calls import AgentCaller
from looptree.engine.agents.components import call_components
from looptree.engine.agents.prompts import PromptBuilder, prompt_hash
from looptree.engine.core.runs import node_dir, worktrees_root
from looptree.engine.core.state import NodeState
from looptree.engine.edits.access import AccessPolicy
from looptree.engine.edits.blocks import apply_edits, parse_change_reply
from looptree.engine.errors import BudgetExhausted, EditError, GitError, LooptreeError
from looptree.engine.evaluation.evaluator import EvalOutcome, Evaluator
from looptree.engine.run.artifacts import RunArtifacts, analysis_text
from looptree.engine.run.context import RunContext
from looptree.engine.run.prompt_context import PromptContext
from looptree.engine.run.worktrees import Worktrees
from looptree.engine.vcs import gitops
from looptree.gpu.devices.slots import DeviceSlots, env_for
from looptree.gpu.devices.telemetry import TelemetryBackend

#: Files a node's evaluation writes: cleared before it runs again, so no stale log is read.
EVALUATION_FILES = ("build.log", "check.log", "bench.log", "bench_metrics.csv", "parent_bench.log",
                    "parent_build.log")


@dataclass
class BenchPlaces:
    """Where benchmarks may run: this machine's devices and slots, or a Ray cluster's workers."""

    slots: DeviceSlots
    gpu_devices: list[int]
    remote: bool
    telemetry: TelemetryBackend
    cpu_slots: asyncio.Semaphore

    @property
    def kind(self) -> Literal["gpu", "cpu"]:
        return "gpu" if self.gpu_devices else "cpu"


class NodeRunner:
    def __init__(self, ctx: RunContext, *, worktrees: Worktrees, artifacts: RunArtifacts,
                 prompts: PromptBuilder, caller: AgentCaller, evaluator: Evaluator, policy: AccessPolicy,
                 places: BenchPlaces, agents: asyncio.Semaphore) -> None:
        self.ctx = ctx
        self.worktrees = worktrees
        self.artifacts = artifacts
        self.prompts = prompts
        self.context = PromptContext(ctx, prompts, artifacts)
        self.caller = caller
        self.evaluator = evaluator
        self.policy = policy
        self.places = places
        self.agents = agents  # search.num_workers: how many agent calls run at once

    async def process(self, node_id: str) -> None:
        state = self.ctx.state
        node = state.nodes[node_id]
        wt = worktrees_root(self.ctx.run_dir) / node_id
        ndir = node_dir(self.ctx.run_dir, node_id)
        ndir.mkdir(parents=True, exist_ok=True)
        try:
            if node.commit is None:
                project = await self.worktrees.add(wt, self.base_commit_for(node))
                if node.reply_text is None:
                    await self.ask_agent(node, project, ndir)
                    if node.status == "failed":
                        return
                if not await self.apply_reply(node, wt, project, ndir):
                    return
            else:
                await self.worktrees.add(wt, node.commit)
            await self.evaluate(node, wt, ndir)
        finally:
            await self.worktrees.remove(wt)

    def base_commit_for(self, node: NodeState) -> str:
        state = self.ctx.state
        parent = state.nodes.get(node.parent or "")
        if parent is None:
            return state.base_commit or ""
        if parent.commit:
            return parent.commit
        # A fix of a node whose edits never applied starts from that node's own parent.
        return self.base_commit_for(parent)

    # -- the agent -------------------------------------------------------------------------
    async def ask_agent(self, node: NodeState, project: Path, ndir: Path) -> None:
        role = "fix" if node.kind == "fix" else "optimize"
        emit = self.ctx.emit
        user = await self.context.user_prompt(node, project)
        messages = self.prompts.messages(user)
        digest = prompt_hash(messages)
        await self.artifacts.write(ndir / "prompt.md", f"## system\n\n{messages[0]['content']}\n\n## user\n\n{user}\n")
        await self.ctx.gate.check()
        async with self.agents:
            await self.ctx.gate.check()
            emit("agent_started", id=node.id, role=role)
            started = time.monotonic()
            try:
                response = await self.caller.call(role, node.id, messages, digest)
            except BudgetExhausted as exc:
                emit("agent_failed", id=node.id, role=role, reason=f"budget spent: {exc}")
                raise
            except asyncio.CancelledError:
                emit("agent_failed", id=node.id, role=role, reason="cancelled")
                raise
            except LooptreeError as exc:
                emit("agent_failed", id=node.id, role=role, reason=str(exc))
                emit("node_failed", id=node.id, stage="agent", reason=str(exc))
                return
        try:
            description = parse_change_reply(response.text).description
        except EditError:
            description = response.text.strip().split("\n\n", 1)[0][:300]
        emit("agent_finished", id=node.id, role=role, text=response.text, description=description,
             usage={"prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens,
                    "total_tokens": response.prompt_tokens + response.completion_tokens},
             model=response.model, prompt_hash=digest, finish_reason=response.finish_reason,
             prompt_components=call_components(self.prompts.templates, role, node.kind),
             duration_s=round(time.monotonic() - started, 3), cost_usd=response.cost_usd,
             **({"cut_off": self.caller.cut_off[node.id]} if node.id in self.caller.cut_off else {}))
        # After the event: the reply is paid for and in the log even if this write is cut short.
        await self.artifacts.write(ndir / "response.md", response.text)

    # -- the edits -------------------------------------------------------------------------
    async def apply_reply(self, node: NodeState, wt: Path, project: Path, ndir: Path) -> bool:
        """Apply the reply's edits within the allowed files and commit them on `looptree/<ID>`."""
        emit = self.ctx.emit
        try:
            parsed = parse_change_reply(node.reply_text or "")
            # Shielded: a thread cannot be cancelled, so let it finish before the worktree goes away.
            result = await asyncio.shield(asyncio.to_thread(apply_edits, project, parsed.edits, self.policy))
        except EditError as exc:
            cut = self.caller.cut_off.get(node.id)  # "no edit blocks" alone hides the real cause
            reason = f"{cut}: {exc}" if cut else str(exc)
            emit("edits_rejected", id=node.id, reason=reason)
            emit("node_failed", id=node.id, stage="edit", reason=reason)
            return False
        files = sorted(set(result.changed_files) | set(result.created_files))
        repo = self.ctx.repo
        message = (f"looptree {node.id}: {(node.description or node.kind)[:72]}\n\n"
                   f"node: {node.id}\nparent: {node.parent}\nkind: {node.kind}\n")
        try:
            commit = await gitops.commit_worktree(wt, [repo.prefix + f for f in files], message)
            branch = await self.worktrees.set_branch(node.id, commit)
        except GitError as exc:
            emit("edits_rejected", id=node.id, reason=f"could not commit the change: {exc}")
            emit("node_failed", id=node.id, stage="edit", reason=f"could not commit the change: {exc}")
            return False
        with contextlib.suppress(LooptreeError):
            diff = await gitops.diff(repo, self.base_commit_for(node), commit)
            await self.artifacts.write(ndir / "diff.patch", diff)
        emit("edits_applied", id=node.id, files=files, commit=commit, branch=branch)
        return True

    # -- the evaluation --------------------------------------------------------------------
    def reference_for(self, node: NodeState) -> NodeState | None:
        """The nearest evaluated ancestor: what the candidate is timed against, back to back."""
        nodes = self.ctx.state.nodes
        current = nodes.get(node.parent or "")
        while current is not None and not (current.credible and current.commit):  # never a suspect one
            current = nodes.get(current.parent or "")
        return current

    async def evaluate(self, node: NodeState, wt: Path, ndir: Path) -> None:
        ctx, places = self.ctx, self.places
        reference = self.reference_for(node) if ctx.config.bench.compare == "interleaved" else None
        shape_ref = self.reference_for(node)  # its recorded shape: the yardstick for forged rows
        ref_wt = worktrees_root(ctx.run_dir) / f"{node.id}.ref"
        await ctx.gate.check()
        local_cpu = places.kind == "cpu" and not places.remote
        try:  # on a cluster the executor's lease is the slot (one bench per worker, its own lock)
            async with places.cpu_slots if local_cpu else contextlib.nullcontext():
                async with places.slots.acquire(places.kind, holder=node.id) as device, \
                        (self.device_lock(node.id, device) if not places.remote else contextlib.nullcontext()):
                    await ctx.gate.check()
                    for name in EVALUATION_FILES:
                        (ndir / name).unlink(missing_ok=True)
                    ref_project = await self.worktrees.add(ref_wt, reference.commit or "") if reference else None
                    outcome = await self.evaluator.evaluate(
                        node_id=node.id, project_dir=ctx.repo.project_in(wt), node_dir=ndir, run_dir=ctx.run_dir,
                        job_tag=f"{ctx.job_prefix}{node.id}", emit=ctx.emit, device=device,
                        device_env=env_for(device), reference_dir=ref_project,
                        expected_shape=shape_ref.shape if shape_ref is not None else None)
        finally:
            await self.evaluator.discard_private(ndir)
            if reference is not None:
                await self.worktrees.remove(ref_wt)
        if outcome.verdict is not None and reference is not None:
            outcome.verdict["against"] = reference.id
        await self.record_outcome(node, outcome, ndir, device)

    def device_lock(self, node_id: str, device: int | None) -> Any:
        """The machine-wide lock on the bench's device (gpu/devices/locks.py): two runs, or a run and an
        eval, never time on one device at once; the second waits and says so."""
        from looptree.gpu.devices.locks import hold_async, key_with_telemetry

        key = key_with_telemetry(device, self.places.telemetry, self.ctx.config.bench.concurrency)
        owner = f"looptree run {self.ctx.run_dir} node {node_id}"
        return hold_async(key, owner, on_wait=lambda who: self.ctx.emit(
            "message", text=f"{node_id}: waiting for device lock {key}, held by {who}"))

    async def record_outcome(self, node: NodeState, outcome: EvalOutcome, ndir: Path, device: Any = None) -> None:
        state, emit = self.ctx.state, self.ctx.emit
        if not outcome.ok or outcome.aggregate is None or outcome.specs is None:
            # The file first, as before the split: whoever sees `node_failed` finds failure.txt written.
            await self.artifacts.write(ndir / "failure.txt", f"{outcome.stage}: {outcome.reason}\n\n{outcome.log_tail}\n")
            emit("node_failed", id=node.id, stage=outcome.stage, reason=outcome.reason)
            return
        columns = [s.column for s in outcome.specs]
        if state.specs and [s.column for s in state.specs] != columns:
            reason = f"metric columns {columns} differ from the run's {[s.column for s in state.specs]}"
            emit("node_failed", id=node.id, stage="metrics", reason=reason)
            return
        emit("node_evaluated", id=node.id, iteration=state.evaluated + 1, metrics=outcome.aggregate.values,
             spread=outcome.aggregate.spread, columns=columns, verdict=outcome.verdict, device=device,
             repeats=len(outcome.rows), suspect=outcome.suspect, shape=outcome.shape)
        await self.artifacts.append_metrics_row(node.id)
        await self.artifacts.write(ndir / "analysis.md", analysis_text(state, node.id))
