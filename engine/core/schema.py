"""Every event a run writes, defined once: its type, its fields (typed), and how it reads as a line.

Why one module: the vocabulary used to be written five times (the `emit` calls, the fold, two
event-to-text functions worded differently, the table in docs/ARCHITECTURE.md) and they drifted.
Now:
- the engine's `emit` checks each event against its class here (`check`), strictly in tests;
- the fold (`RunState`) has a handler for the types that change state, and counts the rest
  that it does not know (`unknown_types`) instead of dropping them silently;
- `describe` is the one text of an event, for the headless printer and the dashboard's log;
- the events table of docs/ARCHITECTURE.md is `markdown_table()` (a test keeps them equal).

Events stay plain dicts on disk and in the fold (`{"seq", "ts", "type", ...fields}`): a fold over
a million events must not build a million models. The classes are the definition, and are used
to validate what is written; `SCHEMA_VERSION` is recorded in `run_started` (logs without it are
version 1 and still read).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from looptree.engine.core.state import RunState

SCHEMA_VERSION = 2
STRICT_ENV = "LOOPTREE_STRICT_EVENTS"
"""Set (to 1) in the test suite: an event that does not match its class raises at once."""

Json = dict[str, Any]


class EventSchemaError(ValueError):
    """An event the schema does not allow (unknown type, unknown field, wrong type)."""


class Event(BaseModel):
    """Base of every event class: the fields after `seq`, `ts` and `type`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    TYPE: ClassVar[str] = ""
    DOC: ClassVar[str] = ""


EVENT_TYPES: dict[str, type[Event]] = {}


def event(name: str, doc: str) -> Callable[[type[Event]], type[Event]]:
    """Register an event class under its `type` name."""

    def register(cls: type[Event]) -> type[Event]:
        if name in EVENT_TYPES:
            raise RuntimeError(f"event type {name!r} defined twice")
        cls.TYPE, cls.DOC = name, doc
        EVENT_TYPES[name] = cls
        return cls

    return register


# ------------------------------------------------------------------------------ run lifecycle
@event("run_started", "a run began; `sandbox` and `memory` say what containment the commands really get")
class RunStarted(Event):
    run: int
    project: str
    config: Json
    base_commit: str | None = None
    pid: int | None = None
    host: str | None = None
    schema_version: int | None = Field(None, description="this schema's version; absent = 1")
    prompt_components: dict[str, str] | None = Field(None, description="{system, ideas, optimize, improve, fix: "
                                                                         "hash}")
    sandbox: Json | None = Field(None, description='{mechanism: "bubblewrap", version, network, uid, '
                                                    'capabilities, tmp_size_mb, writable} or {mechanism: "off", '
                                                    'reason}')
    memory: Json | None = Field(None, description='{limit_mb, mechanism: "cgroup v2"/"RLIMIT_DATA"/"none", why?}')


@event("engine_attached", "a resume took the run over (orphans killed, stale worktrees removed)")
class EngineAttached(Event):
    pid: int
    orphans_killed: int | None = None
    worktrees_removed: int | None = None
    sandbox: Json | None = Field(None, description="as in run_started: this engine's containment")
    memory: Json | None = None
    schema_version: int | None = None


@event("run_finished", "the run ended (`phases done`, `early stop`, `budget spent`, `stopped by user`, "
                       "`stopped by signal SIG…`, `error: …`)")
class RunFinished(Event):
    reason: str
    tokens: int | None = None
    evaluated: int | None = None
    best: str | None = None


@event("stop_requested", "a stop was asked for (ctl, dashboard, signal, budget)")
class StopRequested(Event):
    reason: str
    control_offset: int | None = None


@event("run_paused", "no new agent call or stage starts until resumed")
class RunPaused(Event):
    control_offset: int | None = None


@event("run_unpaused", "the run goes on")
class RunUnpaused(Event):
    control_offset: int | None = None


@event("budget_changed", "the token cap was changed (`ctl budget`)")
class BudgetChanged(Event):
    max_tokens: int
    control_offset: int | None = None


@event("message", "a line for people (warnings, refusals); `alert` names the kind of warning")
class Message(Event):
    text: str
    alert: str | None = Field(None, description="repository_changed (with id, stage, changes) or control_refused "
                                                "(with count, reasons, control_offset)")
    id: str | None = None
    stage: str | None = None
    changes: list[Any] | None = None
    count: int | None = None
    reasons: list[Any] | None = None
    control_offset: int | None = None


