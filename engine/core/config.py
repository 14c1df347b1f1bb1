"""looptree.toml: load, override, validate.

Why pydantic: every key is typed and unknown keys are refused, and a failure can be turned
into one precise line ("looptree.toml: search.num_samples: must be an integer ≥ 1, got 'four'").
The schema mirrors CONTRACT.md's [project]/[build]/[bench]/[check]/[agent]/[search]/[budget]/[gpu]
sections; a few looptree-specific keys are added and documented in the README.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

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
    # Hidden files a command (build, check, bench) reads: kept in candidates' worktrees (README).
    hidden_needed: list[str] = []


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
    # Resource limits for every project command (0 = none). The memory ceiling goes through a
    # cgroup v2 where one is writable, else RLIMIT_DATA (never RLIMIT_AS, which breaks CUDA);
    # "auto" = 75% of the machine's RAM, so a hog cannot take the machine down with the engine.
    memory_limit_mb: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    log_limit_mb: float = Field(default=8, gt=0)  # per command: the head and the tail are kept
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
    request_timeout: float = Field(default=300, gt=0)  # a whole reply, where a server cannot stream
    max_retries: int = Field(default=4, ge=0, le=20)
    models: RoleModels = RoleModels()
    # Requests sent to the endpoint at once (≤ search.num_workers); 0 = what the server says
    # (llama.cpp's slot count), else 1 for provider "local" and no limit for hosted providers.
    concurrency: int = Field(default=0, ge=0, le=256)
    # Streamed replies time out on silence, never on length: seconds to the first token (not
    # counting time queued behind agent.concurrency), then seconds between chunks.
    first_token_timeout: float = Field(default=300, gt=0)
    idle_timeout: float = Field(default=60, gt=0)


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


class SandboxSection(_Section):
    """Containment of the project's commands (engine/evaluation/sandbox.py): on unless the user opts out."""

    mode: Literal["auto", "on", "off"] = "auto"  # auto: contain when the host can, else say so
    network: bool = False
    env: list[str] = []  # extra environment variable names passed in (secret-looking ones never are)
    writable: list[str] = []  # extra writable paths (absolute, or relative to the project)
    tmp_size_mb: int = Field(default=2048, ge=16)  # the private /tmp (and /dev/shm) size cap


class ClusterSection(_Section):
    """Where project commands run (engine/cluster/): here, or on the workers of a Ray cluster."""

    backend: Literal["local", "ray"] = "local"
    address: str = ""  # as ray.init takes it ("auto", "ray://host:10001", "10.0.0.1:6379"); "" = auto/start one
    gpus_per_bench: float = Field(default=0, ge=0)  # 0: CPU bench slots
    cpus_per_bench: float = Field(default=1, ge=0)
    accelerator_type: str = ""  # a Ray accelerator type ("H100", "A100") every bench worker must have
    workers: int = Field(default=0, ge=0)  # bench slots to start; 0 = as many as the cluster fits


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
    sandbox: SandboxSection = SandboxSection()
    cluster: ClusterSection = ClusterSection()

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


def load_config(project_dir: Path, config_file: Path | None = None, overrides: list[str] | None = None,
                *, deep: bool = True) -> Config:
    """Read, override and validate the project's config; every failure is one ConfigError line.

    `deep=False` leaves out the checks that import scipy (seconds on a busy machine), so the CLI
    can report cheap mistakes (a missing API key) first and then call `check_deep`.
    """
    return resolve_config(project_dir, config_file, overrides, deep=deep).config


# -- inheritance (`extends`), provenance, the [experiment] table ------------------------------
# Why here: every command that reads a config (run, eval, kernelbench, config, ab) must resolve
# `extends` chains the same way. Keys naming files are made absolute when they come from a
# parent file, so a base config shared by many projects can point at its own prompt templates.
PATH_KEYS = {("prompts", n) for n in ("system", "ideas", "optimize", "improve", "fix")} | {("agent", "cassette")}
MAX_EXTENDS_DEPTH = 32


