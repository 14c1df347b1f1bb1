"""looptree.toml: load, override, validate.

Why pydantic: every key is typed and unknown keys are refused, and a failure can be turned
into one precise line ("looptree.toml: search.num_samples: must be an integer ≥ 1, got 'four'").
The schema mirrors CONTRACT.md's [project]/[build]/[bench]/[check]/[agent]/[search]/[budget]/[gpu]
sections; a few looptree-specific keys are added and documented in the README.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from looptree.engine.errors import ConfigError

CONFIG_NAME = "looptree.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class ProjectSection(_Section):
    goal: str = Field(min_length=1)
    writable: list[str] = Field(min_length=1)
    readonly: list[str] = []
    hidden: list[str] = []


class BuildSection(_Section):
    command: str = ""
    timeout: float = Field(default=120, gt=0)


class BenchSection(_Section):
    command: str = Field(min_length=1)
    metrics: str = "metrics.csv"
    timeout: float = Field(default=600, gt=0)
    repeats: int = Field(default=5, ge=1, le=1000)
    # looptree additions (README): CPU benchmarks run one at a time so they don't disturb each
    # other's timings; candidates are timed interleaved with their parent and judged by a test.
    concurrency: int = Field(default=1, ge=1, le=64)
    device: Literal["auto", "gpu", "cpu"] = "auto"
    compare: Literal["interleaved", "off"] = "interleaved"
    # The rank test of an interleaved comparison: "paired" (Wilcoxon signed-rank on the pairs'
    # log ratios; cancels slow spells that hit both runs of a pair) or "mann-whitney" (unpaired).
    test: Literal["paired", "mann-whitney"] = "paired"
    max_repeats: int = Field(default=10, ge=1, le=1000)
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    min_effect: float = Field(default=0.0, ge=0, lt=1)  # a margin the ratio's CI must also clear
    # Resource limits for every project command (0 = none). Address-space limits break CUDA,
    # whose drivers reserve huge virtual ranges: use them for CPU projects.
    memory_limit_mb: int = Field(default=0, ge=0)
    cpu_limit_s: int = Field(default=0, ge=0)
    open_files: int = Field(default=4096, ge=16)


class CheckSection(_Section):
    command: str = ""
    timeout: float = Field(default=600, gt=0)


class RoleModels(_Section):
    ideas: str = ""
    optimize: str = ""
    fix: str = ""


class AgentSection(_Section):
    provider: Literal["replay", "openai", "google", "openrouter", "cborg", "deepseek", "local"] = "replay"
    model: str = "gpt-4.1-mini"
    base_url: str = ""
    api_key_env: str = ""
    cassette: str = ".looptree/cassette.jsonl"
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=8000, ge=16)
    request_timeout: float = Field(default=300, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    models: RoleModels = RoleModels()


class SearchSection(_Section):
    strategy: Literal["tree"] = "tree"
    num_samples: int = Field(default=4, ge=1, le=1000)
    num_phases: int = Field(default=3, ge=1, le=1000)
    max_fix_attempts: int = Field(default=2, ge=0, le=100)
    num_workers: int = Field(default=8, ge=1, le=256)
    early_stop_patience: int = Field(default=2, ge=0, le=1000)
    expand_top: int = Field(default=2, ge=1, le=1000)


class ContextSection(_Section):
    scope: Literal["path", "all"] = "path"  # the line of inquiry, or short summaries of every experiment


class PromptsSection(_Section):
    """Paths (relative to the project) of templates that replace the packaged ones."""

    system: str = ""
    ideas: str = ""
    optimize: str = ""
    improve: str = ""
    fix: str = ""


class BudgetSection(_Section):
    max_tokens: int = Field(default=2_000_000, ge=1)
    max_cost_usd: float = Field(default=0, ge=0)
    requests_per_minute: int = Field(default=60, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _accept_float_notation(cls, value: Any) -> Any:
        """`budget.max_tokens=2e6` on the command line arrives as a float; accept whole values."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class GpuSection(_Section):
    devices: Literal["auto", "none"] | list[int] = "auto"
    telemetry: Literal["auto", "nvml", "none", "fake"] = "auto"
    sample_interval: float = Field(default=1.0, gt=0)


