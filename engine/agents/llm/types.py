"""The LLM seam: one request type, one response type, one backend protocol, one error family.

Why a seam: the search loop must not care whether replies come from a paid endpoint, a local
server or a recorded cassette. Everything that costs money (budget, rate limits, retries) wraps
a backend from outside, so every backend is charged the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from looptree.engine.errors import LooptreeError

# Rough characters-per-token for English prose and code. Used only where a server reports no
# usage and for budget reservations; deliberately on the generous side (more tokens, not fewer).
CHARS_PER_TOKEN = 3.5
# What a chat message costs beyond its text (role marker, separators) in common tokenizers.
MESSAGE_OVERHEAD_TOKENS = 4
# The assistant reply is primed with a few tokens on every request.
REPLY_PRIMING_TOKENS = 3

# The PROVEN upper bound on prompt tokens (`prompt_token_bound`). Every tokenizer in use maps
# text to tokens of at least one byte each (byte-level BPE: GPT/tiktoken, Llama 3, Qwen;
# SentencePiece with byte fallback: Llama 2, Gemma, Mistral), so a text never takes more tokens
# than its UTF-8 bytes, plus one for a SentencePiece dummy-prefix "▁" per text fragment. What a
# chat template adds around a message is a few special tokens and the role name (ChatML:
# `<|im_start|>user\n … <|im_end|>\n` = 2 specials + 6 bytes; Llama 3 headers: 3 specials +
# 6 bytes; Gemma: 2 specials + 6 bytes), and around the request a BOS token and the generation
# prompt (`<|im_start|>assistant\n`, `<start_of_turn>model\n`). The allowances below are several
# times those, so the bound holds for any template that does not inject text of its own.
MESSAGE_OVERHEAD_BOUND = 16  # tokens per message beyond its text and role name
REQUEST_OVERHEAD_BOUND = 32  # tokens per request (BOS, generation prompt, stray prefixes)


@dataclass
class LLMRequest:
    """One chat completion the engine wants; `prompt_hash` comes from the prompt renderer."""

    role: str  # "ideas" | "optimize" | "fix"
    messages: list[dict]  # OpenAI chat format
    model: str
    max_tokens: int
    temperature: float
    node_id: str | None = None
    prompt_hash: str = ""


@dataclass
class LLMResponse:
    """A finished call. `prompt_tokens`/`completion_tokens` are what the server reported
    (or, with `usage_estimated`, our estimate when it reported nothing)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | ...
    model: str
    cost_usd: float = 0.0
    usage_estimated: bool = False  # the server sent no usage; tokens are estimated from text
    attempts: int = 1  # HTTP attempts it took (retries included); 1 for replay
    duration_s: float = 0.0
    max_tokens: int = 0  # the completion limit the call was sent with (after budget clipping)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def truncated(self) -> bool:
        """The model hit max_tokens: the text is usable but may end mid-edit."""
        return self.finish_reason == "length"


@runtime_checkable
class LLMBackend(Protocol):
    """Anything that turns an `LLMRequest` into an `LLMResponse` (or raises `LLMError`)."""

    async def complete(self, request: LLMRequest) -> LLMResponse: ...


class LLMError(LooptreeError):
    """An LLM call that finally failed. The message is one line saying why.

    `prompt_tokens`/`completion_tokens` are set when the server reported usage even though the
    call is unusable (an empty reply still costs money): the budget charges them.
    """

    def __init__(
        self,
        reason: str,
        *,
        attempts: int = 0,
        status: int | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        billed_maybe: bool = False,
    ) -> None:
        reason = one_line(reason)
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        self.status = status
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        # The last attempt was abandoned after the request reached the server (a timeout, a
        # connection lost mid-reply): the server may have billed it although it reported nothing.
        self.billed_maybe = billed_maybe

    @property
    def reported_tokens(self) -> int | None:
        """Tokens the server billed for this failed call, or None when it reported nothing."""
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


class LLMRequestRejected(LLMError):
    """The endpoint refused the request (4xx other than 408/409/429): retrying cannot help."""


class LLMRetriesExhausted(LLMError):
    """Rate limits, 5xx, timeouts or dropped connections outlasted the retry allowance."""


class LLMTimeout(LLMError):
    """The whole call (all attempts and back-offs) ran past its deadline."""


class LLMEmptyReply(LLMError):
    """The server answered but the reply held no text."""


class CassetteExhausted(LLMError):
    """Replay ran out of recorded responses for a role."""


def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace so a server's multi-line message stays a one-line error."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def message_text(message: dict) -> str:
    """The text of one chat message, whether `content` is a string or a list of parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                parts.append(str(part.get("text", "")))
            else:
                parts.append(str(part))
        return "".join(parts)
    return str(content)


def estimate_text_tokens(text: str) -> int:
    """Tokens in `text` by the chars/3.5 rule, rounded up."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """Prompt tokens for `messages`: text by chars/3.5 plus a per-message overhead."""
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        total += MESSAGE_OVERHEAD_TOKENS + estimate_text_tokens(message_text(message))
    return total


def prompt_token_bound(messages: list[dict]) -> int:
    """An upper bound on the prompt tokens of `messages` under any tokenizer and chat template
    (see MESSAGE_OVERHEAD_BOUND): UTF-8 bytes of each text and role name, plus allowances."""
    total = REQUEST_OVERHEAD_BOUND
    for message in messages:
        total += MESSAGE_OVERHEAD_BOUND + len(str(message.get("role") or "").encode("utf-8"))
        total += len(message_text(message).encode("utf-8"))
    return total


def template_overhead_bound(messages: list[dict]) -> int:
    """The part of `prompt_token_bound` that is not message text (added to an exact text count)."""
    return REQUEST_OVERHEAD_BOUND + sum(
        MESSAGE_OVERHEAD_BOUND + len(str(m.get("role") or "").encode("utf-8")) for m in messages
    )


@dataclass
class RetryInfo:
    """One failed attempt that will be retried (the `agent_retry` event's fields)."""

    attempt: int  # the attempt that failed (1 = the first)
    reason: str
    delay_s: float
    billed_maybe: bool = False  # abandoned after the server may have billed it
    billed_tokens: int = 0  # what the budget charged for it (a conservative estimate)
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0


def last_user_message(messages: list[dict]) -> str:
    """Text of the last `user` message ('' if none); replay matches `when` against it."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""
