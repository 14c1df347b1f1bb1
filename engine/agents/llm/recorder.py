"""Append every finished LLM call to `runs/<N>/llm/calls.jsonl` (and failures to errors.jsonl).

Why this format: a run's `calls.jsonl` is a cassette (docs/ARCHITECTURE.md, "Cassette / llm/
record format"), so any run can be replayed offline for free. Every record is redacted before
it is written; keys never reach the run directory.

Record (documented keys first; `meta` is ours and readers ignore it):
`{"role", "node_id", "request_hash", "when": null, "request": {...}, "response": {"text",
"usage": {"prompt_tokens", "completion_tokens"}, "finish_reason", "model"}, "meta": {...}}`
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

from looptree.engine.agents.llm.redact import DEFAULT as DEFAULT_REDACTOR
from looptree.engine.agents.llm.redact import Redactor
from looptree.engine.agents.llm.types import LLMError, LLMRequest, LLMResponse

CALLS_FILE = "calls.jsonl"
ERRORS_FILE = "errors.jsonl"


def request_hash(model: str, messages: list[dict]) -> str:
    """sha256 hex of the canonical JSON of `{"model", "messages"}` (sorted keys, no spaces)."""
    canonical = json.dumps(
        {"model": model, "messages": messages},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def request_record(request: LLMRequest, **extra: Any) -> dict[str, Any]:
    """The `request` part of a record (what was sent, minus transport details)."""
    out: dict[str, Any] = {
        "model": request.model,
        "messages": request.messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "prompt_hash": request.prompt_hash,
    }
    out.update(extra)
    return out


class CallRecorder:
    """Appends one JSON line per finished call; safe under concurrent calls.

    Writes go through a worker thread (the event loop never blocks on disk) and a lock keeps
    lines whole. A line is flushed before `record_*` returns.
    """

    def __init__(self, directory: str | Path, *, redactor: Redactor | None = None) -> None:
        self.dir = Path(directory)
        self.calls_path = self.dir / CALLS_FILE
        self.errors_path = self.dir / ERRORS_FILE
        self._redactor = redactor or DEFAULT_REDACTOR
        self._lock = threading.Lock()

    async def record_call(
        self, request: LLMRequest, response: LLMResponse, **meta: Any
    ) -> dict[str, Any]:
        """Append a successful call; returns the (redacted) record written."""
        record = {
            "role": request.role,
            "node_id": request.node_id,
            "request_hash": request_hash(request.model, request.messages),
            "when": None,
            "request": request_record(request),
            "response": {
                "text": response.text,
                "usage": {
                    "prompt_tokens": response.prompt_tokens,
                    "completion_tokens": response.completion_tokens,
                },
                "finish_reason": response.finish_reason,
                "model": response.model,
            },
            "meta": {
                "ts": time.time(),
                "attempts": response.attempts,
                "duration_s": round(response.duration_s, 3),
                "usage_estimated": response.usage_estimated,
                **meta,
            },
        }
        return await self._append(self.calls_path, record)

    async def record_error(
        self, request: LLMRequest, error: BaseException, **meta: Any
    ) -> dict[str, Any]:
        """Append a call that finally failed (reason, attempts, any usage the server reported)."""
        record: dict[str, Any] = {
            "role": request.role,
            "node_id": request.node_id,
            "request_hash": request_hash(request.model, request.messages),
            "request": request_record(request),
            "error": {"type": type(error).__name__, "reason": str(error)},
            "meta": {"ts": time.time(), **meta},
        }
        if isinstance(error, LLMError):
            record["error"].update(
                attempts=error.attempts,
                status=error.status,
                prompt_tokens=error.prompt_tokens,
                completion_tokens=error.completion_tokens,
                billed_maybe=error.billed_maybe,
            )
        return await self._append(self.errors_path, record)

    async def _append(self, path: Path, record: dict[str, Any]) -> dict[str, Any]:
        clean = self._redactor.obj(record)
        line = json.dumps(clean, ensure_ascii=False, default=str) + "\n"
        await asyncio.to_thread(self._write, path, line)
        return clean

    def _write(self, path: Path, line: str) -> None:
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
