"""The endpoint check before the baseline (engine/agents/llm/preflight.py), against tests/llm_server.py
acting out the usual mistakes over real HTTP: nothing listening, a base_url without /v1, a key
the server refuses, a model it does not serve."""

from __future__ import annotations

import socket
import time

import pytest

from looptree.engine.agents.llm.preflight import check_endpoints, require_endpoints
from looptree.engine.core.config import validate_config
from looptree.engine.errors import LooptreeError

try:
    from llm_server import LLMTestServer, llm_server, status
except ImportError:  # tests/ became a package
    from tests.llm_server import LLMTestServer, llm_server, status  # noqa: F401

KEY_ENV = "LOOPTREE_TEST_PREFLIGHT_KEY"


def config_for(base_url: str, **agent):
    data = {
        "project": {"goal": "g", "writable": ["a.py"]},
        "bench": {"command": "true"},
        "agent": {"provider": "local", "base_url": base_url, "model": "gpt-4.1-mini", **agent},
    }
    return validate_config(data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_healthy_server_passes_and_reports_its_slots(llm_server):
    llm_server.configure(slots=2, props=True)
    [check] = await check_endpoints(config_for(llm_server.base_url))
    assert check.ok, check.reason
    assert check.model == "gpt-4.1-mini" and check.endpoint == llm_server.base_url
    assert check.slots == 2
    assert "serves 'gpt-4.1-mini'" in check.reason
    assert llm_server.requests == []  # the model was listed: no chat request was needed


async def test_nothing_listening_names_host_and_port_quickly():
    port = free_port()
    started = time.monotonic()
    [check] = await check_endpoints(config_for(f"http://127.0.0.1:{port}/v1"))
    assert time.monotonic() - started < 3
    assert not check.ok
    assert f"nothing listening at 127.0.0.1:{port}" in check.reason
    assert "\n" not in check.reason


async def test_base_url_without_v1_gets_a_did_you_mean(llm_server):
    llm_server.configure(require_v1=True)
    root = f"http://127.0.0.1:{llm_server.port}"
    [check] = await check_endpoints(config_for(root))
    assert not check.ok
    assert "HTTP 404" in check.reason
    assert f"did you mean agent.base_url = '{root}/v1'" in check.reason
    [fixed] = await check_endpoints(config_for(root + "/v1"))
    assert fixed.ok, fixed.reason


async def test_a_refused_key_names_the_variable(llm_server, monkeypatch: pytest.MonkeyPatch):
    llm_server.configure(api_key="the-right-key-0123456789")
    monkeypatch.setenv(KEY_ENV, "a-wrong-key-0123456789")
    [check] = await check_endpoints(config_for(llm_server.base_url, api_key_env=KEY_ENV))
    assert not check.ok
    assert "refuses the API key" in check.reason and "HTTP 401" in check.reason
    assert f"${KEY_ENV}" in check.reason
    assert "a-wrong-key" not in check.reason
    # A local server that wants a key when none was configured: say how to give one.
    [check] = await check_endpoints(config_for(llm_server.base_url))
    assert not check.ok and "agent.api_key_env" in check.reason


async def test_unknown_model_lists_the_ones_the_server_has(llm_server):
    llm_server.configure(models=["gemma-3-1b-it", "qwen2.5-coder-1.5b"])
    llm_server.script(status(404, message="model 'gpt-4.1-mini' not found"))
    [check] = await check_endpoints(config_for(llm_server.base_url))
    assert not check.ok
    assert "model 'gpt-4.1-mini' is not served" in check.reason
    assert "'gemma-3-1b-it', 'qwen2.5-coder-1.5b'" in check.reason
    [probe] = llm_server.requests
    assert probe.body["max_tokens"] == 1  # one cheap token settled it


async def test_an_unlisted_model_the_server_answers_to_is_fine(llm_server):
    """llama.cpp lists its GGUF file name but answers to any model name."""
    llm_server.configure(models=["gemma-3-1b-it-Q4_K_M.gguf"])
    [check] = await check_endpoints(config_for(llm_server.base_url))
    assert check.ok, check.reason
    assert "not in its models list" in check.reason


async def test_every_role_model_is_checked(llm_server):
    llm_server.configure(models=["a", "b"])
    checks = await check_endpoints(config_for(llm_server.base_url, model="a", models={"fix": "b"}))
    assert [(c.model, c.ok) for c in checks] == [("a", True), ("b", True)]


async def test_replay_needs_no_check_and_a_missing_key_is_a_failed_check(monkeypatch):
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"]}, "bench": {"command": "true"}})
    assert await check_endpoints(config) == []
    monkeypatch.delenv("LOOPTREE_TEST_NO_SUCH_KEY", raising=False)
    config = config_for("", api_key_env="LOOPTREE_TEST_NO_SUCH_KEY")
    config.agent.provider = "openai"
    [check] = await check_endpoints(config)
    assert not check.ok and "$LOOPTREE_TEST_NO_SUCH_KEY" in check.reason


async def test_require_endpoints_raises_one_line():
    port = free_port()
    with pytest.raises(LooptreeError) as info:
        await require_endpoints(config_for(f"http://127.0.0.1:{port}/v1"))
    assert str(info.value).startswith("agent endpoint check failed: nothing listening at")
    assert "\n" not in str(info.value)
