"""The steering of a live run: pause, resume, stop, prune, pin, kill, fork and budget commands.

Why each command is an event first: the effect of a command (a paused run, a pruned subtree, a
new token cap) is written to the log with the control file's offset, so a resumed run neither
forgets it nor obeys the same line twice. Reading and verifying lines is engine/run/control.py's
job; this module decides what an accepted line does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from looptree.engine.agents.llm.budget import TokenBudget
from looptree.engine.errors import LooptreeError
from looptree.engine.run.context import RunContext
from looptree.engine.run.control import ControlTail, new_budget
from looptree.engine.run.scheduler import TreeSearch

CONTROL_POLL_S = 0.2
NODE_COMMANDS = ("prune", "pin", "unpin", "kill", "fork")


class CommandHandler:
    def __init__(self, ctx: RunContext, *, control: ControlTail, budget: TokenBudget, search: TreeSearch,
                 request_stop: Callable[[str, int | None], None]) -> None:
        self.ctx = ctx
        self.control = control
        self.budget = budget
        self.search = search
        self.request_stop = request_stop

    async def loop(self) -> None:
        """Poll the control file until cancelled; start forks the log says are pending."""
        while True:
            self.poll_once()
            await asyncio.sleep(CONTROL_POLL_S)

    def poll_once(self) -> None:
        ctx = self.ctx
        refused = []
        for command in self.control.poll():
            if "_refused" in command:
                refused.append(command)
                continue
            try:
                self.handle(command)
            except LooptreeError as exc:
                ctx.emit("message", text=f"refused {command.get('cmd')}: {exc}")
            except Exception as exc:  # a bad command must never take the control channel down
                ctx.emit("message", text=f"refused {command.get('cmd')}: internal error {exc!r}")
        if refused:
            self.refuse(refused)
        if not ctx.gate.stop_reason:
            for fork in list(ctx.state.pending_forks):
                self.search.start_fork(fork)

    def refuse(self, refused: list[dict[str, Any]]) -> None:
        """Lines not written by `looptree ctl` or the dashboard: one loud event per poll, never obeyed."""
        reasons = list(dict.fromkeys(str(r["_refused"]) for r in refused))
        count = len(refused)
        self.ctx.emit("message", text=f"WARNING: refused {count} control line{'s' if count > 1 else ''} not "
                      f"written by `looptree ctl` or the dashboard ({'; '.join(reasons[:3])})",
                      alert="control_refused", count=count, reasons=reasons[:10],
                      control_offset=max(int(r["_offset"]) for r in refused))

    def handle(self, command: dict[str, Any]) -> None:
        """Act on one verified command; raise `LooptreeError` (said as one line) when it cannot be."""
        ctx = self.ctx
        state, gate, emit = ctx.state, ctx.gate, ctx.emit
        cmd, node_id = command.get("cmd"), str(command.get("id") or "")
        offset = command.get("_offset", self.control.offset)
        if node_id and node_id not in state.nodes:
            raise LooptreeError(f"no node {node_id} in run {state.run}")
        if cmd in NODE_COMMANDS and not node_id:
            raise LooptreeError(f"{cmd} needs a node ID")
        if cmd == "pause" and not state.paused:
            emit("run_paused", control_offset=offset)
            gate.pause()
        elif cmd == "resume" and state.paused:
            emit("run_unpaused", control_offset=offset)
            gate.unpause()
        elif cmd == "stop":
            self.request_stop("stopped by user", offset)
        elif cmd == "prune":
            emit("node_pruned", id=node_id, control_offset=offset)
            for sub in state.subtree(node_id):
                self.search.kill(sub)
        elif cmd == "pin":
            emit("node_pinned", id=node_id, control_offset=offset)
        elif cmd == "unpin":
            emit("node_unpinned", id=node_id, control_offset=offset)
        elif cmd == "kill":
            emit("message", text=f"kill {node_id}", control_offset=offset)
            self.search.kill(node_id)
        elif cmd == "fork":
            node = state.nodes[node_id]
            if not node.ok:
                raise LooptreeError(f"node {node_id} has no successful evaluation to fork from")
            if node.pruned:
                raise LooptreeError(f"node {node_id} is pruned; unprune is not supported, fork another node")
            emit("fork_requested", id=node_id, hint=command.get("hint", ""), control_offset=offset)
        elif cmd == "budget":
            new_cap = new_budget(self.budget.cap, str(command.get("tokens", "")))
            self.budget.set_cap(new_cap)
            emit("budget_changed", max_tokens=new_cap, control_offset=offset)
