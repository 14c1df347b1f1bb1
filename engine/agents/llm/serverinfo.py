"""What an OpenAI-compatible server can tell us about itself: how many requests it serves at once
and how it tokenizes.

Why ask: a llama.cpp server with one slot answers one request at a time; sending it 16 makes 15
wait inside the server, where our timeouts cannot tell waiting from hanging. And a budget cap is
only hard if prompt tokens are counted the server's way: llama.cpp and vLLM expose their
tokenizer over HTTP, and tokenizer files cannot be fetched offline. Every probe is bounded by a
short timeout and any failure means "the server does not say" — never an error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx2 as httpx  # the openai client's own transport (declared in pyproject)

from looptree.engine.agents.llm.types import message_text, template_overhead_bound

log = logging.getLogger("looptree.llm.serverinfo")

PROBE_TIMEOUT_S = 5.0


def server_root(base_url: str) -> str:
    """`http://host:8080/v1` → `http://host:8080`: llama.cpp and vLLM serve /props, /slots and
    /tokenize beside /v1, not under it."""
    root = base_url.rstrip("/")
    root = root.removesuffix("/v1")
    return root


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def discover_slots(
    client: Any, base_url: str, api_key: str = "", timeout_s: float = PROBE_TIMEOUT_S
) -> int | None:
    """Requests the server runs at once, when it says: llama.cpp's `GET /props` → `total_slots`,
    else `GET /slots` → one entry per slot. None when neither answers sensibly."""
    root = server_root(base_url)
    headers = auth_headers(api_key)
    try:
        r = await asyncio.wait_for(client.get(f"{root}/props", headers=headers), timeout_s)
        if r.status_code == 200:
            slots = r.json().get("total_slots")
            if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0:
                return slots
    except (httpx.HTTPError, ValueError, AttributeError, TimeoutError):
        pass
    try:
        r = await asyncio.wait_for(client.get(f"{root}/slots", headers=headers), timeout_s)
        if r.status_code == 200:
            data = r.json()
            if isinstance(data, list) and data:
                return len(data)
    except (httpx.HTTPError, ValueError, TimeoutError):
        pass
    return None


# Servers that batch concurrent requests themselves (their /v1/models says `owned_by`): a local
# vLLM or SGLang gets every worker, not the one-at-a-time default for provider "local".
BATCHING_SERVERS = ("vllm", "sglang")


async def batching_server(
    client: Any, base_url: str, api_key: str = "", timeout_s: float = PROBE_TIMEOUT_S
) -> str | None:
    """The name of a batching server (vLLM, SGLang) behind `base_url`, or None."""
    try:
        r = await asyncio.wait_for(
            client.get(f"{base_url.rstrip('/')}/models", headers=auth_headers(api_key)), timeout_s)
        if r.status_code != 200:
            return None
        for item in r.json().get("data") or []:
            owner = str(item.get("owned_by") or "").lower() if isinstance(item, dict) else ""
            if owner in BATCHING_SERVERS:
                return owner
    except (httpx.HTTPError, ValueError, AttributeError, TimeoutError):
        pass
    return None


class PromptCounter:
    """Counts prompt tokens with the server's own tokenizer, where it has an endpoint for it.

    `count` returns the exact tokens of every message's text plus the chat-template allowance of
    `prompt_token_bound` (the template itself is not tokenized), so the result is still an upper
    bound, only a much tighter one. The endpoint's dialect is found on first use and remembered:
    llama.cpp `POST /tokenize {"content"}` → `{"tokens": [...]}`, vLLM `POST /tokenize
    {"model", "prompt"}` → `{"count", "tokens"}`; a server with neither is never asked again.
    """

    def __init__(self, base_url: str, api_key: str = "", *, timeout_s: float = 10.0) -> None:
        self.root = server_root(base_url)
        self.headers = auth_headers(api_key)
        self.timeout_s = float(timeout_s)
        self.dialect: str | None = None  # "llama.cpp" | "vllm" | "none" once known
        self.calls = 0  # tokenize requests sent (tests: the bound must cost nothing)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=5.0))
        self._lock = asyncio.Lock()

    @property
    def available(self) -> bool:
        return self.dialect != "none"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def count(self, messages: list[dict], model: str) -> int | None:
        """Upper-bound prompt tokens by the server's tokenizer, or None when it cannot say."""
        if self.dialect == "none":
            return None
        texts = [message_text(m) for m in messages]
        try:
            if self.dialect is None:
                async with self._lock:  # one probe at a time finds the dialect
                    if self.dialect is None:
                        first = await self._probe(texts[0] if texts else "", model)
                        if first is None:
                            return None
                        rest = await asyncio.gather(*(self._tokens(t, model) for t in texts[1:]))
                        return first + sum(rest) + template_overhead_bound(messages)
            if self.dialect == "none":
                return None
            counts = await asyncio.gather(*(self._tokens(t, model) for t in texts))
        except (httpx.HTTPError, ValueError, KeyError, TypeError, TimeoutError) as exc:
            log.info("tokenize failed (%s); using the byte bound", type(exc).__name__)
            return None
        return sum(counts) + template_overhead_bound(messages)

    async def _probe(self, text: str, model: str) -> int | None:
        for dialect in ("llama.cpp", "vllm"):
            try:
                n = await self._tokens(text, model, dialect)
            except (httpx.HTTPError, ValueError, KeyError, TypeError, TimeoutError):
                continue
            self.dialect = dialect
            log.info("%s tokenizes prompts (%s dialect)", self.root, dialect)
            return n
        self.dialect = "none"
        return None

    async def _tokens(self, text: str, model: str, dialect: str | None = None) -> int:
        dialect = dialect or self.dialect
        if not text:
            return 0
        body: dict[str, Any] = (
            {"content": text} if dialect == "llama.cpp" else {"model": model, "prompt": text}
        )
        self.calls += 1
        r = await asyncio.wait_for(
            self._client.post(f"{self.root}/tokenize", json=body, headers=self.headers),
            self.timeout_s,
        )
        r.raise_for_status()
        data = r.json()
        if dialect == "vllm" and isinstance(data.get("count"), int):
            return int(data["count"])
        tokens = data["tokens"]
        if not isinstance(tokens, list):
            raise TypeError("tokens is not a list")
        return len(tokens)
