"""Prompt templates and the context each agent gets.

Why templates in files: users tune prompts without touching code (`[prompts]` paths in the
config override the packaged ones), and every prompt's text is hashed onto its node so later
analysis can tell which prompt produced which result.

Every value filled into a template except the rendered files (which the access policy already
filtered) passes through `scrub` first: log tails, failure reasons, metric names and the agents'
earlier text can all be shaped by the candidate's code, which may have printed a hidden file or
a secret (`engine.llm.redact.PromptScrubber`). This is the one redaction step before a prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from looptree.engine.agents.llm.redact import (
    HiddenIndex,
    PromptScrubber,
    env_secrets,
    read_hidden_texts,
)
from looptree.engine.core.metrics import MetricSpec
from looptree.engine.edits.access import AccessPolicy

TEMPLATE_NAMES = ("system", "ideas", "optimize", "improve", "fix")
MAX_FILE_CHARS = 40_000
MAX_LOG_CHARS = 3_000


def load_templates(overrides: dict[str, str] | None = None, base: Path | None = None) -> dict[str, str]:
    """Packaged templates, with any user-supplied file replacing its namesake."""
    pkg = resources.files("looptree.engine.agents") / "templates"
    out = {name: (pkg / f"{name}.md").read_text(encoding="utf-8") for name in TEMPLATE_NAMES}
    for name, path in (overrides or {}).items():
        if not path:
            continue
        full = Path(path) if Path(path).is_absolute() or base is None else base / path
        out[name] = full.read_text(encoding="utf-8")
    return out


def prompt_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def render_files(root: Path, policy: AccessPolicy) -> str:
    """The writable and read-only files, fenced, each under its path; hidden files never appear."""
    parts = []
    for rel, kind in sorted(policy.visible_files(root).items()):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > MAX_FILE_CHARS:
            text = text[:MAX_FILE_CHARS] + "\n... (truncated)\n"
        tag = "writable" if kind == "writable" else "read-only"
        parts.append(f"{rel} ({tag}):\n```\n{text}{'' if text.endswith(chr(10)) else chr(10)}```")
    return "\n\n".join(parts)


def format_results(metrics: dict[str, float] | None, specs: list[MetricSpec] | None) -> str:
    if not metrics:
        return "not measured yet"
    cols = [s.column for s in specs] if specs else list(metrics)
    return ", ".join(f"{c} = {metrics[c]:.6g}" for c in cols if c in metrics)


def cut_log(text: str, limit: int = MAX_LOG_CHARS) -> str:
    """Keep the end of a log (where errors are), plus any traceback header lines before it."""
    text = text.strip()
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    return "... (earlier output cut)\n" + tail[tail.find("\n") + 1:]


def scrubber_for(root: Path, policy: AccessPolicy, key_envs: list[str], cassette: Path | None = None) -> PromptScrubber:
    """The prompt scrubber of a project: its hidden files' text, the secret environment values.

    Read from the user's project (not a worktree): hidden files that are gitignored, or kept out
    of worktrees, are still within reach of code that runs unsandboxed. The replay cassette is
    left out: it is hidden so agents do not read their own future replies, but it holds LLM
    text, which prompts echo (ideas, earlier replies); no secret of the user's is in it.
    """
    root = root.resolve()
    skip = cassette.resolve() if cassette is not None else None
    hidden = read_hidden_texts(root / rel for rel in policy.hidden_files(root) if (root / rel).resolve() != skip)
    visible = read_hidden_texts(root / rel for rel in policy.visible_files(root))
    return PromptScrubber(HiddenIndex(hidden, visible), env_secrets(extra_names=key_envs))


@dataclass
class PromptBuilder:
    templates: dict[str, str]
    goal: str
    policy: AccessPolicy
    writable: list[str]
    readonly: list[str]
    scrub: Callable[[str], str] = lambda text: text

    def _fill(self, name: str, files: str = "", **untrusted: Any) -> str:
        """The template with `files` as rendered and every other value scrubbed."""
        values = {k: self.scrub(str(v)) for k, v in untrusted.items()}
        values["files"] = files
        return Template(self.templates[name]).safe_substitute(values)

    def system(self) -> str:
        # The user's own config, not the candidate's output: nothing to scrub.
        return Template(self.templates["system"]).safe_substitute(
            goal=self.goal, writable=", ".join(self.writable), readonly=", ".join(self.readonly) or "(none)")

    def messages(self, user: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system()}, {"role": "user", "content": user}]

    def ideas(self, root: Path, num_ideas: int, metric_names: str, baseline_results: str) -> str:
        return self._fill("ideas", num_ideas=num_ideas, metric_names=metric_names,
                          baseline_results=baseline_results, files=render_files(root, self.policy))

    def optimize(self, root: Path, idea: str, parent_id: str, metric_names: str, parent_results: str) -> str:
        return self._fill("optimize", idea=idea, parent_id=parent_id, metric_names=metric_names,
                          parent_results=parent_results, files=render_files(root, self.policy))

    def improve(self, root: Path, parent_id: str, metric_names: str, parent_results: str, history: str,
                others: str = "", hint: str | None = None) -> str:
        hint_text = f"\nInstruction from the user for this attempt: {hint}\n" if hint else ""
        others_text = f"\nOther experiments so far (short):\n{others}\n" if others else ""
        return self._fill("improve", parent_id=parent_id, metric_names=metric_names, parent_results=parent_results,
                          history=history, others=others_text, hint=hint_text, files=render_files(root, self.policy))

    def fix(self, root: Path, stage: str, reason: str, log_tail: str, previous_reply: str) -> str:
        return self._fill("fix", stage=stage, reason=reason, log_tail=cut_log(self.scrub(log_tail)) or "(no output)",
                          previous_reply=previous_reply.strip() or "(none)", files=render_files(root, self.policy))


_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+(.*\S)\s*$")


def parse_ideas(text: str, limit: int) -> list[str]:
    """A JSON array of strings, or failing that a numbered/bulleted list (contract)."""
    stripped = text.strip()
    fence = re.search(r"```(?:json)?\s*(\[.*?\])\s*```", stripped, re.DOTALL)
    candidates = [fence.group(1)] if fence else []
    bracket = re.search(r"\[.*\]", stripped, re.DOTALL)
    if bracket:
        candidates.append(bracket.group(0))
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            ideas = [x.strip() for x in data if x.strip()]
            if ideas:
                return ideas[:limit]
    ideas = []
    for line in stripped.splitlines():
        match = _LIST_ITEM.match(line)
        if match:
            ideas.append(match.group(1).strip().strip("*").strip())
        elif ideas and line.startswith((" ", "\t")) and line.strip():
            ideas[-1] += " " + line.strip()
    return [i for i in ideas if i][:limit]