class ExperimentSection(_Section):
    """`looptree ab` settings; allowed in any config layer, never part of a task's run config."""

    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    beta: float = Field(default=0.10, gt=0, lt=0.5)
    min_effect: float = Field(default=0.15, gt=0, lt=0.5)
    max_pairs: int = Field(default=0, ge=0)  # 0 = as many as the suite has
    max_tokens: int = Field(default=0, ge=0)  # 0 = no experiment-wide cap

    @field_validator("max_tokens", "max_pairs", mode="before")
    @classmethod
    def _accept_float_notation(cls, value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class _ExperimentOnly(_Section):
    experiment: ExperimentSection = ExperimentSection()


@dataclass
class Resolved:
    """A validated config, its [experiment] table, and where each dotted key's value came from."""

    config: Config
    experiment: ExperimentSection
    sources: dict[str, str]
    data: dict[str, Any]


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key (recursively); arrays and scalars replace. Returns a new dict."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = value
    return out


def _dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_chain(path: Path, *, anchor_top: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """The `extends` chain of `path`, base first. Each `extends` is relative to the file naming it.

    File paths in a parent (and, with `anchor_top`, in `path` itself: an overlay applied to many
    projects) are made absolute against that file's folder.
    """
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    current: Path | None = path.resolve()
    while current is not None:
        if current in seen:
            loop = " -> ".join(p.name for p in [*seen[seen.index(current):], current])
            raise ConfigError(f"{path.name}: extends cycle: {loop}")
        if len(seen) >= MAX_EXTENDS_DEPTH:
            raise ConfigError(f"{path.name}: extends chain deeper than {MAX_EXTENDS_DEPTH} files")
        if not current.is_file():
            by = f" (extended by {seen[-1].name})" if seen else ""
            raise ConfigError(f"no config file {current}{by}")
        seen.append(current)
        data = read_toml(current)
        parent = data.pop("extends", None)
        if parent is not None and (not isinstance(parent, str) or not parent.strip()):
            raise ConfigError(f"{current.name}: extends must be a path (text), got {json.dumps(parent, default=str)}")
        if chain or anchor_top:
            for section, key in PATH_KEYS:  # a parent's file paths are relative to the parent
                value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
                if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                    data[section][key] = str((current.parent / value).resolve())
        chain.append((current, data))
        current = (current.parent / Path(parent).expanduser()).resolve() if parent else None
    return list(reversed(chain))


def layer_data(path: Path, *, anchor_top: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """One config file with its `extends` chain merged, and each dotted key's source file."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for file, layer in read_chain(path, anchor_top=anchor_top):
        data = merge_tables(data, layer)
        sources.update({key: str(file) for key in _dotted(layer)})
    return data, sources


def resolve_config(project_dir: Path, config_file: Path | None = None, overrides: list[str] | None = None,
                   *, layers: list[Path] | None = None, forbid_in_layers: tuple[str, ...] = (),
                   deep: bool = True) -> Resolved:
    """The project's config (with `extends`), then each overlay in `layers`, then KEY=VALUE last.

    `forbid_in_layers` names tables an overlay may not touch (`looptree ab` forbids project and
    bench: both arms must measure the same task the same way).
    """
    path = config_file or project_dir / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"no {path.name} in {path.parent} (run `looptree init {project_dir}` to write one)")
    data, sources = layer_data(path)
    for overlay in layers or []:
        over, over_sources = layer_data(overlay, anchor_top=True)
        for table in forbid_in_layers:
            if table in over:
                raise ConfigError(f"{overlay.name}: [{table}] cannot be overlaid (both arms must measure the same task the same way)")
        data = merge_tables(data, over)
        sources.update(over_sources)
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        sources.update({k: f"command line ({item})" for k in list(sources) if k.startswith(key + ".")} | {key: f"command line ({item})"})
    data = apply_overrides(data, overrides or [])
    experiment_data = data.pop("experiment", {})
    if not isinstance(experiment_data, dict):
        raise ConfigError(f"{path.name}: experiment must be a table")
    try:
        experiment = _ExperimentOnly.model_validate({"experiment": experiment_data}).experiment
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, path.name)) from None
    return Resolved(validate_config(data, source=path.name, deep=deep), experiment, sources, data)


def validate_config(data: dict[str, Any], source: str = CONFIG_NAME, *, deep: bool = True) -> Config:
    if "bench" not in data or not isinstance(data.get("bench"), dict) or not data["bench"].get("command"):
        raise ConfigError(f"{source}: missing required key 'bench.command' (the command that benchmarks a candidate)")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    if config.agent.concurrency > config.search.num_workers:
        raise ConfigError(f"{source}: agent.concurrency ({config.agent.concurrency}) must be at most "
                          f"search.num_workers ({config.search.num_workers}): more requests than "
                          f"workers can never be in flight")
    if deep:
        check_deep(config, source)
    return config


def check_deep(config: Config, source: str = CONFIG_NAME) -> None:
    """The validation that imports heavy modules (scipy): run it after the cheap checks."""
    _check_significance_reachable(config, source)


def _check_significance_reachable(config: Config, source: str) -> None:
    """Refuse a comparison that can never call anything better: the search would silently stall.

    With too few pairs even the most lopsided result (every candidate run faster than every
    parent run) is not significant at the last look's level, so every node would be credited
    with its parent's numbers.
    """
    bench = config.bench
    if bench.compare != "interleaved":
        return
    from looptree.engine.evaluation.sequential import look_level  # local: scipy is only needed for this check
    from looptree.engine.evaluation.stats import smallest_p

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
