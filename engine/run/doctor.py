"""`looptree doctor [DIR]`: one screen that says what a run of DIR would get on this machine.

Why its own command: the answers are spread over several modules (the sandbox and the memory
ceiling, device locks, NVML, the LLM endpoints, the cluster backend) and each is only visible
when a run trips over it, usually after the baseline has already cost minutes. Doctor asks each
module for its own description and prints them together, before anything is spent.

Each section comes from a function owned by the module that knows (`sandbox.describe_host`,
`gpu.locks.describe_locks`, `gpu.telemetry.format_gpus`, `llm.preflight.check_endpoints`),
imported only when its section is drawn. A section whose module is missing from this build or
fails says "not available: <why>" and the others still print: doctor must never be the thing
that crashes. Exit status: 0 when no row failed, 1 when one did (a row marked FAIL).
"""

from __future__ import annotations

import asyncio
import copy
import platform
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looptree.engine.errors import LooptreeError

# A row: (label, value, ok); ok None = information only (neither good nor bad).
Row = tuple[str, str, "bool | None"]
CLUSTER_TIMEOUT_S = 10.0  # a TCP connect to the cluster's address
ENDPOINTS_TIMEOUT_S = 90.0  # the preflight's own timeouts are shorter; this bounds the whole section
MARK = {True: "ok  ", False: "FAIL", None: "    "}


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(ok is False for _, _, ok in self.rows)


def not_available(what: str, exc: BaseException) -> Row:
    """The row a section shows when its provider cannot be used, with the reason in one line."""
    if isinstance(exc, ModuleNotFoundError):
        why = f"{exc.name or 'a module'} is not in this build"
    elif isinstance(exc, ImportError):
        why = f"this build has no {what} ({exc})"
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        why = "no answer in time"
    else:
        why = " ".join(str(exc).split()) or type(exc).__name__
    return (what, f"not available: {why}", None)


def guarded(title: str, what: str, build: Callable[[], list[Row]]) -> Section:
    """Run one section's provider; any failure becomes a "not available" row instead of a crash."""
    try:
        rows = build()
    except Exception as exc:  # noqa: BLE001 - a diagnosis tool reports, it does not crash
        rows = [not_available(what, exc)]
    return Section(title, rows or [(what, "nothing to report", None)])


# -- the configuration ---------------------------------------------------------------------
DEFAULTS = {"project": {"goal": "(doctor: defaults)", "writable": ["*"]}, "bench": {"command": "true"}}


def load(project: Path, overrides: list[str]) -> tuple[Any, Section]:
    """The project's config, or the defaults (a run's host-side settings) when it has none or it is invalid."""
    from looptree.engine.core.config import (
        CONFIG_NAME,
        apply_overrides,
        load_config,
        validate_config,
    )

    section = Section("configuration")
    path = project / CONFIG_NAME
    config = None
    if path.is_file():
        try:
            config = load_config(project, None, overrides)
            agent = config.agent
            what = f"valid ({path}; agent.provider = {agent.provider!r}, agent.model = {agent.model!r})"
            section.rows.append((CONFIG_NAME, what, True))
        except LooptreeError as exc:
            section.rows.append((CONFIG_NAME, f"{exc}; the rest uses the defaults", False))
    else:
        section.rows.append((CONFIG_NAME, f"none in {project}: the rest uses the defaults (no endpoint to check)", None))
    if config is None:
        try:  # KEY=VALUE still applies to the defaults (`looptree doctor . sandbox.mode=off`)
            config = validate_config(apply_overrides(copy.deepcopy(DEFAULTS), overrides), source="defaults", deep=False)
        except LooptreeError:
            config = validate_config(copy.deepcopy(DEFAULTS), source="defaults", deep=False)
    return config, section


# -- the sections --------------------------------------------------------------------------
def host_section(config: Any) -> Section:
    def build() -> list[Row]:
        from looptree.engine.evaluation.sandbox import describe_host

        return [(label, value, ok) for label, value, ok in describe_host(config)]

    return guarded("sandbox and memory limit", "sandbox", build)


def locks_section() -> Section:
    def build() -> list[Row]:
        from looptree.gpu.devices.locks import describe_locks

        return [(label, value, ok) for label, value, ok in describe_locks()]

    return guarded("device locks", "device locks", build)


