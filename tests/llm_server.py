"""A small, real OpenAI-compatible HTTP server for tests (stdlib only).

Why a real server instead of mocking the client: the things that cost users money — retries,
timeouts, dropped connections, streamed usage — live in the transport, so tests must cross it.

Each test scripts the server with a queue of behaviours (`reply`, `status`, `hang`, `drop`,
`no_usage`, `length`, `empty`, `stall`); once the queue is empty it answers normal replies. A
reply is streamed as SSE when the request asks for `stream: true`, like a real server. The server
keeps the chat requests it got (`requests`; every other request in `other_requests`) and the
usage it reported (`reported`), so a test can check that the budget's `spent` equals what the
server billed.

It can also act like the servers users really point looptree at (all off by default):
- `slots=N`: only N chat requests are computed at once, the others queue inside the server
  (llama.cpp with N slots; `slots=1` is a serial server); `props=True` publishes it as
  llama.cpp does (`GET /props` → `total_slots`, `GET /slots`);
- `tokenizer="bytes"`: prompts are billed one token per UTF-8 byte plus a chat template's few
  tokens per message (denser than the old chars/3.5 estimate, like Gemma on code; "chars4" is
  a lighter one), and `POST /tokenize` answers with that tokenizer (`tokenize_dialect`
  "llama.cpp" or "vllm"; anything else refuses both dialects);
- `require_v1=True`: only `/v1/...` paths exist (404 otherwise); `api_key="..."`: any other
  bearer gets 401; `models=[...]`: what `GET /v1/models` lists;
- `token_delay_s`: a pause between streamed chunks (a slow CPU model).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")


@dataclass
class Behaviour:
    """What the server does with one request."""

    kind: str = "reply"  # reply | status | hang | drop
    text: str | None = None  # None: an automatic short reply
    prompt_tokens: int | None = None  # None: ~chars/4 of the prompt
    completion_tokens: int | None = None  # None: random in 1..max_tokens
    usage: bool = True  # include usage in the reply
    finish_reason: str = "stop"
    status: int = 200
    retry_after: str | None = None
    message: str = "scripted error"
    error_code: str | None = None
    delay_s: float = 0.0  # think time before answering
    hang_s: float = 30.0
    stall_after: int | None = None  # stream this many chunks, then go silent for hang_s


def reply(text: str | None = None, **kw: Any) -> Behaviour:
    return Behaviour("reply", text=text, **kw)


def status(code: int, *, retry_after: str | None = None, message: str = "scripted error",
           error_code: str | None = None) -> Behaviour:
    return Behaviour("status", status=code, retry_after=retry_after, message=message,
                     error_code=error_code)


def hang(seconds: float = 30.0) -> Behaviour:
    return Behaviour("hang", hang_s=seconds)


def drop() -> Behaviour:
    return Behaviour("drop")


def no_usage(text: str = "a reply without usage") -> Behaviour:
    return Behaviour("reply", text=text, usage=False)


def length(text: str = "a reply cut off mid", **kw: Any) -> Behaviour:
    return Behaviour("reply", text=text, finish_reason="length", **kw)


def empty(**kw: Any) -> Behaviour:
    return Behaviour("reply", text="", **kw)


def stall(after_chunks: int = 2, seconds: float = 30.0, text: str = "a reply that stops mid-way") -> Behaviour:
    """Stream `after_chunks` chunks, then nothing for `seconds` (a stream gone silent)."""
    return Behaviour("reply", text=text, stall_after=after_chunks, hang_s=seconds)


TEMPLATE_TOKENS_PER_MESSAGE = 5  # e.g. Gemma: <start_of_turn> role \n … <end_of_turn> \n
TEMPLATE_TOKENS_PER_REQUEST = 4  # <bos> and the generation prompt <start_of_turn>model\n


def byte_tokens(text: str) -> list[int]:
    """The "bytes" tokenizer: one token per UTF-8 byte (more than any estimate by characters)."""
    return list(text.encode("utf-8"))


def chars4_tokens(text: str) -> list[int]:
    """The "chars4" tokenizer: one token per 4 characters (English prose in a big vocabulary)."""
    return list(range(math.ceil(len(text) / 4)))


TOKENIZERS = {"bytes": byte_tokens, "chars4": chars4_tokens}


@dataclass
class SeenRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    script: deque[Behaviour] = field(default_factory=deque)
    requests: list[SeenRequest] = field(default_factory=list)
    reported: list[tuple[int, int]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    default_delay_s: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(1234))
    stop: threading.Event = field(default_factory=threading.Event)
    served: int = 0
    other_requests: list[SeenRequest] = field(default_factory=list)
    slots: threading.Semaphore | None = None
    slot_count: int = 0
    props: bool = False
    tokenizer: str | None = None  # None | "bytes" | "chars4"
    tokenize_dialect: str = "llama.cpp"
    require_v1: bool = False
    api_key: str | None = None
    models: list[str] = field(default_factory=lambda: ["gpt-4.1-mini", "test-model"])
    token_delay_s: float = 0.0
    owned_by: str = "test"  # what /v1/models says owns each model ("vllm" acts as vLLM)
    computing: int = 0
    max_computing: int = 0


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so no test is disturbed by a stale keep-alive.
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _refused(self, path: str) -> bool:
        """The configured errors: a path without /v1, a wrong key. Answers and says True."""
        state = self.server.state
        if state.require_v1 and not path.startswith("/v1/"):
            self._error(404, "File Not Found", None)
            return True
        if state.api_key is not None and self.headers.get("Authorization") != f"Bearer {state.api_key}":
            self._error(401, "Invalid API Key", "invalid_api_key")
            return True
        return False

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        with state.lock:
            state.other_requests.append(
                SeenRequest(path, {k.lower(): v for k, v in self.headers.items()}, {}))
        try:
            if path in ("/props", "/slots") and state.props and state.slot_count:
                if path == "/props":
                    self._json(200, {"total_slots": state.slot_count, "model_path": "test.gguf"})
                else:
                    self._json(200, [{"id": i, "is_processing": False} for i in range(state.slot_count)])
                return
            if path in ("/v1/models", "/models"):
                if self._refused(path):
                    return
                self._json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "owned_by": state.owned_by} for m in state.models]})
                return
            self._error(404, f"no route {path}", None)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:
        state = self.server.state
        size = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(size) if size else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        path = self.path.split("?", 1)[0]
        seen = SeenRequest(path, {k.lower(): v for k, v in self.headers.items()}, body)
        if path not in CHAT_PATHS:
            with state.lock:
                state.other_requests.append(seen)
            try:
                if path == "/tokenize" and state.tokenizer:
                    self._tokenize(body)
                else:
                    self._error(404, f"no route {path}", None)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        with state.lock:
            state.requests.append(seen)
            behaviour = state.script.popleft() if state.script else Behaviour()
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            if self._refused(path):
                return
            if state.slots is not None:
                state.slots.acquire()  # queue inside the server, as a busy llama.cpp does
            try:
                with state.lock:
                    state.computing += 1
                    state.max_computing = max(state.max_computing, state.computing)
                try:
                    self._serve(behaviour, body)
                finally:
                    with state.lock:
                        state.computing -= 1
            finally:
                if state.slots is not None:
                    state.slots.release()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, cancellation): nothing to do
        finally:
            with state.lock:
                state.in_flight -= 1
                state.served += 1

    def _tokenize(self, body: dict[str, Any]) -> None:
        state = self.server.state
        if state.tokenize_dialect == "llama.cpp":
            if not isinstance(body.get("content"), str):
                self._error(400, "'content' is required", None)
                return
            self._json(200, {"tokens": TOKENIZERS[state.tokenizer](body["content"])})
            return
        if state.tokenize_dialect != "vllm" or not isinstance(body.get("prompt"), str):
            self._error(400, "'prompt' is required", None)
            return
        tokens = TOKENIZERS[state.tokenizer](body["prompt"])
        self._json(200, {"count": len(tokens), "max_model_len": 8192, "tokens": tokens})

    # -- behaviours ---------------------------------------------------------------------------
    def _serve(self, b: Behaviour, body: dict[str, Any]) -> None:
        state = self.server.state
        delay = b.delay_s or state.default_delay_s
        if delay:
            state.stop.wait(delay)
        if b.kind == "hang":
            state.stop.wait(b.hang_s)
            return  # by now the client is gone; say nothing
        if b.kind == "drop":
            self.close_connection = True
            return  # close without a byte of response
        if b.kind == "status":
            self._error(b.status, b.message, b.error_code, b.retry_after)
            return
        self._reply(b, body)

    def _reply(self, b: Behaviour, body: dict[str, Any]) -> None:
        state = self.server.state
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 64
        with state.lock:
            n = len(state.requests)
            completion = b.completion_tokens
            if completion is None:
                completion = state.rng.randint(1, int(max_tokens))
        prompt = b.prompt_tokens
        messages = body.get("messages", [])
        if prompt is None and state.tokenizer in TOKENIZERS:
            tokenize = TOKENIZERS[state.tokenizer]
            prompt = TEMPLATE_TOKENS_PER_REQUEST + sum(
                TEMPLATE_TOKENS_PER_MESSAGE + len(tokenize(str(m.get("content") or ""))) for m in messages)
        elif prompt is None:
            chars = sum(len(str(m.get("content") or "")) for m in messages)
            prompt = math.ceil(chars / 4) + 2 * len(messages)
        text = b.text if b.text is not None else f"reply number {n}"
        model = body.get("model", "test-model")
        streaming = bool(body.get("stream"))
        send_usage = b.usage and (
            not streaming or bool((body.get("stream_options") or {}).get("include_usage"))
        )
        if send_usage:
            with state.lock:
                state.reported.append((prompt, completion))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        created = int(time.time())
        if not streaming:
            payload: dict[str, Any] = {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "finish_reason": b.finish_reason,
                             "message": {"role": "assistant", "content": text}}],
            }
            if send_usage:
                payload["usage"] = usage
            self._json(200, payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def event(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            chunk = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk",
                     "created": created, "model": model, "choices": choices}
            if extra:
                chunk.update(extra)
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                "finish_reason": None}])
        pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
        for index, piece in enumerate(pieces):
            if b.stall_after is not None and index == b.stall_after:
                state.stop.wait(b.hang_s)
                return  # by now the client is gone
            if state.token_delay_s and index:
                state.stop.wait(state.token_delay_s)
            event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        event([{"index": 0, "delta": {}, "finish_reason": b.finish_reason}])
        if send_usage:
            event([], {"usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _error(self, code: int, message: str, error_code: str | None,
               retry_after: str | None = None) -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self._json(code, {"error": {"message": message, "type": "test_error",
                                    "code": error_code}}, headers)

    def _json(self, code: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # the stdlib default (5) refuses connections under 16 workers

    def __init__(self, state: _State) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _Handler)


class LLMTestServer:
    """Start with `start()`, script with `script(...)`, read `requests` / `reported`.
    Keyword options: see the module docstring (slots, props, tokenizer, require_v1, ...)."""

    def __init__(self, *, slots: int = 0, props: bool = False, tokenizer: str | None = None,
                 tokenize_dialect: str = "llama.cpp", require_v1: bool = False,
                 api_key: str | None = None, models: list[str] | None = None,
                 token_delay_s: float = 0.0, owned_by: str = "test") -> None:
        self._state = _State()
        self.configure(slots=slots, props=props, tokenizer=tokenizer, tokenize_dialect=tokenize_dialect,
                       require_v1=require_v1, api_key=api_key, models=models, token_delay_s=token_delay_s,
                       owned_by=owned_by)

    def configure(self, *, slots: int | None = None, props: bool | None = None,
                  tokenizer: str | None = None, tokenize_dialect: str | None = None,
                  require_v1: bool | None = None, api_key: str | None = None,
                  models: list[str] | None = None, token_delay_s: float | None = None,
                  owned_by: str | None = None) -> LLMTestServer:
        """Change how the server acts (before the requests it should apply to)."""
        st = self._state
        if slots is not None:
            st.slot_count = slots
            st.slots = threading.Semaphore(slots) if slots > 0 else None
        if props is not None:
            st.props = props
        if tokenizer is not None:
            st.tokenizer = tokenizer
        if tokenize_dialect is not None:
            st.tokenize_dialect = tokenize_dialect
        if require_v1 is not None:
            st.require_v1 = require_v1
        if api_key is not None:
            st.api_key = api_key
        if models is not None:
            st.models = list(models)
        if token_delay_s is not None:
            st.token_delay_s = token_delay_s
        if owned_by is not None:
            st.owned_by = owned_by
        return self
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LLMTestServer:
        self._httpd = _Server(self._state)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._state.stop.set()  # wake hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours: Behaviour) -> None:
        with self._state.lock:
            self._state.script.extend(behaviours)

    def set_delay(self, seconds: float) -> None:
        """Think time for every request without its own delay (creates overlap)."""
        self._state.default_delay_s = seconds

    @property
    def requests(self) -> list[SeenRequest]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def reported(self) -> list[tuple[int, int]]:
        with self._state.lock:
            return list(self._state.reported)

    @property
    def reported_total(self) -> int:
        return sum(p + c for p, c in self.reported)

    @property
    def max_in_flight(self) -> int:
        """Most chat requests the server held at once (queued inside it or computing)."""
        return self._state.max_in_flight

    @property
    def max_computing(self) -> int:
        """Most chat requests computed at once (at most `slots` when set)."""
        return self._state.max_computing

    @property
    def other_requests(self) -> list[SeenRequest]:
        """Every request that was not a chat completion (models, props, tokenize, ...)."""
        with self._state.lock:
            return list(self._state.other_requests)

    def paths(self, path: str) -> int:
        """How many non-chat requests went to `path`."""
        return sum(1 for r in self.other_requests if r.path == path)

    @property
    def pending_script(self) -> int:
        with self._state.lock:
            return len(self._state.script)


@pytest.fixture
def llm_server():
    """A running `LLMTestServer`, stopped after the test."""
    server = LLMTestServer().start()
    try:
        yield server
    finally:
        server.stop()
