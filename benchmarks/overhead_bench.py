"""How much does looptree itself cost per node, next to the git work it cannot avoid?

Why this benchmark exists: a run of a thousand nodes spends its time in three places, the agent,
the project's own build/check/bench commands, and the harness (event log, state fold, prompt
rendering, edit application, git plumbing, process supervision). Only the last is ours to make
cheap. This script makes the first two nearly free and measures them anyway, so what is left is
the harness, and compares it with the floor of the git operations the engine performs per node.

Set-up:
  * a synthetic project in a temp dir: a git repo with a writable `solver.py` whose first line is
    `SCORE = <n>`, and a bench command made only of shell builtins (`read`, `printf`) that writes
    a two-line metrics CSV (`score (higher is better)` = n); no build or check, `repeats=1`;
  * an in-process `LLMBackend` that answers at once: an ideas list, or a SEARCH/REPLACE block
    that sets SCORE to a fresh, ever larger value, so every node is a real commit and every node
    improves on the last (the tree keeps deepening as in a run that goes well);
  * `num_phases × num_samples` nodes (default 10 agents per phase, the rest of the config at its
    defaults: num_workers=8, bench.concurrency=1), early stop off, an unlimited token budget.

Measures, per run (the run's wall clock from `Engine.create` to the end of `Engine.run`):
  * project command time: the bench command run natively (`/bin/sh -c`, no harness) is timed
    separately; that median is subtracted once per command the run executed. Spawning it through
    the engine's runner (preexec rlimits, child watcher, process-table sweep) is harness time,
    so it stays in the overhead; the figures with the runner's lifetime or the engine's
    `stage_finished.duration_s` subtracted instead are printed beside it;
  * overhead mean = (wall − Σ agent time − commands × native command time) / evaluated nodes;
  * overhead median/p90: phases are barriers, so per phase (phase_started → phase_finished,
    minus its agent and command time) / its nodes; median and p90 over phases;
  * git floor: the git calls the engine made for a node (recorded by wrapping `engine.gitops.git`
    in this process, attributed to nodes by asyncio task name and worktree path) replayed as raw
    `git` subprocesses, back to back, on a fresh copy of the project with the same tree shape;
    median over nodes. The replayed sequence is checked against the recorded one.
  * diagnostics: engine CPU per node, event-loop time blocked in fork+exec, run_command's
    cleanup after the command exits, git time as awaited inside the engine.

Usage:  python benchmarks/overhead_bench.py [--nodes 100 1000] [--samples 10] [--quick] [--repeat K]
                                             [--profile N] [--json F] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from looptree.engine.agents.llm.types import LLMRequest, LLMResponse  # noqa: E402
from looptree.engine.core.config import validate_config  # noqa: E402
from looptree.engine.core.events import read_events  # noqa: E402
from looptree.engine.evaluation import evaluator as evaluator_mod  # noqa: E402
from looptree.engine.evaluation.procs import find_job_pids  # noqa: E402
from looptree.engine.run.engine import Engine  # noqa: E402
from looptree.engine.vcs import gitops  # noqa: E402

# Builtins only (dash and bash): read the first line of solver.py, write header + one row.
BENCH_COMMAND = ("read -r line < solver.py; "
                 "printf 'iteration,score (higher is better)\\n1,%s\\n' \"${line#SCORE = }\" > metrics.csv")
SOLVER = "SCORE = {value}\n\n\ndef solve(xs):\n    return [x * SCORE for x in xs]\n"
SCORE_LINE = re.compile(r"^SCORE = (\d+)$", re.M)
TARGET_RATIO = 2.0
TARGET_GROWTH = 1.5


# ------------------------------------------------------------------------------------------
# The synthetic project


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *gitops.SAFE_CONFIG, *args], cwd=cwd, env=gitops._env(), check=True,
                          capture_output=True, text=True).stdout


def make_project(workdir: Path, name: str) -> Path:
    """A user's project as looptree meets it: a repo with one commit and a clean working tree."""
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    (root / "solver.py").write_text(SOLVER.format(value=1))
    (root / "README.md").write_text("synthetic project for benchmarks/overhead_bench.py\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "initial")
    return root


def make_config(num_phases: int, num_samples: int) -> Any:
    return validate_config({
        "project": {"goal": "Make the score higher.", "writable": ["solver.py"], "readonly": ["README.md"]},
        # compare="off": the interleaved parent-vs-candidate timing adds bench commands per node
        # by design (acceptance under noise); this benchmark measures the harness around one.
        "bench": {"command": BENCH_COMMAND, "metrics": "metrics.csv", "repeats": 1, "timeout": 60,
                  "compare": "off"},
        "agent": {"provider": "replay", "model": "instant"},
        "search": {"num_phases": num_phases, "num_samples": num_samples, "early_stop_patience": 0},
        "budget": {"max_tokens": 10**15},
    }, source="overhead_bench")


class InstantBackend:
    """An agent that answers immediately with a valid reply and fixed usage."""

    def __init__(self) -> None:
        self.next_value = 1000
        self.busy: dict[str, float] = defaultdict(float)  # task name → seconds inside complete()
        self.calls = 0

    async def complete(self, request: LLMRequest) -> LLMResponse:
        started = time.perf_counter()
        self.calls += 1
        user = next((m["content"] for m in reversed(request.messages) if m.get("role") == "user"), "")
        if request.role == "ideas":
            text = json.dumps([f"idea number {i}: raise SCORE" for i in range(32)])
        else:
            found = SCORE_LINE.findall(user)
            if len(found) != 1:
                raise RuntimeError(f"prompt for {request.node_id} shows {len(found)} SCORE lines, expected 1")
            self.next_value += 1
            text = (f"Raise SCORE from {found[0]} to {self.next_value}.\n\nsolver.py\n```\n<<<<<<< SEARCH\n"
                    f"SCORE = {found[0]}\n=======\nSCORE = {self.next_value}\n>>>>>>> REPLACE\n```\n")
        task = asyncio.current_task()
        self.busy[task.get_name() if task else "?"] += time.perf_counter() - started
        return LLMResponse(text=text, prompt_tokens=1200, completion_tokens=80, finish_reason="stop", model="instant")


# ------------------------------------------------------------------------------------------
# Probes: wrap the engine's git and command runners in this process (engine files untouched)


@dataclass
class GitCall:
    task: str
    args: tuple[str, ...]
    cwd: str
    seconds: float


@dataclass
class CmdCall:
    task: str
    proc_s: float  # the command's own lifetime (spawn → reap), ProcResult.duration_s
    call_s: float  # the whole run_command call, post-exit cleanup included


@dataclass
class Probe:
    git: list[GitCall] = field(default_factory=list)
    cmds: list[CmdCall] = field(default_factory=list)
    spawns: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # program → fork_exec s


def _task_name() -> str:
    task = asyncio.current_task()
    return task.get_name() if task is not None else "?"


@contextmanager
def probes() -> Iterator[Probe]:
    probe = Probe()
    real_git, real_run = gitops.git, evaluator_mod.run_command

    async def git(*args: str, cwd: Path, **kw: Any) -> str:
        started = time.perf_counter()
        try:
            return await real_git(*args, cwd=cwd, **kw)
        finally:
            probe.git.append(GitCall(_task_name(), args, str(cwd), time.perf_counter() - started))

    async def run_command(*args: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        result = await real_run(*args, **kw)
        probe.cmds.append(CmdCall(_task_name(), result.duration_s, time.perf_counter() - started))
        return result

    # fork+exec runs synchronously on the event-loop thread: time it (CPython private name; optional).
    real_fork_exec = getattr(subprocess, "_fork_exec", None)

    def fork_exec(args: Any, executables: Any, *rest: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_fork_exec(args, executables, *rest)  # type: ignore[misc]
        finally:
            program = os.path.basename(os.fsdecode(executables[0])) if executables else "?"
            probe.spawns[program].append(time.perf_counter() - started)

    gitops.git, evaluator_mod.run_command = git, run_command  # type: ignore[assignment]
    if real_fork_exec is not None:
        subprocess._fork_exec = fork_exec  # type: ignore[attr-defined]
    try:
        yield probe
    finally:
        gitops.git, evaluator_mod.run_command = real_git, real_run  # type: ignore[assignment]
        if real_fork_exec is not None:
            subprocess._fork_exec = real_fork_exec  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------
# One engine run


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no data."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class RunResult:
    nodes: int  # agent nodes (the baseline is extra)
    evaluated: int
    failed: int
    commands: int  # project commands run (bench × repeats, build, check)
    wall_s: float
    cpu_s: float
    agent_s: float
    proc_s: float  # Σ command lifetimes as the engine's runner measured them (spawn → reap)
    stage_s: float  # Σ stage_finished.duration_s (what the engine reports as command time)
    phases: list[dict[str, float]]  # per phase: wall, agent, commands, nodes
    latency_minus_stages: list[float]  # node_created → node_evaluated − its stage durations
    git_per_node: list[float]  # seconds of git per agent node, as awaited inside the engine
    git_calls_per_node: float
    git_sequence: list[str]  # the most common per-node git subcommand sequence
    cleanup_per_cmd: list[float]  # run_command wall − process lifetime
    spawns: dict[str, list[float]]  # program → seconds the event loop spent in fork+exec, per spawn
    parents: dict[str, str]  # agent node → parent, creation order (for the floor replay)
    base_id: str
    finish_reason: str
    load_before: float
    load_after: float


def _subcommand(args: tuple[str, ...]) -> str:
    return " ".join(args[:2]) if args and args[0] == "worktree" else (args[0] if args else "?")


_WORKTREE_ID = re.compile(r"/worktrees/([^/]+)")


def attribute_git(calls: list[GitCall]) -> dict[str, list[GitCall]]:
    """Group git calls by node: the `node <ID>` task, else the worktree path in the call, else the
    node the same task last worked for (`_remove_worktree` runs under `asyncio.shield`, a new task)."""
    by_node: dict[str, list[GitCall]] = defaultdict(list)
    last_of_task: dict[str, str] = {}
    for call in calls:
        node = call.task.removeprefix("node ") if call.task.startswith("node ") else None
        if node is None:
            for text in (call.cwd, *call.args):
                found = _WORKTREE_ID.search(text)
                if found:
                    node = found.group(1)
                    break
        if node is None:
            node = last_of_task.get(call.task, "(run)")
        last_of_task[call.task] = node
        by_node[node].append(call)
    return by_node


async def engine_run(workdir: Path, nodes: int, samples: int, profiler: cProfile.Profile | None = None) -> RunResult:
    if nodes % samples:
        raise SystemExit(f"--nodes {nodes} is not a multiple of --samples {samples}")
    project = make_project(workdir, f"project-{nodes}")
    config = make_config(nodes // samples, samples)
    backend = InstantBackend()
    load_before = os.getloadavg()[0]
    with probes() as probe:
        if profiler is not None:
            profiler.enable()
        cpu0, t0 = time.process_time(), time.perf_counter()
        engine = await Engine.create(project, config, backend=backend)
        reason = await engine.run()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        if profiler is not None:
            profiler.disable()
    events = read_events(engine.run_dir / "events.jsonl")
    base_id = str(engine.state.run)
    created = {e["id"]: e for e in events if e["type"] == "node_created"}
    parents = {i: e["parent"] for i, e in created.items() if i != base_id}
    stage_by_node: dict[str, float] = defaultdict(float)
    for e in events:
        if e["type"] == "stage_finished":
            stage_by_node[e["id"]] += float(e.get("duration_s") or 0.0)
    cmds_by_node = Counter(c.task.removeprefix("node ") for c in probe.cmds)
    agent_by_node = {k.removeprefix("node "): v for k, v in backend.busy.items()}

    # Phases are barriers: everything a phase's nodes cost lies between its start and finish events.
    started = {e["phase"]: e["ts"] for e in events if e["type"] == "phase_started"}
    phases = []
    for e in events:
        if e["type"] == "phase_finished" and e["phase"] in started:
            members = [i for i, c in created.items() if c.get("phase") == e["phase"]]
            phases.append({"wall": e["ts"] - started[e["phase"]], "nodes": len(members),
                           "agent": sum(agent_by_node.get(i, 0.0) for i in members),
                           "commands": sum(cmds_by_node.get(i, 0) for i in members)})
    done = [e for e in events if e["type"] in ("node_evaluated", "node_failed")]
    latency = [e["ts"] - created[e["id"]]["ts"] - stage_by_node.get(e["id"], 0.0)
               for e in done if e["type"] == "node_evaluated" and e["id"] != base_id]

    git_by_node = attribute_git(probe.git)
    agent_nodes = [i for i in parents if i in git_by_node]
    sequences = Counter(tuple(_subcommand(c.args) for c in git_by_node[i]) for i in agent_nodes)
    common = list(sequences.most_common(1)[0][0]) if sequences else []
    return RunResult(
        nodes=len(parents),
        evaluated=sum(1 for e in done if e["type"] == "node_evaluated"),
        failed=sum(1 for e in done if e["type"] == "node_failed"),
        commands=len(probe.cmds), wall_s=wall, cpu_s=cpu, agent_s=sum(backend.busy.values()),
        proc_s=sum(c.proc_s for c in probe.cmds), stage_s=sum(stage_by_node.values()),
        phases=phases, latency_minus_stages=latency,
        git_per_node=[sum(c.seconds for c in git_by_node[i]) for i in agent_nodes],
        git_calls_per_node=statistics.mean(len(git_by_node[i]) for i in agent_nodes) if agent_nodes else 0.0,
        git_sequence=common, cleanup_per_cmd=[c.call_s - c.proc_s for c in probe.cmds], spawns=dict(probe.spawns),
        parents=parents, base_id=base_id, finish_reason=reason, load_before=load_before,
        load_after=os.getloadavg()[0],
    )


def command_floor(workdir: Path, repeats: int = 50) -> float:
    """Median seconds of the bench command run natively (no harness), in a copy of the project."""
    where = make_project(workdir, "cmd-floor")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(["/bin/sh", "-c", BENCH_COMMAND], cwd=where, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------
# The git floor: the same per-node git operations, raw, back to back


FLOOR_SEQUENCE = ["worktree add", "add", "commit", "rev-parse", "update-ref", "diff", "worktree remove"]
"""What engine/gitops does for an agent node (add_worktree, commit_worktree, set_branch, diff,
remove_worktree), read from the code; checked against the recorded calls at run time."""


def git_floor(workdir: Path, parents: dict[str, str], base_id: str,
              by_call: dict[str, list[float]] | None = None) -> list[float]:
    """Replay every agent node's git calls on a fresh copy of the project; seconds per node
    (and, into `by_call`, seconds per call by subcommand)."""
    root = make_project(workdir, f"floor-{len(parents)}")
    exclude = root / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text(exclude.read_text() + "/.looptree/\n" if exclude.exists() else "/.looptree/\n")
    env = gitops._env()
    head = _git(root, "rev-parse", "HEAD").strip()
    commits = {base_id: head}
    _git(root, "update-ref", f"refs/heads/looptree/{base_id}", head)
    wt_root = root / ".looptree" / "runs" / "1" / "worktrees"
    wt_root.mkdir(parents=True)
    spent: list[float] = []

    def git(cwd: Path, *args: str) -> str:
        nonlocal elapsed
        started = time.perf_counter()
        out = subprocess.run(["git", *gitops.SAFE_CONFIG, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, check=True).stdout.decode()
        seconds = time.perf_counter() - started
        elapsed += seconds
        if by_call is not None:
            by_call.setdefault(_subcommand(args), []).append(seconds)
        return out

    for value, (node, parent) in enumerate(parents.items(), start=1000):
        elapsed = 0.0
        wt = wt_root / node
        git(root, "worktree", "add", "--detach", "-f", "-q", str(wt), commits[parent])
        (wt / "solver.py").write_text(SOLVER.format(value=value))  # the agent's edit: not git time
        git(wt, "add", "-A", "-f", "--", "solver.py")
        git(wt, "commit", "-q", "--allow-empty", "--no-verify", "-m", f"looptree {node}: raise SCORE")
        commits[node] = git(wt, "rev-parse", "HEAD").strip()
        git(root, "update-ref", f"refs/heads/looptree/{node}", commits[node])
        git(root, "diff", "--no-color", "--no-ext-diff", commits[parent], commits[node])
        git(root, "worktree", "remove", "--force", "--force", str(wt))
        spent.append(elapsed)
    return spent


# ------------------------------------------------------------------------------------------
# Reporting


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def use_child_watcher(kind: str) -> None:
    """`pidfd`: try the child watcher Python 3.12 uses by default (3.11's default starts a thread per child)."""
    if kind == "pidfd":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(asyncio.PidfdChildWatcher())  # type: ignore[attr-defined]


def measure(nodes: int, samples: int, workdir: Path) -> dict[str, Any]:
    run = asyncio.run(engine_run(workdir, nodes, samples))
    by_call: dict[str, list[float]] = {}
    floor = git_floor(workdir, run.parents, run.base_id, by_call)
    cmd = command_floor(workdir)
    n_eval = max(1, run.evaluated + run.failed)
    per_phase = [(p["wall"] - p["agent"] - p["commands"] * cmd) / p["nodes"] for p in run.phases if p["nodes"]]
    return {
        "nodes": run.nodes, "evaluated": run.evaluated, "failed": run.failed, "finish": run.finish_reason,
        "phases": len(run.phases), "commands": run.commands,
        "wall_s": run.wall_s, "cpu_s": run.cpu_s, "agent_s": run.agent_s, "proc_s": run.proc_s, "stage_s": run.stage_s,
        "cmd_floor_s": cmd,
        "overhead_mean_s": (run.wall_s - run.agent_s - run.commands * cmd) / n_eval,
        "overhead_mean_runner_s": (run.wall_s - run.agent_s - run.proc_s) / n_eval,
        "overhead_mean_stage_s": (run.wall_s - run.agent_s - run.stage_s) / n_eval,
        "overhead_median_s": statistics.median(per_phase),
        "overhead_p90_s": pct(per_phase, 90),
        "latency_minus_stages_median_s": statistics.median(run.latency_minus_stages) if run.latency_minus_stages else float("nan"),
        "git_engine_median_s": statistics.median(run.git_per_node) if run.git_per_node else float("nan"),
        "git_calls_per_node": run.git_calls_per_node, "git_sequence": run.git_sequence,
        "git_floor_median_s": statistics.median(floor), "git_floor_p90_s": pct(floor, 90),
        "git_floor_by_call_ms": {k: 1000 * statistics.median(v) for k, v in by_call.items()},
        "cleanup_per_cmd_median_s": statistics.median(run.cleanup_per_cmd) if run.cleanup_per_cmd else float("nan"),
        "proc_per_cmd_median_s": run.proc_s / max(1, run.commands),
        "cpu_per_node_s": run.cpu_s / n_eval,
        "spawn_ms": {k: {"n": len(v), "median_ms": 1000 * statistics.median(v), "total_s": sum(v)}
                     for k, v in run.spawns.items()},
        "load_before": run.load_before, "load_after": run.load_after,
    }


def median_row(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure's median over trials (other fields from the first trial)."""
    row = dict(trials[0])
    for key, value in row.items():
        if isinstance(value, int) and not isinstance(value, bool):
            row[key] = statistics.median_low(t[key] for t in trials)
        elif isinstance(value, float):
            row[key] = statistics.median(t[key] for t in trials)
    row["trials"] = len(trials)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    first = rows[0]
    head = (f"{'nodes':>6} {'wall s':>8} {'cmd ms':>7} {'ovh mean':>9} {'ovh med':>8} {'ovh p90':>8} "
            f"{'git floor':>9} {'ratio':>6} {'growth':>7}")
    print("\nms per node. cmd = the bench command run natively (subtracted once per command run); "
          "ovh med/p90 over phases of (phase wall − agent − commands)/nodes; ratio = ovh med / git floor "
          "median; growth = ovh med / first row's")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["overhead_median_s"] / r["git_floor_median_s"]
        growth = r["overhead_median_s"] / first["overhead_median_s"]
        print(f"{r['nodes']:>6} {r['wall_s']:>8.1f} {ms(r['cmd_floor_s']):>7} {ms(r['overhead_mean_s']):>9} "
              f"{ms(r['overhead_median_s']):>8} {ms(r['overhead_p90_s']):>8} {ms(r['git_floor_median_s']):>9} "
              f"{ratio:>6.2f} {growth:>6.2f}x")
    print("\ndetails (ms per node unless said):")
    for r in rows:
        print(f"  {r['nodes']} nodes ({r['phases']} phases): evaluated {r['evaluated']} (baseline included), "
              f"failed {r['failed']}, finish {r['finish']!r}, load average {r['load_before']:.2f} → {r['load_after']:.2f}\n"
              f"    engine-process CPU {ms(r['cpu_per_node_s'])} (event-loop and worker threads); event loop blocked "
              f"in fork+exec: " + ", ".join(f"{k} {v['n']}× {v['median_ms']:.2f} ms median ({v['total_s']:.2f} s)"
                                            for k, v in r["spawn_ms"].items()) + "\n"
              f"    git: {r['git_calls_per_node']:.1f} calls ({', '.join(r['git_sequence'])}); as awaited in the "
              f"engine {ms(r['git_engine_median_s'])} median (concurrent, so inflated); floor p90 "
              f"{ms(r['git_floor_p90_s'])}; floor per call (median): "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["git_floor_by_call_ms"].items()) + "\n"
              f"    commands: {r['commands']} run; lifetime seen by engine.procs {ms(r['proc_per_cmd_median_s'])}/command "
              f"(mean; native {ms(r['cmd_floor_s'])}), run_command cleanup after exit "
              f"{ms(r['cleanup_per_cmd_median_s'])}/command (median)\n"
              f"    overhead mean if command time were taken as engine.procs' lifetime "
              f"{ms(r['overhead_mean_runner_s'])}, as stage_finished.duration_s {ms(r['overhead_mean_stage_s'])}\n"
              f"    node_created → node_evaluated − stage durations: {ms(r['latency_minus_stages_median_s'])} median "
              f"(a latency: includes waiting behind the phase's other nodes for the git lock and bench slot)")
    for r in rows:
        if r["git_sequence"] and r["git_sequence"] != FLOOR_SEQUENCE:
            print(f"  WARNING: the engine's per-node git calls {r['git_sequence']} differ from the floor's "
                  f"{FLOOR_SEQUENCE}; update FLOOR_SEQUENCE and git_floor()")
    ok_ratio = all(r["overhead_median_s"] <= TARGET_RATIO * r["git_floor_median_s"] for r in rows)
    growth = rows[-1]["overhead_median_s"] / first["overhead_median_s"]
    print(f"\ntarget overhead median ≤ {TARGET_RATIO:g}× git floor: {'met' if ok_ratio else 'MISSED'}")
    if len(rows) > 1:
        print(f"target growth {first['nodes']}→{rows[-1]['nodes']} ≤ {TARGET_GROWTH:g}×: "
              f"{'met' if growth <= TARGET_GROWTH else 'MISSED'} ({growth:.2f}×)")
    print(f"machine: {os.cpu_count()} CPUs, {sweep_processes()} processes, load average now "
          f"{os.getloadavg()[0]:.2f}; one process-table sweep (engine.procs.find_job_pids, run after every "
          f"command) takes {ms(sweep_cost())} ms here. Other processes share the machine: treat one run as indicative")


def sweep_processes() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def sweep_cost(repeats: int = 20) -> float:
    """Median seconds of one scan of every process's environment, as run_command does after each exit."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        find_job_pids("looptree-overhead-bench:no-such-job")
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def profile(nodes: int, samples: int, workdir: Path, top: int = 15) -> None:
    profiler = cProfile.Profile()
    asyncio.run(engine_run(workdir, nodes, samples, profiler))
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(top)
        text = buf.getvalue()
        print(f"\n--- cProfile of one {nodes}-node run, top {top} by {key} (event-loop thread only) ---")
        print(text[text.find("   ncalls"):].rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000], help="agent nodes per run (default 100 1000)")
    parser.add_argument("--samples", type=int, default=10, help="agents per phase (default 10)")
    parser.add_argument("--quick", action="store_true", help="small runs (20 and 40 nodes) for a smoke test")
    parser.add_argument("--profile", type=int, metavar="N", help="also profile one N-node run with cProfile")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--repeat", type=int, default=1, help="measure each size K times, report medians")
    parser.add_argument("--child-watcher", choices=["default", "pidfd"], default="default",
                        help="asyncio child watcher for the engine's subprocesses (experiment)")
    parser.add_argument("--keep", action="store_true", help="keep the temp projects")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    sizes = [20, 40] if args.quick else args.nodes
    workdir = Path(tempfile.mkdtemp(prefix="looptree-overhead-"))
    try:
        rows = []
        use_child_watcher(args.child_watcher)
        for n in sizes:
            trials = []
            for k in range(args.repeat):
                print(f"running {n} nodes ({n // args.samples} phases × {args.samples}), trial {k + 1}/{args.repeat} …",
                      file=sys.stderr, flush=True)
                trials.append(measure(n, args.samples, workdir))
            rows.append(median_row(trials))
        print_table(rows)
        if args.profile:
            profile(args.profile, args.samples, workdir)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
    finally:
        if args.keep:
            print(f"projects kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ratio_ok = all(r["overhead_median_s"] <= TARGET_RATIO * r["git_floor_median_s"] for r in rows)
    growth_ok = rows[-1]["overhead_median_s"] <= TARGET_GROWTH * rows[0]["overhead_median_s"]
    return 1 if args.strict and not (ratio_ok and growth_ok) else 0


if __name__ == "__main__":
    sys.exit(main())