def gpus_section() -> Section:
    """What `looptree gpus` prints, one row per line (NVML; a clear line when there is no GPU)."""

    def build() -> list[Row]:
        from looptree.gpu.devices.telemetry import choose_backend, format_gpus

        backend = choose_backend("auto")
        try:
            text = format_gpus(backend)
            count = backend.device_count()
        finally:
            backend.close()
        lines = text.splitlines()
        label = f"{count} device(s)" if count else "NVML"
        return [(label if i == 0 else "", line, None) for i, line in enumerate(lines)]

    return guarded("GPUs (NVML)", "NVML", build)


def endpoints_section(config: Any, has_config: bool) -> Section:
    if not has_config:
        return Section("agent endpoints", [("endpoints", "not checked: no valid config to read them from", None)])
    if config.agent.provider == "replay":
        return Section("agent endpoints", [("replay", f"recorded replies from {config.agent.cassette}: no endpoint", None)])

    def build() -> list[Row]:
        from looptree.engine.agents.llm.preflight import check_endpoints

        async def checks() -> list[Any]:
            return await asyncio.wait_for(check_endpoints(config), ENDPOINTS_TIMEOUT_S)

        rows: list[Row] = []
        for check in asyncio.run(checks()):
            where = check.endpoint or "(no base URL)"
            slots = getattr(check, "slots", None)
            extra = f"; the server runs {slots} request(s) at once" if slots else ""
            rows.append((f"{check.model} at {where}", check.reason + extra,
                         bool(check.ok)))
        return rows

    return guarded("agent endpoints", "endpoint check", build)


def cluster_section(config: Any) -> Section:
    cluster = getattr(config, "cluster", None)
    backend = getattr(cluster, "backend", None) or "local"
    if backend == "local":
        return Section("cluster", [("executor", "local executor (cluster.backend = local)", None)])
    if backend == "ray":
        address = getattr(cluster, "address", "") or "auto"
        if address in ("auto", "local"):
            return Section("cluster", [("Ray cluster", f"cluster.address = {address}: Ray finds or starts one when "
                                                       "the run starts (not checked here)", None)])

        def build() -> list[Row]:
            # A TCP check of host:port only: `ray.init` on a wrong address retries for minutes.
            from looptree.engine.cluster.ray_executor import _reachable

            asyncio.run(asyncio.wait_for(_reachable(address, CLUSTER_TIMEOUT_S), CLUSTER_TIMEOUT_S + 1))
            return [("Ray cluster", f"reachable at {address} (its GPUs: `looptree gpus DIR`)", True)]

        section = guarded("cluster", "Ray cluster", build)
        label, value, ok = section.rows[0]
        if ok is None and value.startswith("not available: "):
            section.rows[0] = (label, f"{value} (cluster.backend = ray)", False)
        return section
    return Section("cluster", [("executor", f"unknown cluster.backend {backend!r}", False)])


# -- the screen ----------------------------------------------------------------------------
def diagnose(project: Path, overrides: list[str] | None = None) -> list[Section]:
    config, cfg_section = load(project, overrides or [])
    has_config = cfg_section.rows[0][2] is True
    return [cfg_section, host_section(config), locks_section(), gpus_section(),
            endpoints_section(config, has_config), cluster_section(config)]


def render(project: Path, sections: list[Section]) -> str:
    host = f"{socket.gethostname()} (Python {platform.python_version()}, {sys.platform})"
    out = [f"looptree doctor: what a run of {project} would get on {host}"]
    for section in sections:
        out += ["", section.title]
        width = min(28, max((len(label) for label, _, _ in section.rows), default=0))
        for label, value, ok in section.rows:
            out.append(f"  {MARK[ok]}  {label:<{width}}  {value}".rstrip())
    failed = [s.title for s in sections if s.failed]
    out += ["", f"{len(failed)} section(s) with a failed check: {', '.join(failed)}" if failed
            else "no failed check"]
    return "\n".join(out) + "\n"


def run_doctor(project: Path, overrides: list[str] | None = None) -> int:
    if not project.is_dir():
        raise LooptreeError(f"{project} is not a directory")
    sections = diagnose(project, overrides)
    sys.stdout.write(render(project, sections))
    sys.stdout.flush()
    return 1 if any(s.failed for s in sections) else 0
