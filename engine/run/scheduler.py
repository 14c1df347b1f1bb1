"""The phased tree search as tasks: the baseline, the brainstorm, each phase's nodes, fix chains, forks.

Why the decisions live elsewhere: which parents a phase expands, whether a failed node may be
fixed, whether the run is stuck, are pure functions of the folded state (engine/run/search.py).
This module turns them into asyncio tasks: one per node, so `kill ID` cancels just that node,
and one per fork, so a fork asked for from the dashboard runs beside the phase in progress.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from looptree.engine.agents.calls import AgentCaller
from looptree.engine.core.state import NodeState
from looptree.engine.errors import BudgetExhausted, LooptreeError
from looptree.engine.run import search
from looptree.engine.run.context import RunContext
from looptree.engine.run.gate import Stop
from looptree.engine.run.node_runner import NodeRunner
from looptree.engine.run.worktrees import Worktrees
from looptree.engine.vcs.guard import RepoGuard

KILL_RECHECK_S = 1.0  # how often a kill that has not taken effect is repeated


class TreeSearch:
    def __init__(self, ctx: RunContext, *, runner: NodeRunner, worktrees: Worktrees, guard: RepoGuard,
                 caller: AgentCaller, brainstorm: Callable[[], Awaitable[list[str]]]) -> None:
        self.ctx = ctx
        self.runner = runner
        self.worktrees = worktrees
        self.guard = guard
        self.caller = caller
        self.brainstorm = brainstorm
        self.node_tasks: dict[str, asyncio.Task[Any]] = {}
        self.killed: set[str] = set()
        self.fork_tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> str:
        """Every phase in turn (resumed ones skip what the log says is done); return the finish reason."""
        ctx = self.ctx
        state, cfg = ctx.state, ctx.config.search
        try:
            repaired = await self.guard.start()
            if repaired:
                ctx.emit("message", text=f"WARNING: this run's branches were changed while no stage ran: "
                         f"{'; '.join(repaired)}", alert="repository_changed", changes=repaired)
            base = await self.ensure_baseline()
            if not base.ok:
                raise LooptreeError(f"the baseline failed at {base.failure_stage}: {base.failure_reason}")
            ideas = state.ideas
            if ideas is None:
                ideas = await self.brainstorm()
            self.resume_forks()
            for phase in range(cfg.num_phases):
                if phase in state.phases_finished:
                    continue
                await self.run_phase(phase, ideas)
                improved = search.improved_since(state, state.phase_best_before.get(phase))
                best = state.best()
                ctx.emit("phase_finished", phase=phase, best=best.id if best else None, improved=improved)
                patience = cfg.early_stop_patience
                if patience and search.phases_without_improvement(state) >= patience and phase + 1 < cfg.num_phases:
                    await self.drain_forks()
                    return self.outcome("early stop")
            await self.drain_forks()
            return self.outcome("phases done")
        except Stop:
            return ctx.gate.stop_reason or "stopped by user"
        except BudgetExhausted:
            ctx.gate.stop("budget spent")
            await self.drain_forks(cancel=True)
            return "budget spent"

    def outcome(self, reason: str) -> str:
        """A run whose agent calls all failed did not do its job: end it as an error, with why."""
        failure = self.caller.no_call_succeeded()
        if failure and not self.ctx.state.consumed_replies:
            return f"error: {failure}"
        return reason

    async def ensure_baseline(self) -> NodeState:
        ctx = self.ctx
        state = ctx.state
        base_id = str(state.run)
        if base_id not in state.nodes:
            ctx.emit("node_created", id=base_id, parent=None, phase=-1, kind="baseline")
        node = state.nodes[base_id]
        if node.commit is None:
            branch = await self.worktrees.set_branch(base_id, state.base_commit or "")
            ctx.emit("edits_applied", id=base_id, files=[], commit=state.base_commit, branch=branch)
        if not node.terminal:
            await self.run_node(base_id)
        return state.nodes[base_id]

    async def run_phase(self, phase: int, ideas: list[str]) -> None:
        ctx = self.ctx
        state, cfg = ctx.state, ctx.config.search
        if phase not in state.phases_started:
            if phase == 0:
                parents = [str(state.run)] * cfg.num_samples
            else:
                parents = search.choose_parents(state, cfg.num_samples, cfg.expand_top)
            best = state.best()
            ctx.emit("phase_started", phase=phase, parents=parents, best_before=best.id if best else None)
        parents = state.phases_started[phase]
        existing = search.phase_nodes(state, phase)
        for index in range(len(existing), len(parents)):
            parent = parents[index]
            node_id = state.next_child_id(parent)
            if phase == 0:
                idea = ideas[index] if index < len(ideas) else None
                ctx.emit("node_created", id=node_id, parent=parent, phase=0, kind="idea", idea=idea)
            else:
                ctx.emit("node_created", id=node_id, parent=parent, phase=phase, kind="improve")
        nodes = [n.id for n in search.phase_nodes(state, phase)]
        results = await asyncio.gather(*(self.run_chain(n) for n in nodes), return_exceptions=True)
        for result in results:
            if isinstance(result, (BudgetExhausted, Stop)):
                raise result
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result
        if ctx.gate.stop_reason:
            raise Stop()

    async def run_chain(self, node_id: str) -> None:
        """A node, then its fix attempts while it fails and attempts remain."""
        ctx = self.ctx
        state = ctx.state
        current: str | None = node_id
        while current is not None:
            if state.nodes[current].pruned and not state.nodes[current].terminal:
                ctx.emit("node_failed", id=current, stage="pruned", reason="pruned by user before it ran")
                return
            await self.run_node(current)
            node = state.nodes[current]
            if ctx.gate.stop_reason or current in self.killed:
                return
            if node.status == "failed":
                if search.may_fix(state, node, ctx.config.search.max_fix_attempts):
                    fix_id = state.next_child_id(current)
                    ctx.emit("node_created", id=fix_id, parent=current, phase=node.phase, kind="fix", fix_of=current)
                    current = fix_id
                    continue
                # After a resume, a fix created before the crash may still be waiting.
                current = next((c for c in node.children if state.nodes[c].kind == "fix"), None)
                continue
            current = None

    async def run_node(self, node_id: str) -> None:
        """One node as a cancellable task, so `kill ID` stops just it."""
        state = self.ctx.state
        if state.nodes[node_id].terminal:
            return
        task = asyncio.create_task(self.runner.process(node_id), name=f"node {node_id}")
        self.node_tasks[node_id] = task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and node_id in self.killed and not self.ctx.gate.stop_reason:
                if not state.nodes[node_id].terminal:
                    during = state.nodes[node_id].stage or "agent"
                    self.ctx.emit("node_failed", id=node_id, stage="killed", reason=f"killed by user during {during}")
                return
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            self.node_tasks.pop(node_id, None)

    # -- kills -----------------------------------------------------------------------------
    def kill(self, node_id: str) -> None:
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

    # -- forks -----------------------------------------------------------------------------
    def start_fork(self, fork: dict[str, Any]) -> None:
        """A fork asked for on the control channel: a new child of the node, run beside the phases."""
        state = self.ctx.state
        parent = fork["id"]
        node_id = state.next_child_id(parent)
        phase = state.nodes[parent].phase + 1
        self.ctx.emit("node_created", id=node_id, parent=parent, phase=phase, kind="fork", hint=fork.get("hint", ""))
        self._spawn_fork_chain(node_id)

    def _spawn_fork_chain(self, node_id: str) -> None:
        task = asyncio.create_task(self.run_chain(node_id), name=f"fork {node_id}")
        self.fork_tasks.add(task)
        task.add_done_callback(self.fork_tasks.discard)

    def resume_forks(self) -> None:
        """Forks in flight when the engine died are carried on, with their fix chains."""
        state, max_fixes = self.ctx.state, self.ctx.config.search.max_fix_attempts
        for node_id in state.order:
            node = state.nodes[node_id]
            if node.kind == "fork" and (not node.terminal or search.may_fix(state, node, max_fixes) or any(
                    not state.nodes[c].terminal for c in state.subtree(node_id)
                    if state.nodes[c].kind == "fix")):
                self._spawn_fork_chain(node_id)

    async def drain_forks(self, cancel: bool = False) -> None:
        while self.fork_tasks:
            tasks = list(self.fork_tasks)
            if cancel:
                for task in tasks:
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.fork_tasks.difference_update(tasks)

    async def cancel_forks(self) -> None:
        """At the run's end: no fork outlives it."""
        for task in list(self.fork_tasks):
            task.cancel()
        await asyncio.gather(*self.fork_tasks, return_exceptions=True)


__all__ = ["KILL_RECHECK_S", "TreeSearch"]
