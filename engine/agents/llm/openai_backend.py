"""The live backend: any OpenAI-compatible chat-completions endpoint.

Why we retry ourselves (client `max_retries=0`): every attempt must pass the rate limiter, be
counted, be announced (`retry_listeners` → the `agent_retry` event and a headless line), and end
in one record; the budget holds one reservation for the whole call, so retries are never charged
twice — except an attempt abandoned after the server may have billed it, which the call's
`CallTicket` charges in full before the retry reserves again.

Why streaming and per-endpoint concurrency: a local server that answers one request at a time
takes minutes per call. Requests beyond what the server runs at once (`agent.concurrency`, else
its own `/props` slot count, else 1 for `local`) wait HERE, where waiting is not mistaken for
hanging; a streamed reply is then timed out only by silence — no first token within
`first_token_timeout_s`, or no chunk for `idle_timeout_s` — never by its total length. Every
await that touches the network is bounded. Cancellation is never swallowed: stopping a run
cancels the calls in flight and closes their connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2 as _httpx  # the openai client's own transport (declared in pyproject)
import openai

from looptree.engine.agents.llm.providers import Endpoint
from looptree.engine.agents.llm.ratelimit import RateLimiter
from looptree.engine.agents.llm.recorder import CallRecorder
from looptree.engine.agents.llm.redact import redact_text
from looptree.engine.agents.llm.serverinfo import (
    PromptCounter,
    batching_server,
    discover_slots,
)
from looptree.engine.agents.llm.types import (
    LLMEmptyReply,
    LLMError,
    LLMRequest,
    LLMRequestRejected,
    LLMResponse,
    LLMRetriesExhausted,
    LLMTimeout,
    RetryInfo,
    estimate_text_tokens,
    one_line,
    prompt_token_bound,
)

log = logging.getLogger("looptree.llm.openai")

# Statuses worth retrying: request timeout, lock conflict, rate limit, and any 5xx.
_RETRY_STATUSES = {408, 409, 429}
# 429 codes that mean "out of money", not "too fast": waiting cannot help.
_QUOTA_CODES = {"insufficient_quota", "billing_hard_limit_reached", "quota_exceeded"}
# Requests at once for provider "local" when neither the config nor the server says: a local
# server is most often llama.cpp or Ollama with one slot, where a second request only queues.
LOCAL_DEFAULT_CONCURRENCY = 1
CONNECT_TIMEOUT_S = 10.0

RetryListener = Callable[[LLMRequest, RetryInfo], None]


@dataclass
class _CallState:
    """What one call has been through so far (for error messages and the record)."""

    attempts: int = 0
    adaptations: int = 0
    last_error: str = ""
    errors: list[str] = field(default_factory=list)
    sent: bool = False  # an attempt is past the connection: the server may be computing it


@dataclass
class _Failure:
    reason: str
    retryable: bool
    status: int | None = None
    retry_after: float | None = None
    billed_maybe: bool = False  # abandoned after the request reached the server


class _Silence(Exception):
    """A streamed attempt went quiet for longer than its timeout."""


@dataclass
class _ParamStyle:
    """Per-model request quirks learnt from 400 replies (reasoning models reject some params)."""

    max_tokens_key: str = "max_tokens"
    send_temperature: bool = True
    stream_usage: bool = True
    stream: bool = True


class OpenAIBackend:
    """`LLMBackend` over one shared `openai.AsyncOpenAI` client."""

    accepts_ticket = True  # BudgetedBackend hands each call its CallTicket

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
        first_token_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
        concurrency: int | None = None,
        max_concurrency: int = 0,
        tokenize: bool | None = None,
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
        self.first_token_timeout_s = float(first_token_timeout_s or self.timeout_s)
        self.idle_timeout_s = float(idle_timeout_s or self.timeout_s)
        # An optional deadline for the whole call (all attempts and back-offs, not the wait for
        # the first slot). Off by default: every attempt is bounded by silence timeouts and
        # the retries are counted, so a call cannot run forever anyway.
        self.call_timeout_s = float(call_timeout_s) if call_timeout_s else None
        self._limiter = rate_limiter
        self._recorder = recorder
        self._styles: dict[str, _ParamStyle] = {}
        self.retry_listeners: list[RetryListener] = []
        # Requests at once: configured (> 0), or found on first use (`concurrency_source`).
        self._configured_concurrency = int(concurrency or 0)
        self._max_concurrency = int(max_concurrency or 0)
        self.concurrency: int | None = None  # None until known; 0 = no limit of ours
        self.concurrency_source = ""
        self._slots: asyncio.Semaphore | None = None
        self._slots_lock = asyncio.Lock()
        self._waiting = 0
        if tokenize is None:
            tokenize = endpoint.provider == "local"
        self.prompt_counter = PromptCounter(endpoint.base_url, endpoint.api_key) if tokenize else None
        http_timeout = max(self.timeout_s, self.first_token_timeout_s, self.idle_timeout_s) + 5.0
        # One client for the whole run: one connection pool, reused by every worker.
        self._client = openai.AsyncOpenAI(
            api_key=endpoint.api_key,
            base_url=endpoint.base_url,
            max_retries=0,
            timeout=_httpx.Timeout(http_timeout, connect=CONNECT_TIMEOUT_S),
        )

    async def aclose(self) -> None:
        """Close the connection pools (end of run)."""
        await self._client.close()
        if self.prompt_counter is not None:
            await self.prompt_counter.aclose()

    @property
    def waiting(self) -> int:
        """Calls queued behind our own per-endpoint concurrency limit."""
        return self._waiting

    # -- concurrency --------------------------------------------------------------------------
    async def _ensure_slots(self) -> None:
        if self.concurrency is not None:
            return
        async with self._slots_lock:
            if self.concurrency is not None:
                return
            n, source = self._configured_concurrency, "agent.concurrency"
            if n <= 0 and self.endpoint.provider == "local":
                client = _httpx.AsyncClient(timeout=_httpx.Timeout(5.0, connect=5.0))
                try:
                    found = await discover_slots(client, self.endpoint.base_url, self.endpoint.api_key)
                    batcher = None if found else await batching_server(
                        client, self.endpoint.base_url, self.endpoint.api_key)
                finally:
                    await client.aclose()
                if found:
                    n, source = found, "the server's slot count (/props or /slots)"
                elif batcher:
                    n, source = self._max_concurrency, f"{batcher} batches requests itself"
                else:
                    n, source = LOCAL_DEFAULT_CONCURRENCY, "the default for provider 'local'"
            if n > 0 and self._max_concurrency > 0 and n > self._max_concurrency:
                n, source = self._max_concurrency, f"{source}, capped at search.num_workers"
            self.concurrency = max(0, n)
            self.concurrency_source = source if n > 0 else "no limit"
            self._slots = asyncio.Semaphore(n) if n > 0 else None
            log.info("%s: %s request(s) at once (%s)", self._where(), n or "any number of",
                     self.concurrency_source)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of the endpoint's request slots; queueing here is ours, not the server's."""
        await self._ensure_slots()
        if self._slots is None:
            yield
            return
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    # -- the call -----------------------------------------------------------------------------
    async def complete(self, request: LLMRequest, *, ticket: Any = None) -> LLMResponse:
        """One chat completion, retried on transient failures; raises LLMError when it gives up."""
        started = time.monotonic()
        state = _CallState()
        estimate = prompt_token_bound(request.messages) + max(0, request.max_tokens)
        # Queueing for the first slot is our own pacing, not the server's fault: it does not
        # count against the call's deadline. Later attempts' waits do.
        if self._limiter is not None:
            await self._limiter.acquire(estimate)
        try:
            work = self._with_retries(request, state, estimate, ticket)
            if self.call_timeout_s is None:
                response = await work
            else:
                response = await asyncio.wait_for(work, self.call_timeout_s)
        except TimeoutError:
            if self.call_timeout_s is None:  # not our deadline: a bug, not a timeout to dress up
                raise
            err = LLMTimeout(
                f"LLM call gave up after {self.call_timeout_s:g} s and {state.attempts} "
                f"attempt(s)" + (f"; last error: {state.last_error}" if state.last_error else ""),
                attempts=state.attempts,
                billed_maybe=state.sent,
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
        self, request: LLMRequest, state: _CallState, estimate: int, ticket: Any
    ) -> LLMResponse:
        while True:
            state.attempts += 1
            if state.attempts > 1 and self._limiter is not None:
                await self._limiter.acquire(estimate)
            async with self._slot():
                try:
                    return await self._attempt(request, state, ticket)
                except _Silence as exc:
                    failure = _Failure(str(exc), retryable=True, billed_maybe=True)
                except TimeoutError:
                    failure = _Failure(f"no reply within {self.timeout_s:g} s", retryable=True,
                                       billed_maybe=True)
                except openai.APIStatusError as exc:
                    if self._adapt(request.model, exc):
                        state.adaptations += 1
                        continue
                    failure = self._classify_status(exc)
                except openai.APIConnectionError as exc:
                    failure = _Failure(_connection_reason(exc), retryable=True,
                                       billed_maybe=_maybe_billed(exc))
                except openai.APIError as exc:  # e.g. an error event inside an SSE stream
                    failure = _Failure(f"server error: {_server_message(exc)}", retryable=True)
                except _httpx.TransportError as exc:  # dropped mid-stream, after the headers
                    failure = _Failure(f"connection lost: {type(exc).__name__}", retryable=True,
                                       billed_maybe=True)
            state.sent = False  # (left set when a deadline cancels the attempt mid-flight)

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
                    billed_maybe=failure.billed_maybe,
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
            info = RetryInfo(state.attempts, failure.reason, round(delay, 3), failure.billed_maybe)
            if failure.billed_maybe and ticket is not None:
                p, c = ticket.charge_abandoned()
                info.billed_tokens, info.billed_prompt_tokens, info.billed_completion_tokens = p + c, p, c
            log.info("LLM call attempt %d failed (%s); retrying in %.2f s", state.attempts,
                     failure.reason, delay)
            self._announce(request, info)
            if failure.billed_maybe and ticket is not None:
                await ticket.reserve_again()  # may wait for room, or end the run (BudgetExhausted)
            await asyncio.sleep(delay)

    def _announce(self, request: LLMRequest, info: RetryInfo) -> None:
        for listener in list(self.retry_listeners):
            try:
                listener(request, info)
            except Exception:  # a broken listener must not break the call
                log.exception("retry listener failed")

    async def _attempt(self, request: LLMRequest, state: _CallState, ticket: Any) -> LLMResponse:
        style = self._styles.setdefault(request.model, _ParamStyle())
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            style.max_tokens_key: request.max_tokens,
        }
        if style.send_temperature:
            kwargs["temperature"] = request.temperature
        state.sent = True
        if not (self.stream and style.stream):
            completion = await asyncio.wait_for(
                self._client.chat.completions.create(**kwargs), self.timeout_s
            )
            choice = completion.choices[0] if completion.choices else None
            text = (choice.message.content if choice and choice.message else None) or ""
            finish = (choice.finish_reason if choice else None) or ""
            return self._response(request, text, finish, completion.usage, completion.model,
                                  ticket=ticket)

        if style.stream_usage:
            kwargs["stream_options"] = {"include_usage": True}
        started = time.monotonic()
        first = self.first_token_timeout_s

        def first_left() -> float:
            return max(0.001, first - (time.monotonic() - started))

        try:
            stream = await asyncio.wait_for(
                self._client.chat.completions.create(stream=True, **kwargs), first_left()
            )
        except TimeoutError:
            raise _Silence(f"no first token within {first:g} s") from None
        parts: list[str] = []
        chunks = 0
        finish = ""
        usage = None
        model = ""
        async with stream:  # closes the connection on timeout / cancellation too
            chunk_iter = stream.__aiter__()
            while True:
                waited = first_left() if not chunks else self.idle_timeout_s
                try:
                    chunk = await asyncio.wait_for(chunk_iter.__anext__(), waited)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if not chunks:
                        raise _Silence(f"no first token within {first:g} s") from None
                    raise _Silence(
                        f"stream went silent for {self.idle_timeout_s:g} s after {chunks} chunk(s)"
                    ) from None
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices or []:
                    if choice.delta is not None and choice.delta.content:
                        parts.append(choice.delta.content)
                        chunks += 1
                    if choice.finish_reason:
                        finish = choice.finish_reason
        return self._response(request, "".join(parts), finish, usage, model, ticket=ticket,
                              chunks=chunks)

    # -- helpers ------------------------------------------------------------------------------
    def _response(
        self, request: LLMRequest, text: str, finish: str, usage: Any, model: str | None,
        *, ticket: Any = None, chunks: int = 0,
    ) -> LLMResponse:
        prompt = getattr(usage, "prompt_tokens", None) if usage is not None else None
        completion = getattr(usage, "completion_tokens", None) if usage is not None else None
        estimated = prompt is None and completion is None
        if estimated:
            # No usage reported: charge a count that is never below the truth where we can
            # (the prompt's bound, or what the budget counted it as) and never above the limit.
            prompt = ticket.prompt_tokens if ticket is not None else prompt_token_bound(request.messages)
            limit = max(0, request.max_tokens)
            if finish == "length":
                completion = limit
            else:
                completion = min(limit, max(chunks, estimate_text_tokens(text)))
            log.info("%s reported no token usage; charging an estimate", self._where())
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
        if (style.stream and self.stream and re.search(r"\bstream(ing)?\b", message)
                and "support" in message):
            style.stream = False  # a server that cannot stream: whole replies, timed by timeout_s
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


def _maybe_billed(exc: openai.APIConnectionError) -> bool:
    """False only when the request cannot have reached the server (it never connected)."""
    cause = exc.__cause__ or exc.__context__
    return not isinstance(cause, (_httpx.ConnectError, _httpx.ConnectTimeout))


def _connection_reason(exc: openai.APIConnectionError) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, _httpx.ConnectError) and "refused" in str(cause).lower():
        request = getattr(exc, "request", None)
        url = getattr(request, "url", None)
        where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}" if url else "the server"
        return f"connection refused: nothing listening at {where}"
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
