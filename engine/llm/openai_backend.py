"""The live backend: any OpenAI-compatible chat-completions endpoint.

Why we retry ourselves (client `max_retries=0`): every attempt must pass the rate limiter, be
counted, and end in one record; the budget holds one reservation for the whole call, so retries
are never charged twice. Every await that touches the network is bounded: a per-attempt
timeout (`timeout_s`) and a whole-call deadline (`call_timeout_s`), so a server that hangs or
trickles bytes cannot hang the run. Cancellation is never swallowed: stopping a run cancels the
calls in flight and closes their connections.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import openai

from looptree.engine.llm.providers import Endpoint
from looptree.engine.llm.ratelimit import RateLimiter
from looptree.engine.llm.recorder import CallRecorder
from looptree.engine.llm.redact import redact_text
from looptree.engine.llm.types import (
    LLMEmptyReply,
    LLMError,
    LLMRequest,
    LLMRequestRejected,
    LLMResponse,
    LLMRetriesExhausted,
    LLMTimeout,
    estimate_prompt_tokens,
    estimate_text_tokens,
    one_line,
)

try:  # the transport under the openai client (httpx, or httpx2 in newer releases)
    import httpx2 as _httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx as _httpx  # type: ignore[no-redef]

log = logging.getLogger("looptree.llm.openai")

# Statuses worth retrying: request timeout, lock conflict, rate limit, and any 5xx.
_RETRY_STATUSES = {408, 409, 429}
# 429 codes that mean "out of money", not "too fast": waiting cannot help.
_QUOTA_CODES = {"insufficient_quota", "billing_hard_limit_reached", "quota_exceeded"}


@dataclass
class _CallState:
    """What one call has been through so far (for error messages and the record)."""

    attempts: int = 0
    adaptations: int = 0
    last_error: str = ""
    errors: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    reason: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None


@dataclass
class _ParamStyle:
    """Per-model request quirks learnt from 400 replies (reasoning models reject some params)."""

    max_tokens_key: str = "max_tokens"
    send_temperature: bool = True
    stream_usage: bool = True


class OpenAIBackend:
    """`LLMBackend` over one shared `openai.AsyncOpenAI` client."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout_s: float = 300.0,
        max_retries: int = 4,
        rate_limiter: RateLimiter | None = None,
        recorder: CallRecorder | None = None,
        stream: bool = False,
        call_timeout_s: float | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 120.0,
    ) -> None:
        if not endpoint.base_url:
            raise ValueError("OpenAIBackend needs an endpoint with a base_url")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.stream = stream
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_retry_after_s = float(max_retry_after_s)
        # Worst case of a healthy-but-unlucky call: every attempt times out and every back-off
        # is at its longest. Past that something is wrong beyond what retrying can fix.
        self.call_timeout_s = (
            float(call_timeout_s)
            if call_timeout_s
            else self.timeout_s * (self.max_retries + 1)
            + max(self.backoff_max_s, self.max_retry_after_s) * self.max_retries
        )
        self._limiter = rate_limiter
        self._recorder = recorder
        self._styles: dict[str, _ParamStyle] = {}
        # One client for the whole run: one connection pool, reused by every worker.
        self._client = openai.AsyncOpenAI(
            api_key=endpoint.api_key,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=self.timeout_s,
        )

    async def aclose(self) -> None:
        """Close the connection pool (end of run)."""
        await self._client.close()

    # -- the call -----------------------------------------------------------------------------
    async def complete(self, request: LLMRequest) -> LLMResponse:
        """One chat completion, retried on transient failures; raises LLMError when it gives up."""
        started = time.monotonic()
        state = _CallState()
        estimate = estimate_prompt_tokens(request.messages) + max(0, request.max_tokens)
        # Queueing for the first slot is our own pacing, not the server's fault: it does not
        # count against the call's deadline. Later attempts' waits do.
        if self._limiter is not None:
            await self._limiter.acquire(estimate)
        try:
            response = await asyncio.wait_for(
                self._with_retries(request, state, estimate), self.call_timeout_s
            )
        except TimeoutError:
            err = LLMTimeout(
                f"LLM call gave up after {self.call_timeout_s:g} s and {state.attempts} "
                f"attempt(s)" + (f"; last error: {state.last_error}" if state.last_error else ""),
                attempts=state.attempts,
            )
            await self._record_error(request, err, state, started)
            raise err from None
        except LLMError as err:
            await self._record_error(request, err, state, started)
            raise
        response.attempts = state.attempts
        response.duration_s = time.monotonic() - started
        if self._recorder is not None:
            try:
                await self._recorder.record_call(
                    request,
                    response,
                    provider=self.endpoint.provider,
                    base_url=self.endpoint.base_url,
                    retried=state.errors,
                )
            except OSError as exc:  # the call is paid for: losing the record must not lose it
                log.error("could not record LLM call: %s", exc)
        return response

    async def _with_retries(
        self, request: LLMRequest, state: _CallState, estimate: int
    ) -> LLMResponse:
        while True:
            state.attempts += 1
            if state.attempts > 1 and self._limiter is not None:
                await self._limiter.acquire(estimate)
            try:
                return await asyncio.wait_for(self._attempt(request), self.timeout_s)
            except TimeoutError:
                failure = _Failure(f"no reply within {self.timeout_s:g} s", retryable=True)
            except openai.APIStatusError as exc:
                if self._adapt(request.model, exc):
                    state.adaptations += 1
                    continue
                failure = self._classify_status(exc)
            except openai.APIConnectionError as exc:
                failure = _Failure(_connection_reason(exc), retryable=True)
            except openai.APIError as exc:  # e.g. an error event inside an SSE stream
                failure = _Failure(f"server error: {_server_message(exc)}", retryable=True)
            except _httpx.TransportError as exc:  # dropped mid-stream, after the headers
                failure = _Failure(f"connection lost: {type(exc).__name__}", retryable=True)

            state.last_error = failure.reason
            state.errors.append(failure.reason)
            if not failure.retryable:
                raise LLMRequestRejected(
                    f"{self._where()} refused the request: {failure.reason}",
                    attempts=state.attempts,
                    status=failure.status,
                )
            retries_used = state.attempts - state.adaptations - 1
            if retries_used >= self.max_retries:
                raise LLMRetriesExhausted(
                    f"{self._where()} failed {state.attempts} time(s), giving up: "
                    f"{failure.reason}",
                    attempts=state.attempts,
                    status=failure.status,
                )
            if failure.retry_after is not None:
                if failure.retry_after > self.max_retry_after_s:
                    raise LLMRetriesExhausted(
                        f"{self._where()} asks to wait {failure.retry_after:g} s before retrying "
                        f"(more than {self.max_retry_after_s:g} s): {failure.reason}",
                        attempts=state.attempts,
                        status=failure.status,
                    )
                delay = failure.retry_after * random.uniform(1.0, 1.1)
                if self._limiter is not None:
                    self._limiter.penalize(delay)
            else:
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** retries_used)
                delay *= random.uniform(0.5, 1.0)
            log.info(
                "LLM call attempt %d failed (%s); retrying in %.2f s",
                state.attempts,
                failure.reason,
                delay,
            )
            await asyncio.sleep(delay)

    async def _attempt(self, request: LLMRequest) -> LLMResponse:
        style = self._styles.setdefault(request.model, _ParamStyle())
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            style.max_tokens_key: request.max_tokens,
        }
        if style.send_temperature:
            kwargs["temperature"] = request.temperature
        if not self.stream:
            completion = await self._client.chat.completions.create(**kwargs)
            choice = completion.choices[0] if completion.choices else None
            text = (choice.message.content if choice and choice.message else None) or ""
            finish = (choice.finish_reason if choice else None) or ""
            return self._response(request, text, finish, completion.usage, completion.model)

        if style.stream_usage:
            kwargs["stream_options"] = {"include_usage": True}
        stream = await self._client.chat.completions.create(stream=True, **kwargs)
        parts: list[str] = []
        finish = ""
        usage = None
        model = ""
        async with stream:  # closes the connection on timeout / cancellation too
            async for chunk in stream:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices or []:
                    if choice.delta is not None and choice.delta.content:
                        parts.append(choice.delta.content)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        return self._response(request, "".join(parts), finish, usage, model)

    # -- helpers ------------------------------------------------------------------------------
    def _response(
        self, request: LLMRequest, text: str, finish: str, usage: Any, model: str | None
    ) -> LLMResponse:
        prompt = getattr(usage, "prompt_tokens", None) if usage is not None else None
        completion = getattr(usage, "completion_tokens", None) if usage is not None else None
        estimated = prompt is None and completion is None
        if estimated:
            # No usage reported: charge our estimate rather than nothing.
            prompt = estimate_prompt_tokens(request.messages)
            completion = estimate_text_tokens(text)
            log.warning("%s reported no token usage; charging an estimate", self._where())
        prompt, completion = int(prompt or 0), int(completion or 0)
        if not text.strip():
            why = "empty reply"
            if finish == "length":
                why += f" (all {request.max_tokens} max_tokens used before any text)"
            elif finish:
                why += f" (finish_reason={finish})"
            raise LLMEmptyReply(
                f"{self._where()} sent an {why}",
                attempts=0,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
        return LLMResponse(
            text=text,
            prompt_tokens=prompt,
            completion_tokens=completion,
            finish_reason=finish or "stop",
            model=model or request.model,
            usage_estimated=estimated,
        )

    def _classify_status(self, exc: openai.APIStatusError) -> _Failure:
        status = exc.status_code
        message = _server_message(exc)
        reason = f"HTTP {status}: {message}"
        code = exc.code or (exc.body.get("type") if isinstance(exc.body, dict) else None)
        if status == 429 and code in _QUOTA_CODES:
            return _Failure(reason, retryable=False, status=status)
        if status in _RETRY_STATUSES or status >= 500:
            return _Failure(
                reason, retryable=True, status=status, retry_after=_retry_after(exc.response)
            )
        return _Failure(reason, retryable=False, status=status)

    def _adapt(self, model: str, exc: openai.APIStatusError) -> bool:
        """Learn a model's parameter quirks from a 400 and say whether to resend at once."""
        if exc.status_code != 400:
            return False
        message = _server_message(exc).lower()
        style = self._styles.setdefault(model, _ParamStyle())
        if "max_completion_tokens" in message and style.max_tokens_key == "max_tokens":
            style.max_tokens_key = "max_completion_tokens"
            return True
        if "temperature" in message and style.send_temperature:
            style.send_temperature = False
            return True
        if "stream_options" in message and style.stream_usage and self.stream:
            style.stream_usage = False
            return True
        return False

    def _where(self) -> str:
        return f"{self.endpoint.provider or 'LLM'} endpoint {self.endpoint.base_url}"

    async def _record_error(
        self, request: LLMRequest, err: LLMError, state: _CallState, started: float
    ) -> None:
        if err.attempts == 0:
            err.attempts = state.attempts
        if self._recorder is None:
            return
        try:
            await self._recorder.record_error(
                request,
                err,
                provider=self.endpoint.provider,
                base_url=self.endpoint.base_url,
                duration_s=round(time.monotonic() - started, 3),
                retried=state.errors,
            )
        except OSError as exc:
            log.error("could not record failed LLM call: %s", exc)


def _server_message(exc: openai.APIError) -> str:
    """The server's own error message (redacted, one line), not the client's wrapper text."""
    body = exc.body
    message: Any = None
    if isinstance(body, dict):
        message = body.get("message") or body.get("error")
        if isinstance(message, dict):
            message = message.get("message")
    elif isinstance(body, str) and body.strip():
        message = body
    return one_line(redact_text(str(message or exc.message)), 300)


def _connection_reason(exc: openai.APIConnectionError) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    cause = exc.__cause__ or exc.__context__
    detail = f" ({type(cause).__name__})" if cause is not None else ""
    return f"connection error{detail}"


def _retry_after(response: Any) -> float | None:
    """Seconds from `retry-after-ms` / `Retry-After` (seconds or an HTTP date), if any."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