# ------------------------------------------------------------------------------ the search
@event("ideas_generated", "the ideas agent's list (empty with a `reason` when the reply had none)")
class IdeasGenerated(Event):
    ideas: list[str]
    text: str | None = None
    reason: str | None = None
    usage: Json | None = None
    prompt_components: dict[str, str] | None = None
    node_id: str | None = None


@event("phase_started", "a phase expands these parents")
class PhaseStarted(Event):
    phase: int
    parents: list[str]
    best_before: str | None = None


@event("phase_finished", "a phase ended; `best` is the best credited node so far")
class PhaseFinished(Event):
    phase: int
    best: str | None = None
    improved: bool = False


@event("node_created", "a node: the baseline, an idea, an improvement, a fix or a fork")
class NodeCreated(Event):
    id: str
    parent: str | None
    phase: int
    kind: str
    idea: str | None = None
    hint: str | None = None
    fix_of: str | None = None


@event("node_pruned", "the node's subtree is never expanded")
class NodePruned(Event):
    id: str
    control_offset: int | None = None


@event("node_pinned", "the node is always expanded")
class NodePinned(Event):
    id: str
    control_offset: int | None = None


@event("node_unpinned", "the pin is lifted")
class NodeUnpinned(Event):
    id: str
    control_offset: int | None = None


@event("fork_requested", "a child of the node with the user's hint is asked for")
class ForkRequested(Event):
    id: str
    hint: str | None = None
    control_offset: int | None = None


# ------------------------------------------------------------------------------ agents
@event("agent_started", "an agent call for a node (or the run, for ideas) began")
class AgentStarted(Event):
    id: str | None = None
    role: str


@event("agent_finished", "an agent replied; its text, usage, cost and the prompt's hashes")
class AgentFinished(Event):
    id: str | None = None
    role: str
    text: str
    description: str | None = None
    usage: Json | None = None
    model: str | None = None
    prompt_hash: str | None = None
    prompt_components: dict[str, str] | None = None
    duration_s: float | None = None
    cost_usd: float | None = None
    finish_reason: str | None = None
    cut_off: str | None = Field(None, description='"reply cut off at max_tokens=N …" when finish_reason is length')


@event("agent_failed", "an agent call failed for good (after its retries)")
class AgentFailed(Event):
    id: str | None = None
    role: str
    reason: str


@event("agent_retry", "an agent call is tried again; `billed_maybe` when the server may have billed the "
                      "abandoned attempt")
class AgentRetry(Event):
    id: str | None = None
    role: str
    attempt: int = Field(description="the attempt that failed, 1 = first")
    reason: str
    delay_s: float | None = None
    billed_maybe: bool | None = Field(None, description="abandoned after the server may have billed it")
    billed_tokens: int | None = Field(None, description="what the budget charged for it (a tokens_spent with "
                                                        "billed_maybe follows)")


@event("tokens_spent", "tokens (and dollars) one call cost; `spent` is the run's total after it")
class TokensSpent(Event):
    id: str | None = None
    role: str | None = None
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None = None
    duration_s: float | None = None
    spent: int | None = None
    billed_maybe: bool | None = None


@event("edits_applied", "the reply's edits became a commit on the node's branch")
class EditsApplied(Event):
    id: str
    files: list[str]
    commit: str
    branch: str


@event("edits_rejected", "the reply's edits could not be applied (the reason names the block)")
class EditsRejected(Event):
    id: str
    reason: str


# ------------------------------------------------------------------------------ evaluation
@event("stage_started", "build, check or bench (repeat `repeat`, `side` parent/candidate) began on `worker`")
class StageStarted(Event):
    id: str
    stage: str
    repeat: int | None = None
    side: str | None = Field(None, description="parent/candidate in an interleaved comparison")
    device: Any = None
    worker: Json | None = Field(None, description='{node: "local" or the Ray node id, host, device, uuid}')


@event("stage_finished", "a stage ended: `ok`, exit status, seconds, a reason when it failed")
class StageFinished(Event):
    id: str
    stage: str
    ok: bool
    rc: int | None = None
    duration_s: float | None = None
    reason: str | None = None
    repeat: int | None = None
    side: str | None = None
    worker: Json | None = None


