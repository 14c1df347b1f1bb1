"""looptree.toml: loading, dotted KEY=VALUE overrides, and the one-line messages of every refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from looptree.engine.core.config import (
    CONFIG_NAME,
    Config,
    apply_overrides,
    load_config,
    parse_override,
    validate_config,
)
from looptree.engine.edits.access import check_patterns
from looptree.engine.errors import ConfigError, LooptreeError

FIXTURES = Path(__file__).parent / "fixtures"

MINIMAL = """\
[project]
goal = "Make solve() faster."
writable = ["solver.py"]

[bench]
command = "python bench.py"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / CONFIG_NAME).write_text(text)
    return tmp_path


def error_of(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, overrides=overrides)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    return message


# ---------------------------------------------------------------------------- loading


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.project.goal == "Make solve() faster."
    assert config.project.writable == ["solver.py"]
    assert config.project.readonly == [] and config.project.hidden == []
    assert config.bench.command == "python bench.py"
    assert (config.bench.metrics, config.bench.timeout, config.bench.repeats) == ("metrics.csv", 600, 5)
    assert config.build.command == "" and config.check.command == ""
    assert config.agent.provider == "replay"
    s = config.search
    assert (s.strategy, s.num_samples, s.num_phases, s.max_fix_attempts, s.num_workers, s.early_stop_patience) == (
        "tree", 4, 3, 2, 8, 2)
    assert (config.budget.max_tokens, config.budget.max_cost_usd, config.budget.requests_per_minute) == (2_000_000, 0, 60)
    assert config.gpu.devices == "auto"


def test_every_key_of_the_contract_example_loads(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "eng_contract_config.toml", tmp_path / CONFIG_NAME)
    config = load_config(tmp_path)
    assert config.project.writable == ["solver.py", "kernels/**/*.py"]
    assert config.project.hidden == ["secrets/**"]
    assert config.check.command == "python -m pytest -q tests"
    assert config.agent.api_key_env == "OPENAI_API_KEY"
    # The resolved config survives a dump/validate round trip (run_started carries it; resume re-validates it).
    assert validate_config(config.to_dict()) == config


