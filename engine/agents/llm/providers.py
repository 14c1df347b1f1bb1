"""Where each `agent.provider` lives and which environment variable holds its key.

Why resolve up front: a missing key must stop `looptree run` before the run directory, the
baseline and the first benchmark exist — not after ten minutes of work at the first LLM call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from looptree.engine.agents.llm.redact import register_secret
from looptree.engine.errors import ConfigError

# Sent to local servers that want no key: the openai client refuses an empty one.
LOCAL_DUMMY_KEY = "not-needed"


@dataclass(frozen=True)
class ProviderInfo:
    """A provider's defaults."""

    name: str
    base_url: str  # "" for replay (no network)
    key_env: str | None  # None for replay
    key_required: bool


PROVIDERS: dict[str, ProviderInfo] = {
    "openai": ProviderInfo("openai", "https://api.openai.com/v1", "OPENAI_API_KEY", True),
    "google": ProviderInfo(
        "google",
        "https://generativelanguage.googleapis.com/v1beta/openai/",
        "GEMINI_API_KEY",
        True,
    ),
    "openrouter": ProviderInfo(
        "openrouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY", True
    ),
    "cborg": ProviderInfo("cborg", "https://api.cborg.lbl.gov", "CBORG_API_KEY", True),
    "deepseek": ProviderInfo("deepseek", "https://api.deepseek.com", "DEEPSEEK_API_KEY", True),
    "local": ProviderInfo("local", "http://localhost:8000/v1", "LOCAL_API_KEY", False),
    "replay": ProviderInfo("replay", "", None, False),
}


@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint. `api_key` never shows in repr (it ends up in logs and tracebacks)."""

    base_url: str
    api_key: str = field(repr=False)
    key_env: str | None
    provider: str = ""


def resolve_endpoint(
    provider: str,
    base_url: str = "",
    api_key_env: str = "",
    *,
    environ: Mapping[str, str] | None = None,
) -> Endpoint:
    """The base URL and key for `agent.provider` (+ optional `agent.base_url`/`agent.api_key_env`).

    A non-empty `api_key_env` is used exclusively: silently falling back to another variable
    could bill a different account than the user named. The key is registered with the
    redactor so it never reaches a recorded file. Raises ConfigError for an unknown provider or
    a missing required key.
    """
    env = os.environ if environ is None else environ
    name = (provider or "").strip().lower()
    info = PROVIDERS.get(name)
    if info is None:
        known = ", ".join(PROVIDERS)
        raise ConfigError(f"agent.provider = {provider!r} is not one of: {known}")

    url = (base_url or "").strip() or info.base_url
    if name == "replay":
        return Endpoint(base_url="", api_key="", key_env=None, provider=name)

    key_env = (api_key_env or "").strip() or info.key_env
    key = (env.get(key_env, "") if key_env else "").strip()
    if not key:
        if not info.key_required and not (api_key_env or "").strip():
            return Endpoint(base_url=url, api_key=LOCAL_DUMMY_KEY, key_env=key_env, provider=name)
        if key_env == info.key_env:
            hint = "(or set agent.api_key_env)"
        else:
            hint = f"(agent.api_key_env; {name}'s usual variable is ${info.key_env})"
        raise ConfigError(f"agent.provider = {name!r} needs an API key in ${key_env} {hint}")
    register_secret(key)
    return Endpoint(base_url=url, api_key=key, key_env=key_env, provider=name)
