"""A run's state as a fold over its events.

Why a fold: the engine, `resume`, `attach`, `replay`, `tree`, `show` and the dashboard all read
the same `events.jsonl`, so they cannot disagree. `RunState.apply` is incremental (O(1) per
event) so a viewer can keep up with a live run of thousands of nodes, and pure (no I/O) so it can
be tested and replayed at any speed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looptree.engine.core.metrics import MetricSpec, parse_header, priority_key
from looptree.engine.core.schema import EVENT_TYPES

TERMINAL = ("done", "failed")


@dataclass
class NodeState:
    id: str
    parent: str | None
    phase: int
    kind: str
    created_ts: float = 0.0
    idea: str | None = None
    hint: str | None = None
    fix_of: str | None = None
    status: str = "pending"  # pending, generating, generated, evaluating, done, failed
    stage: str | None = None  # the stage running now (agent/build/check/bench)
    description: str = ""
    reply_text: str | None = None
    prompt_hash: str | None = None
    model: str | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    files: list[str] = field(default_factory=list)
    commit: str | None = None
    branch: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    spread: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # live metric rows of the current evaluation
    iteration: int | None = None
    failure_stage: str | None = None
    failure_reason: str | None = None
    device: Any = None
    verdict: dict[str, Any] | None = None
    suspect: str | None = None  # why its metrics look forged (engine.evidence); never credited
    shape: dict[str, Any] | None = None  # its bench runs' shape, the yardstick for its children
    pruned: bool = False
    pinned: bool = False
    children: list[str] = field(default_factory=list)
    finished_ts: float | None = None

    @property
    def depth(self) -> int:
        return self.id.count(".")

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def credible(self) -> bool:
        """Evaluated and not suspect: the only nodes whose metrics may be credited or ranked."""
        return self.status == "done" and not self.suspect

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class RunState:
    run: int | None = None
    project: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    base_commit: str | None = None
    started_ts: float | None = None
    nodes: dict[str, NodeState] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # creation order
    ideas: list[str] | None = None
    phases_started: dict[int, list[str]] = field(default_factory=dict)
    phases_finished: dict[int, dict[str, Any]] = field(default_factory=dict)
    phase_best_before: dict[int, str | None] = field(default_factory=dict)
    specs: list[MetricSpec] | None = None
    tokens_spent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    llm_calls: int = 0
    max_tokens: int | None = None
    paused: bool = False
    stop_requested: str | None = None
    finished: str | None = None
    finished_ts: float | None = None
    pending_forks: list[dict[str, Any]] = field(default_factory=list)
    last_seq: int = -1
    last_ts: float = 0.0
    sandbox: dict[str, Any] | None = None  # the containment the commands really got (run_started, a resume's engine_attached)
    memory: dict[str, Any] | None = None  # the memory ceiling and its mechanism
    schema_version: int = 1  # of the log being folded (run_started records it since version 2)
    unknown_types: dict[str, int] = field(default_factory=dict)  # events this fold has no definition of
    control_offset: int = 0  # bytes of control.jsonl already turned into events (resume skips them)
    evaluated: int = 0
    gpu: dict[Any, dict[str, Any]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    consumed_replies: list[str] = field(default_factory=list)  # every agent reply already paid for
    gpu_available: bool | None = None
    gpu_reason: str | None = None

    # -- folding ---------------------------------------------------------------------------
    @classmethod
    def from_events(cls, events: Iterable[dict[str, Any]]) -> RunState:
        state = cls()
        for event in events:
            state.apply(event)
        return state

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        """Fold a run directory's event log in one streaming pass (tree, show, ctl, resume).

        GPU samples are left out unparsed: older logs kept them among the events, and they are
        most of such a log's lines while no reader of the run's state needs them.
        """
        from looptree.engine.core.events import EVENTS_NAME, iter_events

        return cls.from_events(iter_events(run_dir / EVENTS_NAME, skip_types=frozenset({"gpu_sample"})))

    def apply(self, event: dict[str, Any]) -> None:
        handler = getattr(self, "_on_" + event.get("type", ""), None)
        self.last_seq = event.get("seq", self.last_seq)
        self.last_ts = event.get("ts", self.last_ts)
        if "control_offset" in event:
            self.control_offset = max(self.control_offset, int(event["control_offset"]))
        if handler is None and event.get("type") not in EVENT_TYPES:  # reported, never silently dropped
            kind = str(event.get("type"))
            self.unknown_types[kind] = self.unknown_types.get(kind, 0) + 1
        if handler is not None:
            handler(event)

    def _on_run_started(self, e: dict[str, Any]) -> None:
        self.run = e.get("run")
        self.project = e.get("project")
        self.config = e.get("config", {})
        self.base_commit = e.get("base_commit")
        self.started_ts = e.get("ts")
        self.max_tokens = self.config.get("budget", {}).get("max_tokens")
        self.sandbox = e.get("sandbox")
        self.memory = e.get("memory")
        self.schema_version = int(e.get("schema_version") or 1)

    def _on_ideas_generated(self, e: dict[str, Any]) -> None:
        self.ideas = list(e.get("ideas", []))
        if e.get("text"):
            self.consumed_replies.append(e["text"])

    def _on_phase_started(self, e: dict[str, Any]) -> None:
        self.phases_started[e["phase"]] = list(e.get("parents", []))
        self.phase_best_before[e["phase"]] = e.get("best_before")

    def _on_phase_finished(self, e: dict[str, Any]) -> None:
        self.phases_finished[e["phase"]] = {"best": e.get("best"), "improved": e.get("improved", False)}

    def _on_node_created(self, e: dict[str, Any]) -> None:
        node = NodeState(
            id=e["id"], parent=e.get("parent"), phase=e.get("phase", 0), kind=e.get("kind", "improve"),
            created_ts=e.get("ts", 0.0), idea=e.get("idea"), hint=e.get("hint"), fix_of=e.get("fix_of"),
        )
        if node.kind == "baseline":
            node.description = "baseline"
        self.nodes[node.id] = node
        self.order.append(node.id)
        if node.parent in self.nodes:
            self.nodes[node.parent].children.append(node.id)
            node.pruned = self.nodes[node.parent].pruned  # nothing grows below a pruned node
        if node.kind == "fork":
            for index, fork in enumerate(self.pending_forks):
                if fork.get("id") == node.parent:
                    del self.pending_forks[index]
                    break

    def _on_agent_started(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is not None:
            node.status = "generating"
            node.stage = "agent"

    def _on_agent_finished(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if e.get("text"):
            self.consumed_replies.append(e["text"])
        if node is not None:
            node.reply_text = e.get("text")
            node.description = e.get("description") or node.description
            node.prompt_hash = e.get("prompt_hash")
            node.model = e.get("model")
            node.tokens += int(e.get("usage", {}).get("total_tokens", 0))
            node.cost_usd += float(e.get("cost_usd", 0.0))
            node.stage = None

    def _on_agent_failed(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is not None:
            node.stage = None
            if node.status == "generating":
                node.status = "pending"  # no reply: a resume asks again (node_failed follows if it gave up)

    def _on_tokens_spent(self, e: dict[str, Any]) -> None:
        self.prompt_tokens += int(e.get("prompt_tokens", 0))
        self.completion_tokens += int(e.get("completion_tokens", 0))
        self.tokens_spent += int(e.get("total_tokens", 0))
        self.cost_usd += float(e.get("cost_usd", 0.0))
        self.llm_calls += 1

    def _on_edits_applied(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is None:
            return
        node.files = list(e.get("files", []))
        node.commit = e.get("commit")
        node.branch = e.get("branch")
        node.status = "generated"

    def _on_stage_started(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is None:
            return
        node.status = "evaluating"
        node.stage = e.get("stage")
        if e.get("device") is not None:
            node.device = e.get("device")
        if e.get("stage") == "build" or (e.get("stage") == "bench" and e.get("repeat", 0) == 0
                                         and e.get("side", "candidate") == "candidate"):
            node.rows = []

    def _on_stage_finished(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is not None:
            node.stage = None

    def _on_metric_row(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is None or e.get("side") == "parent":
            return
        if self.specs is None and e.get("columns"):
            self.specs = parse_header(["iteration", *e["columns"]])
        node.rows.append({"repeat": e.get("repeat", 0), "iteration": e.get("iteration"), **e.get("values", {})})
        if len(node.rows) > 2000:
            del node.rows[:1000]

    def _on_node_evaluated(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is None:
            return
        node.status = "done"
        node.stage = None
        node.metrics = dict(e.get("metrics", {}))
        node.spread = dict(e.get("spread", {}))
        node.iteration = e.get("iteration")
        node.device = e.get("device", node.device)
        node.verdict = e.get("verdict")
        node.suspect = e.get("suspect") or None
        node.shape = e.get("shape")
        node.finished_ts = e.get("ts")
        node.failure_reason = None
        node.failure_stage = None
        if self.specs is None and e.get("columns"):
            self.specs = parse_header(["iteration", *e["columns"]])
        self.evaluated += 1

    def _on_node_failed(self, e: dict[str, Any]) -> None:
        node = self.nodes.get(e.get("id") or "")
        if node is None:
            return
        node.status = "failed"
        node.stage = None
        node.failure_stage = e.get("stage")
        node.failure_reason = e.get("reason")
        node.finished_ts = e.get("ts")

    def _on_edits_rejected(self, e: dict[str, Any]) -> None:
        pass  # always followed by node_failed, which carries the reason

    def _on_node_pruned(self, e: dict[str, Any]) -> None:
        for node_id in self.subtree(e["id"]):
            self.nodes[node_id].pruned = True

    def _on_node_pinned(self, e: dict[str, Any]) -> None:
        if e["id"] in self.nodes:
            self.nodes[e["id"]].pinned = True

    def _on_node_unpinned(self, e: dict[str, Any]) -> None:
        if e["id"] in self.nodes:
            self.nodes[e["id"]].pinned = False

    def _on_fork_requested(self, e: dict[str, Any]) -> None:
        self.pending_forks.append({"id": e["id"], "hint": e.get("hint", "")})

    def _on_budget_changed(self, e: dict[str, Any]) -> None:
        self.max_tokens = e.get("max_tokens")

    def _on_run_paused(self, e: dict[str, Any]) -> None:
        self.paused = True

    def _on_run_unpaused(self, e: dict[str, Any]) -> None:
        self.paused = False

    def _on_stop_requested(self, e: dict[str, Any]) -> None:
        self.stop_requested = e.get("reason", "stopped by user")

    def _on_engine_attached(self, e: dict[str, Any]) -> None:
        if e.get("sandbox") is not None:  # a resume may run on a machine that contains differently
            self.sandbox = e.get("sandbox")
        if e.get("memory") is not None:
            self.memory = e.get("memory")
        self.finished = None
        self.finished_ts = None
        self.stop_requested = None

    def _on_run_finished(self, e: dict[str, Any]) -> None:
        self.finished = e.get("reason", "finished")
        self.finished_ts = e.get("ts")

    def _on_gpu_status(self, e: dict[str, Any]) -> None:
        self.gpu_available = bool(e.get("available"))
        self.gpu_reason = e.get("reason")

    def _on_gpu_sample(self, e: dict[str, Any]) -> None:
        self.gpu[e.get("device")] = dict(e.get("fields", {}))

    def _on_message(self, e: dict[str, Any]) -> None:
        self.messages.append(str(e.get("text", "")))
        if len(self.messages) > 200:
            del self.messages[:100]

    # -- queries ---------------------------------------------------------------------------
    @property
    def baseline(self) -> NodeState | None:
        return self.nodes.get(str(self.run)) if self.run is not None else None

    def subtree(self, node_id: str) -> list[str]:
        out, stack = [], [node_id]
        while stack:
            current = stack.pop()
            if current in self.nodes:
                out.append(current)
                stack.extend(self.nodes[current].children)
        return out

    def successful(self) -> list[NodeState]:
        """Evaluated nodes with metrics, in creation order; suspect nodes are left out (never credited)."""
        return [self.nodes[i] for i in self.order if self.nodes[i].credible and self.nodes[i].metrics]

    def credited(self, node: NodeState) -> NodeState:
        """The node whose metrics this node is credited with.

        A node is better than the node it was timed against only when the noise-aware verdict
        says so; "no significant change" or "worse" credits it with that reference's numbers,
        so a lucky mean never becomes the best node. Nodes without a verdict (the baseline,
        runs with `bench.compare = "off"`) stand on their own metrics.
        """
        seen = 0
        while node.verdict and node.verdict.get("label") != "better" and seen < 1000:
            ref = self.nodes.get(node.verdict.get("against") or node.parent or "")
            if ref is None or not ref.credible:
                break
            node, seen = ref, seen + 1
        return node

    def ranked(self, *, include_pruned: bool = True) -> list[NodeState]:
        """Successful nodes, best first, by the metrics' priority order (leftmost decides).

        Each node ranks by the metrics it is credited with (see `credited`); among equals the
        node that earned them comes first, so the parent beats a child that was no better.
        """
        nodes = [n for n in self.successful() if include_pruned or not n.pruned]
        if not self.specs:
            return nodes
        return sorted(nodes, key=self.rank_key, reverse=True)

    def rank_key(self, node: NodeState) -> tuple[Any, ...]:
        """Larger is better: the credited metrics in priority order, then who earned them."""
        source = self.credited(node)
        return (*priority_key(source.metrics, self.specs or []), 1 if source is node else 0, -node.depth)

    def best(self) -> NodeState | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def next_child_id(self, parent_id: str) -> str:
        parent = self.nodes[parent_id]
        used = {int(c.rsplit(".", 1)[1]) for c in parent.children}
        return f"{parent_id}.{max(used, default=0) + 1}"

    def fix_depth(self, node_id: str) -> int:
        """How many fix attempts lead to this node (a fix of a fix counts twice)."""
        depth, node = 0, self.nodes.get(node_id)
        while node is not None and node.kind == "fix":
            depth += 1
            node = self.nodes.get(node.parent or "")
        return depth

    def path(self, node_id: str) -> list[NodeState]:
        """Baseline → … → node, the line of inquiry that the improve prompt shows."""
        out, node = [], self.nodes.get(node_id)
        while node is not None:
            out.append(node)
            node = self.nodes.get(node.parent or "")
        return list(reversed(out))

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes.values():
            counts[node.status] = counts.get(node.status, 0) + 1
        return counts
