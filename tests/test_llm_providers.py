"""Provider defaults and key resolution, prices, and redaction."""

from __future__ import annotations

import pytest

from looptree.engine.agents.llm import build_llm
from looptree.engine.agents.llm.budget import TokenBudget
from looptree.engine.agents.llm.pricing import APPROX_LIST_PRICES, PriceTable, cost
from looptree.engine.agents.llm.providers import LOCAL_DUMMY_KEY, PROVIDERS, resolve_endpoint
from looptree.engine.agents.llm.redact import REDACTED, Redactor, redact_text
from looptree.engine.errors import ConfigError


@pytest.mark.parametrize(
    ("provider", "url", "env"),
    [
        ("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
        ("google", "https://generativelanguage.googleapis.com/v1beta/openai/", "GEMINI_API_KEY"),
        ("openrouter", "https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
        ("cborg", "https://api.cborg.lbl.gov", "CBORG_API_KEY"),
        ("deepseek", "https://api.deepseek.com", "DEEPSEEK_API_KEY"),
    ],
)
def test_provider_defaults(provider, url, env):
    endpoint = resolve_endpoint(provider, environ={env: "key-for-" + provider})
    assert (endpoint.base_url, endpoint.api_key, endpoint.key_env) == (
        url, "key-for-" + provider, env)
    assert "key-for" not in repr(endpoint)


def test_missing_key_message():
    with pytest.raises(ConfigError) as info:
        resolve_endpoint("openai", environ={})
    assert str(info.value) == (
        "agent.provider = 'openai' needs an API key in $OPENAI_API_KEY "
        "(or set agent.api_key_env)"
    )
    with pytest.raises(ConfigError, match=r"in \$OPENAI_API_KEY"):
        resolve_endpoint("openai", environ={"OPENAI_API_KEY": "   "})  # blank is missing


def test_api_key_env_is_used_exclusively():
    env = {"WORK_KEY": "work-key-123", "GEMINI_API_KEY": "personal-key-456"}
    assert resolve_endpoint("google", "", "WORK_KEY", environ=env).api_key == "work-key-123"
    with pytest.raises(ConfigError) as info:
        resolve_endpoint("google", "", "MISSING_KEY", environ=env)
    assert str(info.value) == (
        "agent.provider = 'google' needs an API key in $MISSING_KEY "
        "(agent.api_key_env; google's usual variable is $GEMINI_API_KEY)"
    )


def test_base_url_override_local_and_replay():
    env = {"OPENAI_API_KEY": "sk-abc"}
    assert resolve_endpoint("openai", "http://gw:9/v1", environ=env).base_url == "http://gw:9/v1"
    local = resolve_endpoint("local", environ={})
    assert (local.base_url, local.api_key) == ("http://localhost:8000/v1", LOCAL_DUMMY_KEY)
    assert resolve_endpoint("local", environ={"LOCAL_API_KEY": "lk"}).api_key == "lk"
    replay = resolve_endpoint("replay", environ={})
    assert (replay.base_url, replay.api_key) == ("", "")
    with pytest.raises(ConfigError, match="is not one of: openai, google"):
        resolve_endpoint("anthropic", environ={})
    assert set(PROVIDERS) == {"openai", "google", "openrouter", "cborg", "deepseek", "local",
                              "replay"}


def test_resolved_key_is_registered_for_redaction():
    key = "plain-looking-secret-value-42"
    resolve_endpoint("deepseek", environ={"DEEPSEEK_API_KEY": key})
    assert redact_text(f"header was {key}!") == f"header was {REDACTED}!"


def test_build_llm_checks_before_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$OPENROUTER_API_KEY"):
        build_llm("openrouter", budget=TokenBudget(10))
    with pytest.raises(ConfigError, match="cassette not found"):
        build_llm("replay", budget=TokenBudget(10), cassette=tmp_path / "none.jsonl")
    stack = build_llm("local", budget=TokenBudget(10), requests_per_minute=60,
                      record_dir=tmp_path / "llm")
    assert stack.limiter is not None and stack.limiter.rpm == 60
    assert stack.backend.budget is stack.budget


def test_pricing():
    assert cost("gpt-4.1-mini", 1_000_000, 1_000_000) == pytest.approx(0.40 + 1.60)
    # dated snapshots and router prefixes find the right (longest) entry
    table = PriceTable()
    assert table.lookup("gpt-4.1-mini-2025-04-14") == APPROX_LIST_PRICES["gpt-4.1-mini"]
    assert table.lookup("openai/gpt-4.1") == APPROX_LIST_PRICES["gpt-4.1"]
    assert table.lookup("GPT-4o") == APPROX_LIST_PRICES["gpt-4o"]
    assert table.cost("no-such-model", 10**6, 10**6) == 0.0 and not table.known("no-such-model")
    user = PriceTable({"gpt-4.1": [1.0, 2.0], "my-local": {"input": 0, "output": 0}})
    assert user.cost("gpt-4.1", 2_000_000, 500_000) == pytest.approx(2.0 + 1.0)
    assert user.known("my-local") and user.known("gpt-4o")  # merged over the built-ins
    with pytest.raises(ConfigError, match="price for model 'x'"):
        PriceTable({"x": "cheap"})
    with pytest.raises(ConfigError, match="finite and >= 0"):
        PriceTable({"x": [-1, 2]})


def test_redaction_patterns_and_code_survives():
    r = Redactor(["exact-secret-value-1"])
    text = (
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz123456 "
        "key sk-proj-AbC123dEf456GhI789jKl and sk-or-v1-0123456789abcdef0123 "
        "google AIzaSyA1234567890abcdefghijklmnopqrstu "
        "url https://x/v1?key=zzzsecretzzz&alt=json "
        "cfg api_key: 'abcd1234efgh5678ijkl' exact-secret-value-1"
    )
    out = r.text(text)
    for secret in ("abcdefghijklmnopqrstuvwxyz123456", "AbC123dEf456GhI789jKl",
                   "0123456789abcdef0123", "AIzaSyA123", "zzzsecretzzz",
                   "abcd1234efgh5678ijkl", "exact-secret-value-1"):
        assert secret not in out
    assert "alt=json" in out
    code = "xs = sorted(xs, key=len)\napi_key = os.environ['X']  # sk-learn-compatible\n"
    assert r.text(code) == code
    assert r.obj({"headers": {"Authorization": "Bearer x", "Accept": "json"}, "n": 3}) == {
        "headers": {"Authorization": REDACTED, "Accept": "json"}, "n": 3}
    assert Redactor(["short"]).text("short stays") == "short stays"  # too short to be a key
