"""Hashes of the prompt components (system, ideas, optimize, improve, fix templates), one by one.

Why one by one: a run's `prompt_hash` covers a whole rendered prompt (files, metrics, history),
so two runs with the same template never share it. Hashing each resolved *template* lets
`looptree runs` and `looptree ab` group results by the prompt text a user actually changed.
"""

from __future__ import annotations

import hashlib

from looptree.engine.agents.prompts import TEMPLATE_NAMES


def component_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def template_hashes(templates: dict[str, str]) -> dict[str, str]:
    """{name: hash} for every known template (the packaged one or the user's replacement)."""
    return {name: component_hash(templates[name]) for name in TEMPLATE_NAMES if name in templates}


def call_components(templates: dict[str, str], role: str, kind: str | None = None) -> dict[str, str]:
    """The templates one agent call was built from: the system prompt and the role's template."""
    if role == "ideas":
        name = "ideas"
    elif role == "fix" or kind == "fix":
        name = "fix"
    elif kind == "idea":
        name = "optimize"
    else:
        name = "improve"
    return {n: component_hash(templates[n]) for n in ("system", name) if n in templates}