class Config(_Section):
    project: ProjectSection
    build: BuildSection = BuildSection()
    bench: BenchSection
    check: CheckSection = CheckSection()
    agent: AgentSection = AgentSection()
    search: SearchSection = SearchSection()
    context: ContextSection = ContextSection()
    prompts: PromptsSection = PromptsSection()
    budget: BudgetSection = BudgetSection()
    gpu: GpuSection = GpuSection()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=VALUE`; VALUE is read as TOML when it parses (numbers, bools, arrays), else a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. search.num_samples=10)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def _is_text_field(path: list[str]) -> bool:
    """`agent.model=4` or `check.command=true` mean the text, not a number or a bool."""
    model: Any = Config
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return model is str


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        if _is_text_field(path) and not isinstance(value, str):
            value = item.split("=", 1)[1]
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    parts = []
    for part in first["loc"]:
        if isinstance(part, int) or not str(part).isidentifier():
            break  # list indexes and pydantic's union branch names are not keys
        parts.append(str(part))
    loc = ".".join(parts)
    kind = first["type"]
    got = first.get("input")
    if kind == "extra_forbidden":
        return f"{source}: unknown key {loc!r}"
    if kind == "missing":
        return f"{source}: missing required key {loc!r}"
    msg = first["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    shown = json.dumps(got) if isinstance(got, (str, int, float, bool, list)) else type(got).__name__
    return f"{source}: {loc}: {msg}, got {shown}"


def load_config(project_dir: Path, config_file: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate the project's config; every failure is one ConfigError line."""
    path = config_file or project_dir / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no {path.name} in {path.parent} (run `looptree init {project_dir}` to write one)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not UTF-8 text") from None
    return validate_config(apply_overrides(data, overrides or []), source=path.name)


def validate_config(data: dict[str, Any], source: str = CONFIG_NAME) -> Config:
    if "bench" not in data or not isinstance(data.get("bench"), dict) or not data["bench"].get("command"):
        raise ConfigError(f"{source}: missing required key 'bench.command' (the command that benchmarks a candidate)")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    _check_significance_reachable(config, source)
    return config


def _check_significance_reachable(config: Config, source: str) -> None:
    """Refuse a comparison that can never call anything better: the search would silently stall.

    With too few pairs even the most lopsided result (every candidate run faster than every
    parent run) is not significant at the last look's level, so every node would be credited
    with its parent's numbers.
    """
    bench = config.bench
    if bench.compare != "interleaved":
        return
    from looptree.engine.sequential import look_level  # local: scipy is only needed for this check
    from looptree.engine.stats import smallest_p

    paired = bench.test == "paired"

    def reachable(cap: int) -> bool:
        return smallest_p(cap, cap, paired=paired) < look_level(cap, bench.repeats, cap, bench.alpha, paired=paired)

    cap = max(bench.repeats, bench.max_repeats)
    if reachable(cap):
        return
    need = next((n for n in range(cap + 1, 1001) if reachable(n)), None)
    fix = f"set bench.max_repeats to at least {need}" if need else "raise bench.alpha"
    raise ConfigError(f"{source}: with {cap} repeats per side, bench.test={bench.test!r} can never call a "
                      f"candidate better at bench.alpha={bench.alpha:g}; {fix}, or set bench.compare=\"off\"")


def check_patterns(config: Config, project_dir: Path) -> None:
    """A writable pattern that matches no file is almost always a typo: refuse it before spending tokens."""
    from looptree.engine.access import AccessPolicy  # local: access imports nothing from config

    policy = AccessPolicy(config.project.writable, config.project.readonly, config.project.hidden)
    missing = policy.unmatched_patterns(project_dir)
    if missing:
        raise ConfigError(
            f"looptree.toml: project.writable pattern {missing[0]!r} matches no file in {project_dir}"
        )
