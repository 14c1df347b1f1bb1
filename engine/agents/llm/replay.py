"""Play recorded LLM responses back: offline, free and deterministic runs.

Matching (docs/ARCHITECTURE.md, "Cassette"), for a request of role R, among unused records of R:
1. the first whose `request_hash` equals the request's (an exact re-run of a recorded run);
2. else the first whose `when` is a substring of the request's last user message (a hand-written
   cassette aiming a reply at a prompt, e.g. a fix for a given error);
3. else the first with no `when`;
4. else the first at all (running short of targeted replies beats stopping the run).
The recorded usage is returned, so the budget is charged exactly as the live run was.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looptree.engine.agents.llm.recorder import CALLS_FILE, CallRecorder, request_hash
from looptree.engine.agents.llm.types import (
    CassetteExhausted,
    LLMEmptyReply,
    LLMRequest,
    LLMResponse,
    estimate_prompt_tokens,
    estimate_text_tokens,
    last_user_message,
)
from looptree.engine.errors import ConfigError

log = logging.getLogger("looptree.llm.replay")


@dataclass
class CassetteRecord:
    """One recorded response."""

    line: int
    role: str
    request_hash: str | None
    when: str | None
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str
    model: str | None
    used: bool = False


def resolve_cassette_path(path: str | Path) -> Path:
    """A cassette file, or `<dir>/calls.jsonl` when given a directory (e.g. a run's `llm/`)."""
    p = Path(path)
    if p.is_dir():
        p = p / CALLS_FILE
    if not p.is_file():
        raise ConfigError(f"cassette not found: {p}")
    return p


def load_cassette(path: str | Path) -> list[CassetteRecord]:
    """Parse a cassette; any malformed line is a ConfigError naming the file and line."""
    p = resolve_cassette_path(path)
    try:
        raw_lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read cassette {p}: {exc}") from None
    records = []
    for number, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"cassette {p} line {number}: not valid JSON ({exc.msg})") from None
        records.append(_parse_record(obj, p, number))
    return records


def _parse_record(obj: Any, path: Path, number: int) -> CassetteRecord:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"cassette {path} line {number}: {why}")

    if not isinstance(obj, dict):
        raise bad("expected a JSON object")
    role = obj.get("role")
    if not isinstance(role, str) or not role:
        raise bad("missing 'role'")
    response = obj.get("response")
    if not isinstance(response, dict):
        raise bad("missing 'response' object")
    text = response.get("text")
    if not isinstance(text, str):
        raise bad("'response.text' must be a string")
    when = obj.get("when")
    if when is not None and not isinstance(when, str):
        raise bad("'when' must be a string or null")
    usage = response.get("usage")
    prompt = completion = None
    if usage is not None:
        if not isinstance(usage, dict):
            raise bad("'response.usage' must be an object")
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        for value in (prompt, completion):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad("usage token counts must be non-negative integers")
    req_hash = obj.get("request_hash")
    return CassetteRecord(
        line=number,
        role=role,
        request_hash=req_hash if isinstance(req_hash, str) and req_hash else None,
        when=when or None,
        text=text,
        prompt_tokens=prompt,
        completion_tokens=completion,
        finish_reason=str(response.get("finish_reason") or "stop"),
        model=response.get("model") if isinstance(response.get("model"), str) else None,
    )


class ReplayBackend:
    """`LLMBackend` that answers from a cassette; optionally re-records what it plays, so a
    replayed run's `llm/calls.jsonl` is a cassette too."""

    def __init__(self, cassette_path: str | Path, *, recorder: CallRecorder | None = None) -> None:
        self.path = resolve_cassette_path(cassette_path)
        self.records = load_cassette(self.path)
        self._recorder = recorder
        self._lock = asyncio.Lock()

    def mark_used(self, texts: list[str]) -> int:
        """A resumed run already consumed these replies: never hand them out again."""
        marked = 0
        for text in texts:
            for record in self.records:
                if not record.used and record.text == text:
                    record.used = True
                    marked += 1
                    break
        return marked

    def remaining(self, role: str) -> int:
        """Unused records of `role`."""
        return sum(1 for r in self.records if r.role == role and not r.used)

    async def complete(self, request: LLMRequest) -> LLMResponse:
        async with self._lock:  # two concurrent calls must never get the same record
            record = self._pick(request)
            record.used = True
        estimated = record.prompt_tokens is None and record.completion_tokens is None
        if estimated:
            prompt = estimate_prompt_tokens(request.messages)
            completion = estimate_text_tokens(record.text)
        else:
            prompt, completion = record.prompt_tokens or 0, record.completion_tokens or 0
        if not record.text.strip():  # behave like the live backend would
            raise LLMEmptyReply(
                f"cassette {self.path} line {record.line}: empty reply",
                attempts=1,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
        response = LLMResponse(
            text=record.text,
            prompt_tokens=prompt,
            completion_tokens=completion,
            finish_reason=record.finish_reason,
            model=record.model or request.model,
            usage_estimated=estimated,
        )
        if self._recorder is not None:
            try:
                await self._recorder.record_call(
                    request, response, provider="replay", cassette_line=record.line
                )
            except OSError as exc:  # the budget must still be charged: do not fail the call
                log.error("could not record replayed LLM call: %s", exc)
        return response

    def _pick(self, request: LLMRequest) -> CassetteRecord:
        candidates = [r for r in self.records if r.role == request.role and not r.used]
        if not candidates:
            total = sum(1 for r in self.records if r.role == request.role)
            raise CassetteExhausted(
                f"cassette has no more {request.role!r} responses (used {total} of {total})",
                attempts=0,
            )
        wanted = request_hash(request.model, request.messages)
        for record in candidates:
            if record.request_hash == wanted:
                return record
        last_user = last_user_message(request.messages)
        for record in candidates:
            if record.when is not None and record.when in last_user:
                return record
        for record in candidates:
            if record.when is None:
                return record
        return candidates[0]
