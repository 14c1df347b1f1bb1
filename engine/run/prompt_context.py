"""What an agent is told about the run: its parent's results, the path so far, the other nodes.

Why here and not in the prompt builder: the builder (engine/agents/prompts.py) knows the
templates and the redaction; this module knows the tree. It picks, for each kind of node,
which facts of the folded state go into the prompt, and every text it hands over still goes
through the builder's scrubber.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from looptree.engine.agents.prompts import PromptBuilder, format_results
from looptree.engine.core.runs import node_dir
from looptree.engine.core.state import NodeState
from looptree.engine.run.artifacts import RunArtifacts
from looptree.engine.run.context import RunContext

#: How many of the newest nodes the "all" context scope lists.
OTHERS_LIMIT = 40


class PromptContext:
    def __init__(self, ctx: RunContext, prompts: PromptBuilder, artifacts: RunArtifacts) -> None:
        self.ctx = ctx
        self.prompts = prompts
        self.artifacts = artifacts

    async def user_prompt(self, node: NodeState, project: Path) -> str:
        """The user message for a node's agent (a fix, an idea, or an improvement)."""
        state = self.ctx.state
        parent = state.nodes.get(node.parent or "")
        if node.kind == "fix" and parent is not None:
            log_tail = await self.artifacts.read_log_tail(node_dir(self.ctx.run_dir, parent.id), parent.failure_stage)
            return await asyncio.to_thread(self.prompts.fix, project, parent.failure_stage or "unknown",
                                           parent.failure_reason or "", log_tail, parent.reply_text or "")
        names = self.ctx.metric_names()
        results = format_results(parent.metrics if parent else None, state.specs)
        parent_id = parent.id if parent else "?"
        if node.kind == "idea" and node.idea:
            return await asyncio.to_thread(self.prompts.optimize, project, node.idea, parent_id, names, results)
        history = self.history(parent.id) if parent else ""
        others = self.others() if self.ctx.config.context.scope == "all" else ""
        # Reading the project's files and scrubbing them is blocking work: off the event loop.
        return await asyncio.to_thread(self.prompts.improve, project, parent_id, names, results, history, others,
                                       hint=node.hint)

    def history(self, node_id: str) -> str:
        """The path from the baseline to `node_id`: what each step did and what it measured."""
        state = self.ctx.state
        lines = []
        for step in state.path(node_id):
            what = step.description or step.kind
            lines.append(f"- {step.id}: {what} → {format_results(step.metrics, state.specs)}")
        return "\n".join(lines)

    def others(self) -> str:
        """The newest finished nodes anywhere in the tree (context.scope = "all")."""
        state = self.ctx.state
        lines = []
        for node_id in state.order[-OTHERS_LIMIT:]:
            n = state.nodes[node_id]
            if n.terminal and n.kind != "baseline":
                result = format_results(n.metrics, state.specs) if n.ok else f"failed at {n.failure_stage}"
                lines.append(f"- {n.id}: {(n.description or n.kind)[:120]} → {result}")
        return "\n".join(lines)