@event("metric_row", "one row of the bench's metrics CSV, stamped when the engine read it")
class MetricRow(Event):
    id: str
    repeat: int | None = None
    iteration: Any = None
    values: dict[str, Any]
    side: str | None = None
    columns: list[str] | None = None
    arrived_s: float | None = Field(None, description="when the engine first read the row, seconds after the "
                                                      "bench process started, by the engine's clock")


@event("node_evaluated", "the node's metrics, their spread, the verdict against its reference, and "
                         "`suspect` (a reason) when its numbers show signs of forgery")
class NodeEvaluated(Event):
    id: str
    iteration: int
    metrics: dict[str, Any]
    spread: dict[str, Any] | None = None
    columns: list[str] | None = None
    device: Any = None
    verdict: Json | None = Field(None, description="{label, metric, ratio, ci_low, ci_high, ci_level, p_value, "
                                                   "alpha_look, min_effect, aa_noise, n_parent, n_candidate, "
                                                   "parent_median, candidate_median, against, test}")
    repeats: int | None = None
    suspect: str | None = Field(None, description="the evidence that the metrics were not the bench's own: "
                                                  "never credited, never best")
    shape: Json | None = Field(None, description="{rows, iterations, restarts, bench_s, timed_s}: the yardstick "
                                                 "for its children's row structure")


@event("node_failed", "the node failed at `stage` (agent, edit, build, check, bench, metrics, timeout, "
                      "killed, pruned, repository) with a reason")
class NodeFailed(Event):
    id: str
    stage: str
    reason: str


# ------------------------------------------------------------------------------ GPUs
@event("gpu_status", "which GPUs benchmarks get (or why none)")
class GpuStatus(Event):
    available: bool
    devices: list[Any] | None = None
    backend: str | None = None
    reason: str | None = None


@event("gpu_sample", "one telemetry sample of a device (in telemetry.jsonl since schema 2)")
class GpuSample(Event):
    device: Any
    fields: Json = Field(description="{util, mem_used, mem_total, power_w, temp_c, sm_clock, mem_clock, throttle, "
                                     "processes, node}")


# ------------------------------------------------------------------------------ checking
def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def check(type_: str, fields: Json) -> str | None:
    """Why an event does not match the schema, or None. Raises in strict mode (the test suite)."""
    cls = EVENT_TYPES.get(type_)
    if cls is None:
        problem = f"unknown event type {type_!r}"
    else:
        try:
            cls.model_validate(fields)
            return None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            problem = f"event {type_!r}: {where}: {first['msg']}"
    if strict():
        raise EventSchemaError(problem)
    return problem


# ------------------------------------------------------------------------------ the text of an event
@dataclass(frozen=True)
class Line:
    """What an event says: about which node, the words, and a style for the dashboard.

    `node` is None for a line about the whole run; a node-scoped event with no node (the ideas
    agent) has node "-".
    """

    node: str | None
    text: str
    style: str = ""


