"""The run's one brainstorm: a list of distinct ideas asked on the baseline, seeds for phase 0.

Why a failure here is not fatal: a malformed or refused ideas reply still lets the run go on
(each phase-0 agent then picks its own idea), so the reason is logged and the list is empty.
"""

from __future__ import annotations

import asyncio

from looptree.engine.agents.calls import AgentCaller, ideas_failure
from looptree.engine.agents.components import call_components
from looptree.engine.agents.prompts import PromptBuilder, format_results, parse_ideas, prompt_hash
from looptree.engine.core.runs import worktrees_root
from looptree.engine.errors import BudgetExhausted, LooptreeError
from looptree.engine.run.artifacts import RunArtifacts
from looptree.engine.run.context import RunContext
from looptree.engine.run.worktrees import Worktrees

IDEAS_FILE = "ideas.md"


async def brainstorm(ctx: RunContext, *, worktrees: Worktrees, prompts: PromptBuilder, caller: AgentCaller,
                     artifacts: RunArtifacts, agents: asyncio.Semaphore) -> list[str]:
    """Ask for `search.num_samples` ideas on the baseline; write `ideas_generated` either way."""
    count = ctx.config.search.num_samples
    base = ctx.state.baseline
    assert base is not None
    wt = worktrees_root(ctx.run_dir) / "ideas"
    project = await worktrees.add(wt, base.commit or "")
    try:
        user = await asyncio.to_thread(prompts.ideas, project, count, ctx.metric_names(),
                                       format_results(base.metrics, ctx.state.specs))
    finally:
        await worktrees.remove(wt)
    messages = prompts.messages(user)
    await ctx.gate.check()
    async with agents:
        ctx.emit("agent_started", id=None, role="ideas")
        try:
            response = await caller.call("ideas", None, messages, prompt_hash(messages))
        except BudgetExhausted:
            raise
        except LooptreeError as exc:
            ctx.emit("agent_failed", id=None, role="ideas", reason=str(exc))
            ctx.emit("ideas_generated", ideas=[], reason=str(exc))
            return []
    ideas = parse_ideas(response.text, count)
    path = ctx.run_dir / IDEAS_FILE
    await artifacts.write(path, response.text)
    unread = {} if ideas else {"reason": ideas_failure(response, ctx.config.agent.max_tokens, path)}
    ctx.emit("ideas_generated", ideas=ideas, text=response.text,
             usage={"prompt_tokens": response.prompt_tokens, "completion_tokens": response.completion_tokens},
             prompt_components=call_components(prompts.templates, "ideas"), **unread)
    return ideas
