"""Recorder output, redaction of the run directory, and cassette replay."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from looptree.engine.agents.llm.budget import BudgetedBackend, TokenBudget
from looptree.engine.agents.llm.openai_backend import OpenAIBackend
from looptree.engine.agents.llm.providers import resolve_endpoint
from looptree.engine.agents.llm.recorder import CallRecorder, request_hash
from looptree.engine.agents.llm.replay import ReplayBackend
from looptree.engine.agents.llm.types import CassetteExhausted, LLMEmptyReply, LLMRequest, LLMRequestRejected
from looptree.engine.errors import ConfigError

try:
    from llm_server import llm_server, reply, status  # noqa: F401
except ImportError:  # tests/ became a package
    from tests.llm_server import llm_server, reply, status  # noqa: F401


def make_request(user: str, role: str = "optimize", model: str = "gpt-4.1-mini") -> LLMRequest:
    return LLMRequest(
        role=role,
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": user}],
        model=model,
        max_tokens=200,
        temperature=0.5,
        node_id="3.1",
        prompt_hash="p",
    )


def record(role: str, text: str, *, when: str | None = None, req_hash: str | None = None,
           usage: tuple[int, int] = (10, 5)) -> dict:
    return {
        "role": role,
        "node_id": None,
        "request_hash": req_hash or "",
        "when": when,
        "request": {},
        "response": {
            "text": text,
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
            "finish_reason": "stop",
            "model": "recorded-model",
        },
    }


def write_cassette(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_request_hash_is_sha256_of_canonical_model_and_messages():
    import hashlib

    messages = [{"role": "user", "content": "héllo"}]
    canonical = '{"messages":[{"content":"héllo","role":"user"}],"model":"m"}'
    assert request_hash("m", messages) == hashlib.sha256(canonical.encode()).hexdigest()
    assert request_hash("m", messages) != request_hash("m2", messages)


async def test_live_calls_are_recorded_as_a_cassette_without_the_key(
    llm_server, tmp_path, monkeypatch
):
    key = "sk-live-9f8e7d6c5b4a39281706abcdef"
    monkeypatch.setenv("LOOPTREE_TEST_SECRET_KEY", key)
    endpoint = resolve_endpoint("openai", llm_server.base_url, "LOOPTREE_TEST_SECRET_KEY")
    run_dir = tmp_path / "run"
    recorder = CallRecorder(run_dir / "llm")
    backend = OpenAIBackend(endpoint, timeout_s=2, recorder=recorder, backoff_base_s=0.01)
    llm_server.script(
        status(500),
        reply("Use a dict.", prompt_tokens=30, completion_tokens=4),
        status(401, message=f"Incorrect API key provided: {key}. Authorization: Bearer {key}"),
    )
    request = make_request(f"Optimize. (debug: api_key={key})")
    await backend.complete(request)
    with pytest.raises(LLMRequestRejected) as info:
        await backend.complete(make_request("second"))
    await backend.aclose()
    assert key not in str(info.value)

    calls = (run_dir / "llm" / "calls.jsonl").read_text().splitlines()
    errors = (run_dir / "llm" / "errors.jsonl").read_text().splitlines()
    assert len(calls) == 1 and len(errors) == 1
    rec = json.loads(calls[0])
    assert list(rec)[:6] == ["role", "node_id", "request_hash", "when", "request", "response"]
    assert rec["role"] == "optimize" and rec["node_id"] == "3.1" and rec["when"] is None
    assert rec["request_hash"] == request_hash(request.model, request.messages)
    assert rec["response"] == {
        "text": "Use a dict.",
        "usage": {"prompt_tokens": 30, "completion_tokens": 4},
        "finish_reason": "stop",
        "model": "gpt-4.1-mini",
    }
    assert rec["meta"]["attempts"] == 2
    err = json.loads(errors[0])
    assert err["error"]["status"] == 401 and err["error"]["type"] == "LLMRequestRejected"

    # The key the server saw is nowhere in the run directory.
    assert llm_server.requests[0].headers["authorization"] == f"Bearer {key}"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert key not in path.read_text(), path
            assert key[:20] not in path.read_text(), path

    # ... and the recorded calls replay as a cassette (directory form), same usage.
    budget = TokenBudget(10_000)
    replay = BudgetedBackend(ReplayBackend(run_dir / "llm"), budget)
    replayed = await replay.complete(request)
    assert (replayed.text, replayed.prompt_tokens, replayed.completion_tokens) == (
        "Use a dict.", 30, 4)
    assert budget.spent == 34


async def test_matching_order_hash_then_when_then_plain_then_any(tmp_path):
    target = make_request("Fix this: IndexError in solver.py", role="fix")
    cassette = write_cassette(tmp_path / "c.jsonl", [
        record("fix", "plain 1"),
        record("fix", "when KeyError", when="KeyError"),
        record("fix", "when IndexError", when="IndexError"),
        record("fix", "exact", req_hash=request_hash(target.model, target.messages)),
        record("optimize", "an optimize reply"),
        record("fix", "plain 2"),
    ])
    backend = ReplayBackend(cassette)
    got = [(await backend.complete(target)).text for _ in range(5)]
    assert got == ["exact", "when IndexError", "plain 1", "plain 2", "when KeyError"]
    with pytest.raises(CassetteExhausted) as info:
        await backend.complete(target)
    assert str(info.value) == "cassette has no more 'fix' responses (used 5 of 5)"
    assert (await backend.complete(make_request("x"))).text == "an optimize reply"


async def test_exhaustion_message_names_role_and_counts(tmp_path):
    cassette = write_cassette(tmp_path / "c.jsonl", [record("optimize", f"r{i}") for i in range(6)])
    backend = ReplayBackend(cassette)
    for _ in range(6):
        await backend.complete(make_request("go"))
    with pytest.raises(CassetteExhausted, match=r"no more 'optimize' responses \(used 6 of 6\)"):
        await backend.complete(make_request("go"))
    with pytest.raises(CassetteExhausted, match=r"no more 'ideas' responses \(used 0 of 0\)"):
        await backend.complete(make_request("go", role="ideas"))


async def test_replay_charges_recorded_usage_and_empty_text_like_live(tmp_path):
    cassette = write_cassette(tmp_path / "c.jsonl", [
        record("ideas", '["a", "b"]', usage=(111, 22)),
        record("ideas", "", usage=(50, 7)),
    ])
    budget = TokenBudget(10_000)
    backend = BudgetedBackend(ReplayBackend(cassette), budget)
    response = await backend.complete(make_request("ideas?", role="ideas"))
    assert (response.prompt_tokens, response.completion_tokens) == (111, 22)
    assert response.model == "recorded-model"
    with pytest.raises(LLMEmptyReply):
        await backend.complete(make_request("ideas?", role="ideas"))
    assert budget.spent == 133 + 57 and budget.reserved == 0


async def test_concurrent_replay_hands_out_each_record_once(tmp_path):
    records = [record("optimize", f"r{i}") for i in range(20)]
    cassette = write_cassette(tmp_path / "c.jsonl", records)
    backend = ReplayBackend(cassette)
    replies = await asyncio.gather(*(backend.complete(make_request(f"q{i}")) for i in range(20)))
    assert sorted(r.text for r in replies) == sorted(f"r{i}" for i in range(20))
    assert backend.remaining("optimize") == 0


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"role": "fix"}', "missing 'response' object"),
        ('{"role": "fix", "response": {"text": 3}}', "'response.text' must be a string"),
        ('{"response": {"text": "x"}}', "missing 'role'"),
        ('{"role": "fix", "response": {"text": "x", "usage": {"prompt_tokens": -1}}}',
         "usage token counts must be non-negative integers"),
    ],
)
def test_malformed_cassette_line_is_a_config_error_naming_the_line(tmp_path, line, why):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record("fix", "ok")) + "\n\n" + line + "\n")
    with pytest.raises(ConfigError) as info:
        ReplayBackend(path)
    assert f"{path} line 3: {why}" in str(info.value)


def test_missing_cassette_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cassette not found"):
        ReplayBackend(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="calls.jsonl"):
        ReplayBackend(tmp_path)  # a directory without calls.jsonl


async def test_replay_rerecords_into_a_new_run(tmp_path):
    cassette = write_cassette(tmp_path / "c.jsonl", [record("optimize", "r0", usage=(9, 1))])
    out = tmp_path / "run2" / "llm"
    backend = ReplayBackend(cassette, recorder=CallRecorder(out))
    request = make_request("go")
    await backend.complete(request)
    [line] = (out / "calls.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["request_hash"] == request_hash(request.model, request.messages)
    assert rec["response"]["usage"] == {"prompt_tokens": 9, "completion_tokens": 1}
    assert (await ReplayBackend(out).complete(request)).text == "r0"