def clip_words(text: str | None, limit: int) -> str:
    """`text` on one line, at most `limit` characters, cut between words (never inside one) with "…"."""
    text = " ".join((text or "").split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 3:  # a very long first word is cut after all, rather than lost
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def ci_text(verdict: dict[str, Any]) -> str:
    """`90% CI 0.91–0.98`: the interval with the coverage it really has (the level changes per look)."""
    level = verdict.get("ci_level")
    head = f"{level * 100:.3g}% CI" if isinstance(level, (int, float)) else "CI"
    return f"{head} {verdict.get('ci_low', 0):.3g}–{verdict.get('ci_high', 0):.3g}"


def metrics_text(values: dict[str, Any], limit: int = 3) -> str:
    parts = []
    for key, value in list(values.items())[:limit]:
        name = key.split("(")[0].strip()
        parts.append(f"{name}={value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool)
                     else f"{name}={value}")
    return " ".join(parts)


def _rep(event: Json) -> str:
    repeat = event.get("repeat")
    side = f" {event['side']}" if event.get("side") else ""
    return (f" #{repeat + 1}" if isinstance(repeat, int) else "") + side


def _worker(event: Json) -> str:
    worker = event.get("worker")
    if not isinstance(worker, dict) or worker.get("node") in (None, "local"):
        return ""
    return f" on {worker.get('host')}/{worker.get('device')}"


def _evaluated(event: Json, state: RunState | None) -> str:
    node = event.get("id")
    ratio = ""
    base = state.baseline if state is not None else None
    specs = (state.specs or []) if state is not None else []
    if base is not None and base.ok and specs and base.id != node:
        lead = specs[0]
        a, b = base.metrics.get(lead.column), (event.get("metrics") or {}).get(lead.column)
        if a and b:
            r = (a / b) if not lead.higher_is_better else (b / a)
            ratio = f"  ({r:.2f}x vs baseline)"
    verdict = event.get("verdict") or {}
    call = ""
    if verdict.get("label"):
        relation = "vs" if verdict["label"] == "no significant change" else "than"
        call = (f" — {verdict['label']} {relation} {verdict.get('against')} (ratio {verdict.get('ratio', 0):.3g}, "
                f"{ci_text(verdict)}, n={verdict.get('n_candidate')})")
    suspect = f" — SUSPECT, not credited: {clip_words(event['suspect'], 160)}" if event.get("suspect") else ""
    return f"evaluated #{event.get('iteration')}: {metrics_text(event.get('metrics') or {})}{ratio}{call}{suspect}"


def _run_finished(event: Json, state: RunState | None) -> str:
    tail = ""
    if state is not None:
        best = state.best()
        tail = f" ({state.evaluated} evaluated, {state.tokens_spent:,} tokens)"
        if best is not None:
            tail += f"; best {best.id}: {metrics_text(best.metrics)}"
    return f"run finished: {event.get('reason')}{tail}"


def _tokens(event: Json, state: RunState | None) -> str:
    spent = event.get("spent")
    if spent is None and state is not None:
        spent = state.tokens_spent
    cap = state.max_tokens if state is not None else None
    return f"tokens {int(spent or 0):,}" + (f" of {cap:,}" if cap else "")


Describer = Callable[[Json, "RunState | None"], "Line | None"]

_DESCRIBE: dict[str, Describer] = {
    "run_started": lambda e, s: Line(None, f"run {e.get('run')} started on {e.get('project')} "
                                           f"(base {str(e.get('base_commit'))[:10]})"),
    "engine_attached": lambda e, s: Line(None, f"resumed by pid {e.get('pid')}: killed {e.get('orphans_killed', 0)} "
                                               f"orphan processes, removed {e.get('worktrees_removed', 0)} stale "
                                               f"worktrees"),
    "ideas_generated": lambda e, s: Line(e.get("node_id"), f"ideas: {len(e.get('ideas') or [])}" + (
        f" ({clip_words(e.get('reason'), 200)})" if e.get("reason") else "") + "".join(
        f"\n    {i + 1}. {clip_words(x, 110)}" for i, x in enumerate(e.get("ideas") or [])),
        "error" if e.get("reason") else ""),
    "phase_started": lambda e, s: Line(None, f"phase {e.get('phase')} started: expanding "
                                             f"{', '.join(dict.fromkeys(e.get('parents') or [])) or 'the baseline'}"),
    "phase_finished": lambda e, s: Line(None, f"phase {e.get('phase')} finished: best {e.get('best')}"
                                              f"{' (improved)' if e.get('improved') else ''}"),
    "node_created": lambda e, s: Line(e.get("id"), f"created ({e.get('kind')}, parent {e.get('parent')})"
                                      + (f" idea: {clip_words(e.get('idea'), 70)}" if e.get("idea") else "")
                                      + (f" hint: {clip_words(e.get('hint'), 70)}" if e.get("hint") else "")),
    "agent_started": lambda e, s: Line(e.get("id"), f"agent {e.get('role')} asking"),
    "agent_finished": lambda e, s: Line(e.get("id"), f"agent replied ({(e.get('usage') or {}).get('total_tokens', 0)} "
                                                     f"tokens): {clip_words(e.get('description'), 90)}"),
    "agent_failed": lambda e, s: Line(e.get("id"), f"agent failed: {clip_words(e.get('reason'), 200)}", "error"),
    "agent_retry": lambda e, s: Line(e.get("id"), f"agent {e.get('role')} retry {e.get('attempt')}"
                                     + (f" in {e['delay_s']:.1f} s" if isinstance(e.get("delay_s"), (int, float))
                                        else "")
                                     + f": {clip_words(e.get('reason'), 160)}"
                                     + (" (the server may have billed the abandoned call)"
                                        if e.get("billed_maybe") else ""), "error"),
    "tokens_spent": lambda e, s: Line("", _tokens(e, s)),
    "edits_applied": lambda e, s: Line(e.get("id"), f"committed {str(e.get('commit'))[:10]} on {e.get('branch')} "
                                                    f"({', '.join(e.get('files') or []) or 'no change'})"),
    "edits_rejected": lambda e, s: Line(e.get("id"), f"edits rejected: {clip_words(e.get('reason'), 200)}", "error"),
    "stage_started": lambda e, s: Line(e.get("id"), f"{e.get('stage')}{_rep(e)} running{_worker(e)}"),
    "stage_finished": lambda e, s: Line(
        e.get("id"), f"{e.get('stage')}{_rep(e)} "
                     + ("ok" if e.get("ok") else f"FAILED: {clip_words(e.get('reason'), 160)}")
                     + f" ({float(e.get('duration_s') or 0):.2f} s)", "" if e.get("ok") else "error"),
    "metric_row": lambda e, s: Line(e.get("id"), f"row {e.get('iteration')}: {metrics_text(e.get('values') or {})}"),
    "node_evaluated": lambda e, s: Line(e.get("id"), _evaluated(e, s), "error" if e.get("suspect") else "good"),
    "node_failed": lambda e, s: Line(e.get("id"), f"FAILED at {e.get('stage')}: {clip_words(e.get('reason'), 200)}",
                                     "error"),
    "node_pruned": lambda e, s: Line(e.get("id"), "pruned", "control"),
    "node_pinned": lambda e, s: Line(e.get("id"), "pinned", "control"),
    "node_unpinned": lambda e, s: Line(e.get("id"), "unpinned", "control"),
    "fork_requested": lambda e, s: Line(e.get("id"), f"fork requested: {clip_words(e.get('hint'), 90)}", "control"),
    "budget_changed": lambda e, s: Line(None, f"budget now {int(e.get('max_tokens') or 0):,} tokens", "control"),
    "run_paused": lambda e, s: Line(None, "paused", "control"),
    "run_unpaused": lambda e, s: Line(None, "resumed", "control"),
    "stop_requested": lambda e, s: Line(None, f"stopping: {e.get('reason')}", "control"),
    "run_finished": lambda e, s: Line(None, _run_finished(e, s), "control"),
    "gpu_status": lambda e, s: Line(None, (
        f"GPU: {len(e.get('devices') or [])} device(s) for benchmarks via {e.get('backend')}" if e.get("available")
        else f"no GPU: {e.get('reason') or 'none found'} (benchmarks run on the CPU)")),
    "gpu_sample": lambda e, s: None,  # one per device per second: the GPU panel shows them
    "message": lambda e, s: Line(e.get("id") if e.get("alert") else None, str(e.get("text", "")),
                                 "error" if e.get("alert") or str(e.get("text", "")).startswith("WARNING") else ""),
}


def _scoped(line: Line | None, event: Json) -> Line | None:
    """Events about a node name it ("-" when the event has no node, as the ideas agent's)."""
    if line is None or line.node is not None or str(event.get("type")) not in NODE_SCOPED:
        return line
    return Line("-", line.text, line.style)


NODE_SCOPED = frozenset({
    "node_created", "agent_started", "agent_finished", "agent_failed", "agent_retry", "tokens_spent",
    "edits_applied", "edits_rejected", "stage_started", "stage_finished", "metric_row", "node_evaluated",
    "node_failed", "node_pruned", "node_pinned", "node_unpinned", "fork_requested",
})


def describe(event: Json, state: RunState | None = None) -> Line | None:
    """The one human text of an event (None for events too chatty to show, such as GPU samples).

    `state` is the fold *after* the event, for lines that quote totals (tokens, the baseline);
    without it those lines are shorter. An unknown type still gets a line, so nothing a newer
    looptree wrote is dropped silently.
    """
    kind = str(event.get("type", ""))
    describer = _DESCRIBE.get(kind)
    if describer is None:
        return Line(None, f"unknown event {kind!r} (written by another looptree version?)", "error")
    return _scoped(describer(event, state), event)


def markdown_table() -> str:
    """The events table of docs/ARCHITECTURE.md, generated from the classes."""
    rows = ["| type | fields | meaning |", "| --- | --- | --- |"]
    for name, cls in EVENT_TYPES.items():
        fields = []
        for field_name, info in cls.model_fields.items():
            text = field_name + ("" if info.is_required() else "?")
            fields.append(text + (f" ({info.description})" if info.description else ""))
        rows.append(f"| `{name}` | {', '.join(fields) or '—'} | {cls.DOC} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m looptree.engine.core.schema: print the docs table
    print(markdown_table())