def test_explicit_config_file_is_used_instead_of_the_project_one(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(MINIMAL.replace("Make solve() faster.", "from the other file"))
    assert load_config(tmp_path, other).project.goal == "from the other file"


def test_config_error_is_a_user_error_with_exit_status_2() -> None:
    assert issubclass(ConfigError, LooptreeError) and ConfigError.exit_code == 2


# ---------------------------------------------------------------------------- refusals, one line each


def test_no_config_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"no looptree.toml in {tmp_path} (run `looptree init {tmp_path}` to write one)"


def test_invalid_toml_names_the_file_and_the_position(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "\n[search\nnum_samples = 3\n")
    assert message.startswith("looptree.toml: invalid TOML: ")
    assert message.endswith("(at line 8, column 8)")


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_bytes(MINIMAL.encode() + b'\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"^looptree.toml: not UTF-8 text$"):
        load_config(tmp_path)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert error_of(tmp_path, "colour = 'blue'\n" + MINIMAL) == "looptree.toml: unknown key 'colour'"


def test_unknown_section(tmp_path: Path) -> None:
    assert error_of(tmp_path, MINIMAL + "[serch]\nnum_samples = 3\n") == "looptree.toml: unknown key 'serch'"


def test_unknown_key_in_a_section(tmp_path: Path) -> None:
    assert error_of(tmp_path, MINIMAL + "[search]\nnum_sample = 3\n") == "looptree.toml: unknown key 'search.num_sample'"


def test_unknown_key_in_a_nested_section(tmp_path: Path) -> None:
    text = MINIMAL + "[agent.models]\nfixer = 'm'\n"
    assert error_of(tmp_path, text) == "looptree.toml: unknown key 'agent.models.fixer'"


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[search]\nnum_samples = 'four'\n")
    assert message == ('looptree.toml: search.num_samples: input should be a valid integer, got "four"')


def test_out_of_range_value_names_the_bound(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[search]\nnum_samples = 0\n")
    assert message == "looptree.toml: search.num_samples: input should be greater than or equal to 1, got 0"


def test_unknown_provider_lists_the_choices(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[agent]\nprovider = 'acme'\n")
    assert message.startswith("looptree.toml: agent.provider: input should be 'replay', 'openai'")
    assert message.endswith('got "acme"')


def test_writable_must_be_a_list(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace('["solver.py"]', '"solver.py"'))
    assert message == 'looptree.toml: project.writable: input should be a valid list, got "solver.py"'


def test_boolean_for_an_integer_key_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL + "[search]\nnum_samples = true\n")
    assert message.startswith("looptree.toml: search.num_samples:")


@pytest.mark.parametrize("bench", ["", "[bench]\ntimeout = 5\n", "[bench]\ncommand = ''\n", "bench = 3\n"])
def test_missing_bench_command(tmp_path: Path, bench: str) -> None:
    text = "[project]\ngoal = 'g'\nwritable = ['a.py']\n"
    text = (bench + text) if bench.startswith("bench =") else (text + bench)
    assert error_of(tmp_path, text) == (
        "looptree.toml: missing required key 'bench.command' (the command that benchmarks a candidate)")


def test_missing_project_section(tmp_path: Path) -> None:
    assert error_of(tmp_path, "[bench]\ncommand = 'x'\n") == "looptree.toml: missing required key 'project'"


def test_missing_project_goal(tmp_path: Path) -> None:
    text = MINIMAL.replace('goal = "Make solve() faster."\n', "")
    assert error_of(tmp_path, text) == "looptree.toml: missing required key 'project.goal'"


def test_empty_project_goal(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace("Make solve() faster.", ""))
    assert message.startswith("looptree.toml: project.goal: ") and message.endswith('got ""')


def test_missing_project_writable(tmp_path: Path) -> None:
    text = MINIMAL.replace('writable = ["solver.py"]\n', "")
    assert error_of(tmp_path, text) == "looptree.toml: missing required key 'project.writable'"


def test_empty_project_writable(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL.replace('["solver.py"]', "[]"))
    assert message.startswith("looptree.toml: project.writable: list should have at least 1 item")


def test_errors_name_the_explicit_config_file(tmp_path: Path) -> None:
    other = tmp_path / "mine.toml"
    other.write_text(MINIMAL + "[search]\nnope = 1\n")
    with pytest.raises(ConfigError, match=r"^mine.toml: unknown key 'search.nope'$"):
        load_config(tmp_path, other)


# ---------------------------------------------------------------------------- writable patterns


def test_check_patterns_accepts_patterns_that_match(tmp_path: Path) -> None:
    (tmp_path / "solver.py").write_text("x = 1\n")
    (tmp_path / "kernels" / "a").mkdir(parents=True)
    (tmp_path / "kernels" / "a" / "k.py").write_text("y = 2\n")
    config = load_config(write(tmp_path, MINIMAL), overrides=['project.writable=["solver.py", "kernels/**/*.py"]'])
    check_patterns(config, tmp_path)


def test_check_patterns_names_the_pattern_that_matches_nothing(tmp_path: Path) -> None:
    (tmp_path / "solver.py").write_text("x = 1\n")
    config = load_config(write(tmp_path, MINIMAL), overrides=['project.writable=["solver.py", "sovler.py"]'])
    with pytest.raises(ConfigError) as info:
        check_patterns(config, tmp_path)
    assert str(info.value) == f"looptree.toml: project.writable pattern 'sovler.py' matches no file in {tmp_path}"


# ---------------------------------------------------------------------------- overrides


def load_with(tmp_path: Path, *overrides: str) -> Config:
    return load_config(write(tmp_path, MINIMAL), overrides=list(overrides))


def test_override_int(tmp_path: Path) -> None:
    assert load_with(tmp_path, "search.num_samples=10").search.num_samples == 10


def test_override_float_notation_for_an_integer_budget(tmp_path: Path) -> None:
    config = load_with(tmp_path, "budget.max_tokens=2e6")
    assert config.budget.max_tokens == 2_000_000 and isinstance(config.budget.max_tokens, int)


def test_override_fractional_token_budget_is_refused(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(MINIMAL)
    with pytest.raises(ConfigError, match=r"^looptree.toml: budget.max_tokens: input should be a valid integer.*got 2.5$"):
        load_config(tmp_path, overrides=["budget.max_tokens=2.5"])


def test_override_float(tmp_path: Path) -> None:
    config = load_with(tmp_path, "agent.temperature=0.25", "budget.max_cost_usd=1.5")
    assert (config.agent.temperature, config.budget.max_cost_usd) == (0.25, 1.5)


def test_override_int_into_float_and_literal(tmp_path: Path) -> None:
    assert load_with(tmp_path, "check.timeout=5").check.timeout == 5
    assert load_with(tmp_path, "bench.compare=off").bench.compare == "off"


def test_override_bare_string(tmp_path: Path) -> None:
    config = load_with(tmp_path, "agent.model=gpt-4.1", "agent.base_url=http://localhost:8000/v1")
    assert config.agent.model == "gpt-4.1"
    assert config.agent.base_url == "http://localhost:8000/v1"


def test_override_quoted_string_and_value_with_equals_sign(tmp_path: Path) -> None:
    config = load_with(tmp_path, 'agent.model="o3"', "project.goal=halve t, keep a=b")
    assert config.agent.model == "o3"
    assert config.project.goal == "halve t, keep a=b"


def test_override_empty_value_is_the_empty_string(tmp_path: Path) -> None:
    assert load_with(tmp_path, "build.command=").build.command == ""


def test_override_list(tmp_path: Path) -> None:
    config = load_with(tmp_path, "project.readonly=['bench.py', 'tests/**']", "gpu.devices=[0, 2]")
    assert config.project.readonly == ["bench.py", "tests/**"]
    assert config.gpu.devices == [0, 2]


def test_override_nested_key(tmp_path: Path) -> None:
    assert load_with(tmp_path, "agent.models.fix=x").agent.models.fix == "x"


def test_override_creates_an_absent_section(tmp_path: Path) -> None:
    assert load_with(tmp_path, "check.command=python -m pytest").check.command == "python -m pytest"


def test_later_override_wins(tmp_path: Path) -> None:
    assert load_with(tmp_path, "search.num_phases=2", "search.num_phases=7").search.num_phases == 7


def test_override_of_an_unknown_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, overrides=["search.num_sample=3"])
    assert str(info.value) == "looptree.toml: unknown key 'search.num_sample'"


def test_override_of_an_unknown_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(MINIMAL)
    with pytest.raises(ConfigError, match=r"^looptree.toml: unknown key 'serch'$"):
        load_config(tmp_path, overrides=["serch.num_samples=3"])


def test_override_with_a_wrong_type_names_the_key(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, overrides=["search.num_samples=many"])
    assert str(info.value).startswith("looptree.toml: search.num_samples: input should be a valid integer")


def test_override_below_a_scalar_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"search": {"num_samples": 4}}, ["search.num_samples.x=1"])
    assert str(info.value) == "override 'search.num_samples.x=1': 'num_samples' is not a section"


@pytest.mark.parametrize("item, message", [
    ("search.num_samples", "override 'search.num_samples' is not KEY=VALUE (e.g. search.num_samples=10)"),
    ("=3", "override '=3': empty key"),
    ("search..num_samples=3", "override 'search..num_samples=3': empty key"),
    (".x=3", "override '.x=3': empty key"),
])
def test_bad_override_string(item: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert str(info.value) == message


def test_parse_override_reads_toml_values_and_falls_back_to_text() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override(" a.b = 3") == (["a", "b"], 3)
    assert parse_override("a=1.5e3") == (["a"], 1500.0)
    assert parse_override("a=false") == (["a"], False)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=not toml at all") == (["a"], "not toml at all")


def test_override_of_a_string_key_keeps_text_that_looks_like_toml(tmp_path: Path) -> None:
    config = load_with(tmp_path, "check.command=true", "agent.model=4")
    assert config.check.command == "true" and config.agent.model == "4"


def test_union_key_error_names_only_the_key(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text(MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, overrides=["gpu.devices=0"])
    assert str(info.value).startswith("looptree.toml: gpu.devices: ")


def test_a_comparison_that_can_never_call_anything_better_is_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, MINIMAL, ["bench.repeats=3", "bench.max_repeats=3"])
    assert message == ("looptree.toml: with 3 repeats per side, bench.test='paired' can never call a candidate "
                       "better at bench.alpha=0.05; set bench.max_repeats to at least 5, or set "
                       'bench.compare="off"')
    # The same few repeats are fine when nothing is compared, or with enough pairs.
    assert load_config(tmp_path, overrides=["bench.repeats=3", "bench.compare=off"]).bench.repeats == 3
    assert load_config(tmp_path, overrides=["bench.repeats=3", "bench.max_repeats=5"]).bench.test == "paired"
    assert load_config(tmp_path, overrides=["bench.repeats=4", "bench.max_repeats=4",
                                            "bench.test=mann-whitney"]).bench.max_repeats == 4
