"""Synthetic event logs that look like a real run (docs/ARCHITECTURE.md's event table).

Why in the package and not only under tests/: the dashboard's benchmark, its tests and a
developer who wants to look at the UI without spending tokens (`python -m app.synthetic DIR`
then `looptree replay DIR`) all need the same realistic sequences: node lifecycles with agent
calls, build/check/bench stages, live metric rows, GPU samples, failures, prunes and pins, with
fixed timestamps so snapshots are stable.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

T0 = 1_700_000_000.0
COLUMNS = ["runtime_ms (lower is better)", "throughput_gbs (higher is better)"]
CONFIG = {
    "project": {"goal": "Make solve() in solver.py faster without changing its output.", "writable": ["solver.py"]},
    "bench": {"command": "python bench.py", "metrics": "metrics.csv", "repeats": 2},
    "search": {"num_samples": 4, "num_phases": 3, "num_workers": 8},
    "budget": {"max_tokens": 2_000_000, "max_cost_usd": 5.0, "requests_per_minute": 60},
    "agent": {"provider": "replay", "model": "gpt-4.1-mini"},
}


def fake_commit(node_id: str) -> str:
    return hashlib.sha1(node_id.encode()).hexdigest()


class EventWriter:
    """Builds a list of events with increasing `seq` and `ts` (each event `dt` seconds after the last)."""

    def __init__(self, *, t0: float = T0, dt: float = 0.5) -> None:
        self.events: list[dict[str, Any]] = []
        self.ts = t0
        self.dt = dt

    def emit(self, type_: str, *, dt: float | None = None, **fields: Any) -> dict[str, Any]:
        event = {"seq": len(self.events), "ts": round(self.ts, 6), "type": type_, **fields}
        self.events.append(event)
        self.ts += self.dt if dt is None else dt
        return event


def run_start(w: EventWriter, *, run: int = 5, project: str = "/srv/demo-project", config: dict | None = None) -> None:
    w.emit("run_started", run=run, project=project, config=config or CONFIG, base_commit=fake_commit(str(run)),
           pid=4242, host="bench-host")


def lifecycle(node_id: str, parent: str | None, *, kind: str = "improve", phase: int = 1, value: float = 10.0,
              outcome: str = "done", repeats: int = 2, rows: int = 3, device: int | None = None,
              commit: str | None = None, idea: str | None = None, stop_after: str | None = None,
              verdict: dict[str, Any] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The events of one node, in the engine's order. `outcome`: done, or failed:<stage>.

    `stop_after` (an event type) ends the sequence early, leaving the node running.
    """
    columns = COLUMNS
    commit = commit or fake_commit(node_id)

    def out(type_: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        return type_, fields

    steps: list[tuple[str, dict[str, Any]]] = []
    fields: dict[str, Any] = {"id": node_id, "parent": parent, "phase": phase, "kind": kind}
    if idea:
        fields["idea"] = idea
    if kind == "fix" and parent:
        fields["fix_of"] = parent
    steps.append(out("node_created", **fields))
    if kind == "baseline":
        steps.append(out("edits_applied", id=node_id, files=[], commit=commit, branch=f"looptree/{node_id}"))
    else:
        role = "fix" if kind == "fix" else "optimize"
        steps.append(out("agent_started", id=node_id, role=role))
        steps.append(out("tokens_spent", id=node_id, role=role, prompt_tokens=3000, completion_tokens=800,
                         total_tokens=3800, cost_usd=0.0042))
        if outcome == "failed:agent":
            steps.append(out("agent_failed", id=node_id, role=role, reason="request timed out after 300 s"))
            steps.append(out("node_failed", id=node_id, stage="agent", reason="request timed out after 300 s"))
            yield from _until(steps, stop_after)
            return
        steps.append(out("agent_finished", id=node_id, role=role, text="...", description=f"Vectorise the inner loop of solve() ({node_id}).",
                         usage={"prompt_tokens": 3000, "completion_tokens": 800, "total_tokens": 3800},
                         model="gpt-4.1-mini", prompt_hash=fake_commit("p" + node_id)[:16], duration_s=4.2, cost_usd=0.0042))
        if outcome == "failed:edit":
            steps.append(out("edits_rejected", id=node_id, reason="SEARCH block not found in solver.py"))
            steps.append(out("node_failed", id=node_id, stage="edit", reason="SEARCH block not found in solver.py"))
            yield from _until(steps, stop_after)
            return
        steps.append(out("edits_applied", id=node_id, files=["solver.py"], commit=commit, branch=f"looptree/{node_id}"))
    for stage in ("build", "check"):
        steps.append(out("stage_started", id=node_id, stage=stage, device=device))
        if outcome == f"failed:{stage}":
            reason = f"{stage} command exited with status 1"
            steps.append(out("stage_finished", id=node_id, stage=stage, ok=False, rc=1, duration_s=1.5, reason=reason))
            steps.append(out("node_failed", id=node_id, stage=stage, reason=reason))
            yield from _until(steps, stop_after)
            return
        steps.append(out("stage_finished", id=node_id, stage=stage, ok=True, rc=0, duration_s=1.5, reason=None))
    for repeat in range(repeats):
        steps.append(out("stage_started", id=node_id, stage="bench", repeat=repeat, device=device))
        for it in range(rows):
            wobble = 1.0 + 0.01 * ((it * 7 + repeat * 3) % 5 - 2)
            steps.append(out("metric_row", id=node_id, repeat=repeat, iteration=it,
                             values={columns[0]: round(value * wobble, 4), columns[1]: round(1000.0 / (value * wobble), 3)},
                             columns=columns))
        if outcome == "failed:bench" and repeat == repeats - 1:
            reason = "bench command exited with status 139 (segmentation fault)"
            steps.append(out("stage_finished", id=node_id, stage="bench", repeat=repeat, ok=False, rc=139, duration_s=3.0, reason=reason))
            steps.append(out("node_failed", id=node_id, stage="bench", reason=reason))
            yield from _until(steps, stop_after)
            return
        steps.append(out("stage_finished", id=node_id, stage="bench", repeat=repeat, ok=True, rc=0, duration_s=3.0, reason=None))
    n = repeats * rows
    evaluated: dict[str, Any] = {
        "id": node_id, "metrics": {columns[0]: value, columns[1]: round(1000.0 / value, 3)},
        "spread": {columns[0]: {"n": n, "median": value, "min": round(value * 0.98, 4), "max": round(value * 1.02, 4),
                                "q1": round(value * 0.99, 4), "q3": round(value * 1.01, 4), "stdev": round(value * 0.01, 4)}},
        "columns": columns,
    }
    if device is not None:
        evaluated["device"] = device
    if verdict is not None:
        evaluated["verdict"] = verdict
    steps.append(out("node_evaluated", **evaluated))
    yield from _until(steps, stop_after)


def _until(steps: list[tuple[str, dict[str, Any]]], stop_after: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    for type_, fields in steps:
        yield type_, fields
        if stop_after is not None and type_ == stop_after:
            return


def gpu_fields(index: int, step: int) -> dict[str, Any]:
    return {"util": float((37 * step + 23 * index) % 100), "mem_used": 10240.0 + 512 * index, "mem_total": 81920.0,
            "power_w": 250.0 + 10 * index, "temp_c": 61.0 + index, "sm_clock": 1755.0, "mem_clock": 2619.0,
            "throttle": [], "processes": [[31000 + index, 10240.0]]}


def demo_run(*, finished: bool = False, gpus: int = 2, run: int = 5, project: str = "/srv/demo-project",
             commits: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """A small, complete-looking run: 10 nodes, one failure, a prune, a pin, a node mid-bench.

    Tree (run 5): 5 (baseline, 12.0) ─ 5.1 (10.5, pinned) ─ 5.1.1 (generating)
                                     ─ 5.2 (build failed)
                                     ─ 5.3 (9.0) ─ 5.3.1 (7.5, best) ─ 5.3.2 (benchmarking, on GPU 1)
                                     ─ 5.4 (11.8, pruned) ─ 5.4.1 (pruned, 12.5)
                                     ─ 5.5 (fix of nothing: agent failed)
    With `finished`, 5.3.2 and 5.1.1 complete and the run ends with "phases done".
    """
    commits = commits or {}
    w = EventWriter()
    run_start(w, run=run, project=project)
    w.emit("gpu_status", available=gpus > 0, devices=list(range(gpus)), backend="fake" if gpus else "none",
           reason=None if gpus else "NVML library not found (no NVIDIA driver)")
    r = str(run)

    def node(node_id: str, parent: str | None, **kw: Any) -> None:
        for type_, fields in lifecycle(node_id, parent, commit=commits.get(node_id), **kw):
            w.emit(type_, **fields)

    node(r, None, kind="baseline", phase=-1, value=12.0, device=0 if gpus else None)
    w.emit("ideas_generated", ideas=["vectorise the inner loop", "cache the parsed input", "use numpy"])
    w.emit("phase_started", phase=0, parents=[r])
    node(f"{r}.1", r, kind="idea", phase=0, value=10.5, idea="cache the parsed input", device=0 if gpus else None)
    node(f"{r}.2", r, kind="idea", phase=0, outcome="failed:build", idea="use numpy")
    node(f"{r}.3", r, kind="idea", phase=0, value=9.0, idea="vectorise the inner loop", device=1 if gpus > 1 else None)
    node(f"{r}.4", r, kind="idea", phase=0, value=11.8, idea="unroll by hand",
         verdict={"label": "no significant change", "metric": COLUMNS[0], "ratio": 0.983, "ci_low": 0.95,
                  "ci_high": 1.02, "ci_level": 0.904, "p_value": 0.31, "n_parent": 6, "n_candidate": 6, "against": r})
    node(f"{r}.5", r, kind="idea", phase=0, outcome="failed:agent", idea="rewrite in C")
    w.emit("phase_finished", phase=0, best=f"{r}.3", improved=True)
    w.emit("node_pinned", id=f"{r}.1")
    w.emit("phase_started", phase=1, parents=[f"{r}.3", f"{r}.4"])
    node(f"{r}.4.1", f"{r}.4", phase=1, value=12.5)
    w.emit("node_pruned", id=f"{r}.4")
    node(f"{r}.3.1", f"{r}.3", phase=1, value=7.5, device=0 if gpus else None,
         verdict={"label": "better", "metric": COLUMNS[0], "ratio": 0.833, "ci_low": 0.81, "ci_high": 0.85,
                  "ci_level": 0.904, "p_value": 0.004, "aa_noise": 0.01, "n_parent": 6, "n_candidate": 6, "against": f"{r}.3"})
    for step in range(3):
        for index in range(gpus):
            w.emit("gpu_sample", device=index, fields=gpu_fields(index, step), dt=0.1)
    stop = None if finished else "metric_row"
    node(f"{r}.3.2", f"{r}.3", phase=1, value=8.2, device=1 if gpus > 1 else None, stop_after=stop)
    if not finished:
        # a second row arrives while the first repeat runs
        w.emit("metric_row", id=f"{r}.3.2", repeat=0, iteration=1,
               values={COLUMNS[0]: 8.31, COLUMNS[1]: 120.3}, columns=COLUMNS)
    node(f"{r}.1.1", f"{r}.1", phase=1, value=10.1, stop_after=None if finished else "agent_started")
    if finished:
        w.emit("phase_finished", phase=1, best=f"{r}.3.1", improved=True)
        w.emit("run_finished", reason="phases done", tokens=30400, evaluated=7)
    return w.events


def stream_events(nodes: int, *, run: int = 7, seed: int = 0, workers: int = 8, t0: float = T0, dt: float = 0.005,
                  gpus: int = 2, branching: tuple[int, ...] = (50, 20, 9, 4)) -> Iterator[dict[str, Any]]:
    """An endless-looking large run: `nodes` nodes (breadth first), `workers` evaluated at once.

    Events of concurrent nodes interleave as they would with `search.num_workers` agents, GPU
    samples arrive every ~40 events, and about one node in seven fails somewhere.
    """
    rng = random.Random(seed)
    w = EventWriter(t0=t0, dt=dt)
    r = str(run)
    ids = _bfs_ids(r, nodes, branching)
    run_start(w, run=run, project="/srv/synthetic-project")
    yield from _drain(w)
    values: dict[str, float] = {r: 12.0}
    pending = iter(ids)
    active: list[Iterator[tuple[str, dict[str, Any]]]] = []
    gpu_step = itertools.count()

    def start_next() -> bool:
        node_id = next(pending, None)
        if node_id is None:
            return False
        parent = node_id.rsplit(".", 1)[0] if "." in node_id else None
        base = values.get(parent or r, 12.0)
        value = round(base * rng.uniform(0.86, 1.08), 4)
        values[node_id] = value
        roll = rng.random()
        outcome = "done"
        if roll < 0.05:
            outcome = "failed:build"
        elif roll < 0.09:
            outcome = "failed:bench"
        elif roll < 0.14:
            outcome = "failed:edit"
        kind = "baseline" if parent is None else ("idea" if node_id.count(".") == 1 else "improve")
        verdict = None
        if parent is not None:
            ratio = value / base
            label = "better" if ratio < 0.97 else ("worse" if ratio > 1.03 else "no significant change")
            verdict = {"label": label, "metric": COLUMNS[0], "ratio": round(ratio, 4), "against": parent}
        active.append(lifecycle(node_id, parent, kind=kind, phase=node_id.count("."), value=value, outcome=outcome,
                                device=rng.randrange(gpus) if gpus else None, verdict=verdict))
        return True

    while len(active) < workers and start_next():
        pass
    count = 0
    while active:
        index = rng.randrange(len(active))
        step = next(active[index], None)
        if step is None:
            active.pop(index)
            start_next()
            continue
        w.emit(step[0], **step[1])
        count += 1
        if gpus and count % 40 == 0:
            s = next(gpu_step)
            for device in range(gpus):
                w.emit("gpu_sample", device=device, fields=gpu_fields(device, s))
        yield from _drain(w)


def _drain(w: EventWriter) -> Iterator[dict[str, Any]]:
    yield from w.events
    w.events.clear()


def _bfs_ids(root: str, total: int, branching: tuple[int, ...]) -> list[str]:
    out, level = [root], [root]
    depth = 0
    while len(out) < total and level:
        fan = branching[min(depth, len(branching) - 1)]
        nxt: list[str] = []
        for parent in level:
            for child in range(1, fan + 1):
                if len(out) >= total:
                    break
                nxt.append(f"{parent}.{child}")
                out.append(nxt[-1])
        level, depth = nxt, depth + 1
    return out


def write_events(path: Path, events: list[dict[str, Any]] | Iterator[dict[str, Any]]) -> int:
    """Write events as JSONL (appending); returns how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event, separators=(",", ":")) + "\n")
            n += 1
    return n


def write_node_logs(run_dir: Path, node_id: str) -> None:
    """Small, fixed build/check/bench logs for a node (what the engine's evaluator leaves behind)."""
    folder = run_dir / "nodes" / node_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build.log").write_text("$ python -m py_compile solver.py\n")
    (folder / "check.log").write_text("$ python -m pytest -q tests\n....                                   [100%]\n4 passed in 0.12s\n")
    (folder / "bench.log").write_text("".join(f"iteration {i}: {10.0 - i * 0.1:.2f} ms\n" for i in range(30)))


if __name__ == "__main__":  # python -m app.synthetic RUN_DIR [--finished]
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-run")
    write_events(target / "events.jsonl", demo_run(finished="--finished" in sys.argv))
    print(f"wrote {target / 'events.jsonl'}; view it with: looptree replay {target}")
