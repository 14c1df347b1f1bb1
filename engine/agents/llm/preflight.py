"""Before the baseline: can each configured endpoint be reached, does it take our key, does it
serve our model? One cheap request each, and a one-line hint for the usual mistakes.

Why before anything else: a wrong port or a `base_url` without `/v1` used to run the 10–20 s
baseline first and then "finish" with 0 tokens and exit 0. `looptree doctor` shows the same
checks. The probe is `GET <base_url>/models`; only when that does not settle the question (no
list, or our model missing from it — llama.cpp answers to any model name) is a one-token chat
request sent. Nothing here is charged to the run's budget.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx2 as httpx  # the openai client's own transport (declared in pyproject)

from looptree.engine.agents.llm.providers import Endpoint, resolve_endpoint
from looptree.engine.agents.llm.redact import redact_text
from looptree.engine.agents.llm.serverinfo import auth_headers, discover_slots
from looptree.engine.agents.llm.types import one_line
from looptree.engine.errors import ConfigError, LooptreeError

CHECK_TIMEOUT_S = 10.0
# A one-token reply from a busy single-slot server can take a while: it is not a failure.
PROBE_TIMEOUT_S = 60.0
_LIST_SHOWN = 8


@dataclass
class EndpointCheck:
    """One endpoint × model: reachable and usable (`ok`), and one line saying why (or why not)."""

    endpoint: str  # the base URL asked
    model: str
    ok: bool
    reason: str  # one line: what was found, or what is wrong and the likely fix
    provider: str = ""
    slots: int | None = None  # requests the server runs at once, when it says (llama.cpp)


def _models_of(config: Any) -> list[str]:
    """The distinct models a run asks for (agent.model and any per-role override)."""
    agent = config.agent
    names = [agent.model] + [getattr(agent.models, r, "") for r in ("ideas", "optimize", "fix")]
    return list(dict.fromkeys(n for n in names if n))


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _server_message(r: Any) -> str:
    try:
        body = r.json()
    except ValueError:
        return one_line(redact_text(r.text or ""), 200)
    message: Any = body
    if isinstance(body, dict):
        message = body.get("error") or body.get("message") or body.get("detail") or body
        if isinstance(message, dict):
            message = message.get("message") or message
    return one_line(redact_text(str(message)), 200)


def _transport_reason(exc: Exception, url: str, timeout_s: float) -> str:
    where = _host_port(url)
    text = str(exc).lower()
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from {where} within {timeout_s:g} s (agent.base_url = {url!r})"
    if isinstance(exc, httpx.ConnectError):
        if any(s in text for s in ("name or service", "nodename", "name resolution", "getaddrinfo")):
            return f"cannot resolve host {urlsplit(url).hostname!r} (agent.base_url = {url!r})"
        return (f"nothing listening at {where} (connection refused); is the server running? "
                f"(agent.base_url = {url!r})")
    return f"cannot reach {where}: {type(exc).__name__} (agent.base_url = {url!r})"


def _key_reason(endpoint: Endpoint, r: Any) -> str:
    where = f"{endpoint.base_url} refuses the API key (HTTP {r.status_code}: {_server_message(r)})"
    if endpoint.api_key and endpoint.key_env and endpoint.api_key != "not-needed":
        return f"{where}; check ${endpoint.key_env}"
    return f"{where}; it wants one: set agent.api_key_env to the variable that holds it"


def _v1_hint(base_url: str) -> str | None:
    path = urlsplit(base_url).path.rstrip("/")
    if path.endswith("/v1"):
        return None
    return base_url.rstrip("/") + "/v1"


async def _check_one(
    endpoint: Endpoint, models: list[str], timeout_s: float, probe_timeout_s: float
) -> list[EndpointCheck]:
    base = endpoint.base_url.rstrip("/")
    headers = auth_headers(endpoint.api_key)

    def result(model: str, ok: bool, reason: str, slots: int | None = None) -> EndpointCheck:
        return EndpointCheck(endpoint.base_url, model, ok, one_line(reason), endpoint.provider, slots)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))) as client:
        async def get(url: str) -> Any:
            return await asyncio.wait_for(client.get(url, headers=headers), timeout_s + 1)

        try:
            r = await get(f"{base}/models")
        except (httpx.HTTPError, TimeoutError) as exc:
            reason = _transport_reason(exc if isinstance(exc, httpx.HTTPError) else httpx.TimeoutException(""),
                                       endpoint.base_url, timeout_s)
            return [result(m, False, reason) for m in models]
        if r.status_code in (401, 403):
            return [result(m, False, _key_reason(endpoint, r)) for m in models]
        listed: list[str] | None = None
        v1 = _v1_hint(endpoint.base_url)
        if r.status_code == 404 and v1 is not None:
            try:
                r1 = await get(f"{v1}/models")
            except (httpx.HTTPError, TimeoutError):
                r1 = None
            if r1 is not None and r1.status_code in (200, 401, 403):
                reason = (f"HTTP 404 at {base}/models; did you mean agent.base_url = {v1!r}? "
                          f"(the server answers under /v1)")
                return [result(m, False, reason) for m in models]
        if r.status_code == 200:
            try:
                data = r.json().get("data")
                if isinstance(data, list):
                    listed = [str(d.get("id")) for d in data if isinstance(d, dict) and d.get("id")]
            except (ValueError, AttributeError):
                listed = None
        slots = None
        if endpoint.provider == "local":
            slots = await discover_slots(client, endpoint.base_url, endpoint.api_key, timeout_s)
        checks = []
        for model in models:
            if listed and model in listed:
                checks.append(result(model, True, f"reached; serves {model!r}", slots))
                continue
            checks.append(await _probe(client, endpoint, model, listed, r.status_code, v1,
                                       probe_timeout_s, slots))
        return checks


async def _probe(client: Any, endpoint: Endpoint, model: str, listed: list[str] | None,
                 models_status: int, v1: str | None, timeout_s: float,
                 slots: int | None) -> EndpointCheck:
    """A one-token chat request settles what the models list could not."""
    base = endpoint.base_url.rstrip("/")

    def result(ok: bool, reason: str) -> EndpointCheck:
        return EndpointCheck(endpoint.base_url, model, ok, one_line(reason), endpoint.provider, slots)

    def shown() -> str:
        names = ", ".join(repr(n) for n in (listed or [])[:_LIST_SHOWN])
        more = len(listed or []) - _LIST_SHOWN
        return names + (f" and {more} more" if more > 0 else "")

    body = {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 1}
    try:
        r = await asyncio.wait_for(
            client.post(f"{base}/chat/completions", json=body, headers=auth_headers(endpoint.api_key),
                        timeout=httpx.Timeout(timeout_s, connect=5.0)),
            timeout_s + 1,
        )
    except TimeoutError:
        return result(True, f"reached, but a one-token request got no answer within {timeout_s:g} s "
                            f"(busy or slow; calls will wait for it)")
    except httpx.TimeoutException:
        return result(True, f"reached, but a one-token request got no answer within {timeout_s:g} s "
                            f"(busy or slow; calls will wait for it)")
    except httpx.HTTPError as exc:
        return result(False, _transport_reason(exc, endpoint.base_url, timeout_s))
    status = r.status_code
    if status == 200:
        if listed:
            return result(True, f"reached; {model!r} is not in its models list ({shown()}) but it answered")
        return result(True, f"reached; {model!r} answered")
    if status in (401, 403):
        return result(False, _key_reason(endpoint, r))
    if status == 429:
        return result(True, f"reached; rate-limited right now (HTTP 429: {_server_message(r)})")
    if status in (400, 404) and listed:
        return result(False, f"model {model!r} is not served at {endpoint.base_url}; it has: {shown()} "
                             f"(set agent.model)")
    if status == 404:
        hint = f"; did you mean agent.base_url = {v1!r}?" if v1 is not None else ""
        return result(False, f"HTTP 404 at {base}/chat/completions: {_server_message(r)}{hint}")
    return result(False, f"{endpoint.base_url} answered HTTP {status}: {_server_message(r)}")


async def check_endpoints(
    config: Any,
    *,
    timeout_s: float = CHECK_TIMEOUT_S,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
    environ: Any = None,
) -> list[EndpointCheck]:
    """One check per configured endpoint × model (`[]` for provider 'replay': no network).

    Never raises for what it finds: a missing key, a refused connection or an unknown model is a
    failed check with its reason, so `looptree doctor` can show them all.
    """
    agent = config.agent
    if agent.provider == "replay":
        return []
    models = _models_of(config)
    try:
        endpoint = resolve_endpoint(agent.provider, agent.base_url, agent.api_key_env, environ=environ)
    except ConfigError as exc:
        url = agent.base_url or ""
        return [EndpointCheck(url, m, False, str(exc), agent.provider) for m in models]
    return await _check_one(endpoint, models, timeout_s, probe_timeout_s)


async def require_endpoints(config: Any, **kw: Any) -> list[EndpointCheck]:
    """`check_endpoints`, raising one LooptreeError line for the first failure (the run's start)."""
    checks = await check_endpoints(config, **kw)
    failed = [c for c in checks if not c.ok]
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more failed check(s))" if len(failed) > 1 else ""
        raise LooptreeError(f"agent endpoint check failed: {first.reason}{more}")
    return checks
