"""Does the noise-aware acceptance test call the right nodes "better" on this machine?

Why this benchmark exists: a tree search keeps a child only when the evaluator says it is better
than its parent. Two errors matter. A node that is its parent unchanged (A/A) must rarely be
called "better" (target: at most 5 %), or the tree fills with lucky noise. A real 5 % speed-up
must usually be seen (target: at least 80 % with at most 10 repeats per side), or the search
throws good work away. Both depend on the machine's noise, so they are measured here, through
the real path: `Evaluator.evaluate(..., reference_dir=parent)` starts the bench commands as
subprocesses through `engine.procs`, tails the metrics CSV, interleaves parent and candidate
runs, and `_judge` → `engine.stats.compare` / `adaptive_repeats` gives the verdict.

Set-up, in a temp dir:
  * two project dirs, `parent/` and `candidate/`, with the same `bench.py`: one warm-up and then
    `--inner` timed runs of a pure-Python loop (about `--work-ms` ms), one metrics row each
    (`runtime_ms (lower is better)`); the evaluator takes the median of a run's rows, as for a
    real project. The loop count is calibrated once. The candidate reads a factor from
    `factor.txt` and runs round(count × factor) iterations: 1.00 for A/A, `--speedup` (0.95) for
    a real speed-up, so it is genuinely that much less work, not a fudged number;
  * `--clock wall` times with `time.perf_counter` (what most benches do), `--clock cpu` with
    `time.process_time` (the bench process's own CPU time: time spent preempted by other jobs
    does not count), `--clock both` runs the two side by side;
  * no build or check; `bench.repeats` / `bench.max_repeats` / `bench.alpha` as given
    (defaults 5 / 10 / 0.05, the config defaults). A/A and speed-up trials alternate, so a change
    in machine load hits both alike.

Reports, per clock and condition: verdict counts, the rate of "better" with a Wilson 95 %
interval, mean repeats per side, the measured noise (per-repeat CV of the parent and the
noise floor the evaluator used), why missed speed-ups were missed, wall time and load average.

`--what-if` runs every trial with a fixed `--max-repeats` pairs and then replays several
acceptance policies (the current one included: its 5 → 10 steps use the first 5 pairs, then all
10) on exactly the same measurements, through `engine.stats`, so the policies can be compared
without the luck of different samples; two of them are also replayed with each repeat summarised
by its fastest row instead of its median. Without `--what-if`, the replay of the current policy is
only used as a check that it reproduces the evaluator's verdicts. `--simulate 1,2,3,5` runs no
bench at all: it feeds the same policies synthetic i.i.d. log-normal repeats with those per-repeat
CVs (%), to show what noise level each policy needs (a model, clearly labelled as one).

Usage:  python benchmarks/noise_bench.py [--trials 40] [--clock wall|cpu|both] [--repeats 5]
            [--max-repeats 10] [--speedup 0.95] [--work-ms 30] [--inner 5] [--alpha 0.05]
            [--quick] [--what-if] [--simulate CV%,...] [--sims N] [--json F] [--keep] [--strict]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

from looptree.engine.core.config import Config, validate_config  # noqa: E402
from looptree.engine.core.metrics import MetricSpec  # noqa: E402
from looptree.engine.evaluation.evaluator import Evaluator  # noqa: E402
from looptree.engine.evaluation.sequential import look_level  # noqa: E402
from looptree.engine.evaluation.stats import Verdict, adaptive_repeats, compare, noise_floor  # noqa: E402

TARGET_FALSE_BETTER = 0.05
TARGET_DETECTION = 0.80
COLUMN = "runtime_ms (lower is better)"

# The project's bench. Plain stdlib so it starts fast under `python -S`.
BENCH_PY = '''\
import os, sys, time

def work(n):
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc

clock = time.process_time if sys.argv[1] == "cpu" else time.perf_counter
inner = int(sys.argv[2])
count = round(int(open("iterations.txt").read()) * float(open("factor.txt").read()))
out = os.environ.get("LOOPTREE_METRICS", "metrics.csv")
work(count)  # warm-up, not reported
with open(out, "w") as fh:
    fh.write("iteration,runtime_ms (lower is better)\\n")
    for k in range(inner):
        t0 = clock()
        work(count)
        fh.write(f"{k},{(clock() - t0) * 1000.0:.5f}\\n")
        fh.flush()
'''


def _work(n: int) -> int:
    """The same loop as BENCH_PY's, for calibration in this process."""
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) & 0xFFFFFFFF
    return acc


def calibrate(work_ms: float) -> int:
    """Loop count that takes about ``work_ms`` of CPU here (best of a few, so load inflates it less)."""
    probe = 200_000
    best = math.inf
    for _ in range(5):
        t0 = time.process_time()
        _work(probe)
        best = min(best, time.process_time() - t0)
    return max(1000, round(probe * work_ms / 1000.0 / max(best, 1e-6)))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval for a binomial rate; honest at 0/n and n/n, unlike p ± 2σ."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Trial:
    clock: str
    condition: str  # "A/A" or "speed-up"
    factor: float
    label: str
    n_parent: int
    n_candidate: int
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    noise_floor: float
    alpha_look: float  # the nominal one-sided level of the look that decided
    wall_s: float
    load1: float
    parent: list[float] = field(default_factory=list)  # per-repeat medians, in run order
    candidate: list[float] = field(default_factory=list)
    parent_rows: list[list[float]] = field(default_factory=list)  # every row of every repeat
    candidate_rows: list[list[float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Set-up and trials


def make_projects(root: Path, iterations: int) -> tuple[Path, Path]:
    dirs = []
    for name in ("parent", "candidate"):
        d = root / name
        d.mkdir(parents=True)
        (d / "bench.py").write_text(BENCH_PY)
        (d / "iterations.txt").write_text(f"{iterations}\n")
        (d / "factor.txt").write_text("1.0\n")
        dirs.append(d)
    return dirs[0], dirs[1]


def make_config(clock: str, inner: int, repeats: int, max_repeats: int, alpha: float, test: str) -> Config:
    command = f"{shlex.quote(sys.executable)} -S bench.py {clock} {inner}"
    return validate_config({
        "project": {"goal": "noise benchmark", "writable": ["bench.py"]},
        "bench": {"command": command, "repeats": repeats, "max_repeats": max_repeats, "alpha": alpha,
                  "timeout": 120.0, "test": test},
    }, source="noise_bench")


def _median(values: list[float]) -> float:
    return statistics.median(values)


async def run_trial(evaluator: Evaluator, clock: str, condition: str, factor: float, parent_dir: Path,
                    cand_dir: Path, root: Path, index: int) -> tuple[Trial, list[MetricSpec]]:
    (cand_dir / "factor.txt").write_text(f"{factor!r}\n")
    node_id = f"n{index}"
    t0 = time.monotonic()
    outcome = await evaluator.evaluate(node_id=node_id, project_dir=cand_dir, node_dir=root / "nodes" / node_id,
                                       run_dir=root, job_tag=f"noisebench-{os.getpid()}-{index}",
                                       emit=lambda *a, **k: None, reference_dir=parent_dir)
    wall = time.monotonic() - t0
    if not outcome.ok or outcome.verdict is None or not outcome.specs:
        raise SystemExit(f"noise_bench: trial {index} did not produce a verdict: {outcome.stage}: {outcome.reason}")
    v = outcome.verdict
    raw = lambda rows: [[r[COLUMN] for r in rep] for rep in rows]  # noqa: E731
    trial = Trial(clock, condition, factor, v["label"], v["n_parent"], v["n_candidate"], v["ratio"], v["ci_low"],
                  v["ci_high"], v["p_value"], (v.get("aa_noise") or 0.0), v.get("alpha_look", math.nan), wall, os.getloadavg()[0],
                  [_median(r) for r in raw(outcome.parent_rows)], [_median(r) for r in raw(outcome.rows)],
                  raw(outcome.parent_rows), raw(outcome.rows))
    return trial, outcome.specs


# ---------------------------------------------------------------------------------------------
# Policy replay on recorded per-repeat medians


Policy = Callable[[list[float], list[float]], tuple[str, int]]


def floor_aa(parent: list[float]) -> float | None:
    """The evaluator's floor: the parent's even vs odd repeats (needs 4)."""
    return noise_floor(parent[0::2], parent[1::2]) if len(parent) >= 4 else None


def make_policy(start: int, cap: int, floor: Callable[[list[float]], float | None],
                level: Callable[[int], float], paired: bool) -> Policy:
    """Judge at ``start`` pairs, then add what ``adaptive_repeats`` asks for, as `_bench` does.

    ``level(n)`` is the one-sided level of the look at ``n`` pairs; ``paired`` picks the
    signed-rank test on the pairs instead of Mann-Whitney.
    """
    def policy(parent: list[float], cand: list[float]) -> tuple[str, int]:
        n = start
        while True:
            p, c = parent[:n], cand[:n]
            verdict: Verdict = compare(p, c, lower_is_better=True, alpha=level(n), noise_floor=floor(p),
                                       paired=paired)
            more = adaptive_repeats(verdict, max_repeats=cap)
            if more == 0 or n + more > len(parent):
                if more and n + more > len(parent):
                    return "short", n  # the recording stopped earlier than this policy would
                return verdict.label, n
            n += more
    return policy


def spending(repeats: int, cap: int, alpha: float, paired: bool) -> Callable[[int], float]:
    """The per-look level `_judge` uses: O'Brien-Fleming spending, looks the test cannot pass dropped."""
    return lambda n: look_level(n, repeats, cap, alpha, paired=paired)


def policies(repeats: int, cap: int, alpha: float, test: str = "paired") -> dict[str, Policy]:
    """The current policy (for ``test``) and the alternatives the report compares it with."""
    none = lambda p: None  # noqa: E731
    fixed = lambda x: (lambda p: x)  # noqa: E731
    looks, n = 1, repeats  # adaptive_repeats doubles up to the cap: 5 -> 10 is two looks at the data
    while n < cap:
        looks, n = looks + 1, min(2 * n, cap)
    flat = lambda a: (lambda n: a)  # noqa: E731
    paired = test == "paired"
    other = "mann-whitney" if paired else "paired"
    return {
        f"current: {test}, {repeats}->{cap}, O'Brien-Fleming spending": make_policy(
            repeats, cap, none, spending(repeats, cap, alpha, paired), paired),
        f"{other}, {repeats}->{cap}, O'Brien-Fleming spending": make_policy(
            repeats, cap, none, spending(repeats, cap, alpha, not paired), not paired),
        f"mann-whitney, {repeats}->{cap}, Bonferroni alpha/{looks} per look": make_policy(
            repeats, cap, none, flat(alpha / looks), False),
        f"mann-whitney, {repeats}->{cap}, floor = A/A CI (the first design)": make_policy(
            repeats, cap, floor_aa, flat(alpha), False),
        f"{test}, {repeats}->{cap}, spending, fixed floor 1%": make_policy(
            repeats, cap, fixed(0.01), spending(repeats, cap, alpha, paired), paired),
        f"{test}, fixed {cap}, one look": make_policy(cap, cap, none, flat(alpha), paired),
    }


# ---------------------------------------------------------------------------------------------
# Report


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def rate_text(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {pct(k / n if n else math.nan)} [{pct(lo)}, {pct(hi)}]"


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else math.nan


def miss_reason(t: Trial) -> str:
    if t.label == "better":
        return "detected"
    if t.p_value >= t.alpha_look:
        return "rank test not significant"
    if t.ci_high >= 1.0:
        return "ratio CI reaches 1"
    return "CI clears 1 but not the noise floor"


def report(trials: list[Trial], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    print("\n## Verdicts through Evaluator.evaluate (real bench subprocesses, interleaved)\n")
    print("| clock | condition | trials | better | no change | worse | rate of 'better' (Wilson 95%) "
          "| mean repeats/side | parent CV/repeat | median floor | median ratio | wall s/trial |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for clock in sorted({t.clock for t in trials}):
        for cond in ("A/A", "speed-up"):
            ts = [t for t in trials if t.clock == clock and t.condition == cond]
            if not ts:
                continue
            counts = {lab: sum(t.label == lab for t in ts) for lab in ("better", "no significant change", "worse")}
            n = len(ts)
            reps = statistics.mean(t.n_candidate for t in ts)
            par_cv = statistics.median(cv(t.parent) for t in ts)
            floor = statistics.median(t.noise_floor for t in ts)
            ratio = statistics.median(t.ratio for t in ts)
            wall = statistics.mean(t.wall_s for t in ts)
            print(f"| {clock} | {cond} | {n} | {counts['better']} | {counts['no significant change']} "
                  f"| {counts['worse']} | {rate_text(counts['better'], n)} | {reps:.2f} | {pct(par_cv)} "
                  f"| {pct(floor)} | {ratio:.4f} | {wall:.1f} |")
            summary[f"{clock} {cond}"] = {
                "trials": n, **counts, "better_rate": counts["better"] / n,
                "better_wilson95": wilson(counts["better"], n), "worse_rate": counts["worse"] / n,
                "mean_repeats_per_side": reps, "median_parent_cv": par_cv, "median_noise_floor": floor,
                "median_ratio": ratio, "mean_trial_wall_s": wall}
    print()
    for clock in sorted({t.clock for t in trials}):
        aa = summary.get(f"{clock} A/A")
        sp = summary.get(f"{clock} speed-up")
        if aa:
            ok = aa["better_rate"] <= TARGET_FALSE_BETTER
            print(f"{clock}: A/A false 'better' {pct(aa['better_rate'])} (target ≤ {pct(TARGET_FALSE_BETTER)}): "
                  f"{'met' if ok else 'MISSED'}; false 'worse' {pct(aa['worse_rate'])}")
        if sp:
            ok = sp["better_rate"] >= TARGET_DETECTION
            print(f"{clock}: {pct(1 - args.speedup)} speed-up detected {pct(sp['better_rate'])} "
                  f"(target ≥ {pct(TARGET_DETECTION)}): {'met' if ok else 'MISSED'}; "
                  f"called 'worse' {pct(sp['worse_rate'])}")
            misses: dict[str, int] = {}
            for t in trials:
                if t.clock == clock and t.condition == "speed-up" and t.label != "better":
                    reason = miss_reason(t)
                    misses[reason] = misses.get(reason, 0) + 1
            if misses:
                print("    missed because: " + "; ".join(f"{k}: {v}" for k, v in sorted(misses.items())))
            sp["miss_reasons"] = misses
    loads = [t.load1 for t in trials]
    print(f"\nload average (1 min) during the trials: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f} on {os.cpu_count()} CPUs")
    summary["load1"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    return summary


def policy_rows(group: str, pols: dict[str, Policy], aa: list[tuple[list[float], list[float]]],
                sp: list[tuple[list[float], list[float]]], out: dict[str, Any]) -> None:
    """One table row per policy: its verdicts on the A/A and speed-up samples of one group."""
    for name, policy in pols.items():
        row: dict[str, Any] = {}
        for cond, samples in (("A/A", aa), ("speed-up", sp)):
            results = [policy(p, c) for p, c in samples]
            row[cond] = {"better": sum(r[0] == "better" for r in results),
                         "worse": sum(r[0] == "worse" for r in results), "n": len(results),
                         "pairs": statistics.mean(r[1] for r in results) if results else math.nan}
        a, s = row["A/A"], row["speed-up"]
        print(f"| {group} | {name} | {rate_text(a['better'], a['n'])} | {a['worse']}/{a['n']} "
              f"| {rate_text(s['better'], s['n'])} | {a['pairs']:.1f}, {s['pairs']:.1f} |")
        out[f"{group} | {name}"] = row


TABLE_HEAD = ("| {group} | policy | A/A false 'better' (Wilson 95%) | A/A 'worse' | speed-up detected (Wilson 95%) "
              "| mean pairs (A/A, speed-up) |\n| --- | --- | --- | ---: | --- | ---: |")


def replay_report(trials: list[Trial], args: argparse.Namespace) -> dict[str, Any]:
    """Current policy re-judged from the recorded medians (must match), and with --what-if, alternatives."""
    out: dict[str, Any] = {}
    if not args.what_if:
        paired = args.test == "paired"
        current = make_policy(args.repeats, args.max_repeats, lambda p: 0.0,
                              spending(args.repeats, args.max_repeats, args.alpha, paired), paired)  # as `_judge`
        same = sum(current(t.parent, t.candidate)[0] == t.label for t in trials)
        print(f"replay check: engine.stats on the recorded medians gives the evaluator's verdict in "
              f"{same}/{len(trials)} trials")
        out["replay_matches"] = same
        return out
    print(f"\n## What-if: policies replayed on the same {args.max_repeats} interleaved pairs per trial\n")
    print(TABLE_HEAD.format(group="clock"))
    pols = policies(args.repeats, args.max_repeats, args.alpha, args.test)
    # The same data with each repeat summarised by its fastest row instead of its median: a stray
    # slow row (preemption, a neighbour's cache traffic) then costs nothing unless every row has it.
    by_min = {f"{name}; repeat = min of rows": pols[name] for name in list(pols)[:2]}
    for clock in sorted({t.clock for t in trials}):
        pick = lambda cond: [(t.parent, t.candidate) for t in trials if t.clock == clock and t.condition == cond]  # noqa: E731
        policy_rows(clock, pols, pick("A/A"), pick("speed-up"), out)
        pick_min = lambda cond: [([min(r) for r in t.parent_rows], [min(r) for r in t.candidate_rows])  # noqa: E731
                                 for t in trials if t.clock == clock and t.condition == cond]
        policy_rows(clock, by_min, pick_min("A/A"), pick_min("speed-up"), out)
    return out


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    """The same policies on synthetic i.i.d. log-normal repeats: what noise level each one needs.

    A model, not a measurement: no drift, no outliers, no bimodality. It answers "at what
    per-repeat CV does a policy reach the targets", which the shared machine cannot.
    """
    import numpy as np

    rng = np.random.default_rng(20240607)
    cap = args.max_repeats
    pols = policies(args.repeats, cap, args.alpha, args.test)
    out: dict[str, Any] = {}
    print(f"\n## Model: {args.sims} simulated trials per cell, i.i.d. log-normal per-repeat medians, "
          f"true ratio {args.speedup}\n")
    print(TABLE_HEAD.format(group="per-repeat CV"))
    lo, hi = args.slow_by

    def one_side(sigma: float, factor: float) -> np.ndarray:
        x = factor * np.exp(rng.normal(0, sigma, cap))
        slow = rng.random(cap) < args.slow_share  # one run caught in a slow phase
        x[slow] *= 1.0 + rng.uniform(lo, hi, int(slow.sum()))
        return x

    def one_trial(sigma: float, factor: float) -> tuple[list[float], list[float]]:
        p, c = one_side(sigma, 1.0), one_side(sigma, factor)
        spell = rng.random(cap) < args.spell_share  # a slow spell over both runs of a pair
        by = 1.0 + rng.uniform(lo, hi, int(spell.sum()))
        p[spell] *= by
        c[spell] *= by
        return p.tolist(), c.tolist()

    if args.slow_share or args.spell_share:
        print(f"(slow phases: each run alone with probability {args.slow_share:g}, and both runs of a pair "
              f"with probability {args.spell_share:g}, are 1+U({lo:g}, {hi:g}) times slower)\n")
    for cv_value in args.simulate:
        sigma = math.sqrt(math.log(1 + cv_value ** 2))
        draw = lambda factor: [one_trial(sigma, factor) for _ in range(args.sims)]  # noqa: E731
        policy_rows(pct(cv_value), pols, draw(1.0), draw(args.speedup), out)
    return out


# ---------------------------------------------------------------------------------------------
# Main


async def main_async(args: argparse.Namespace) -> int:
    if args.simulate:
        started = time.monotonic()
        result = simulate(args)
        print(f"\nsimulated in {time.monotonic() - started:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"simulation": result, "args": vars(args)}, indent=1, default=str))
        return 0
    clocks = ["wall", "cpu"] if args.clock == "both" else [args.clock]
    root = Path(tempfile.mkdtemp(prefix="looptree-noise-"))
    try:
        iterations = calibrate(args.work_ms)
        parent_dir, cand_dir = make_projects(root, iterations)
        eval_repeats = args.max_repeats if args.what_if else args.repeats
        evaluators = {c: Evaluator(make_config(c, args.inner, eval_repeats, args.max_repeats, args.alpha, args.test))
                      for c in clocks}
        print(f"noise_bench: {args.trials} trials per condition and clock ({', '.join(clocks)}), "
              f"bench.repeats={eval_repeats}, bench.max_repeats={args.max_repeats}, alpha={args.alpha}, "
              f"bench.test={args.test}, "
              f"speed-up factor {args.speedup}, {iterations} loop iterations (~{args.work_ms:g} ms CPU) × "
              f"{args.inner} rows per bench run; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
              f"{'; what-if mode: every trial runs ' + str(args.max_repeats) + ' pairs' if args.what_if else ''}")
        trials: list[Trial] = []
        started = time.monotonic()
        index = 0
        for i in range(args.trials):
            # Alternate the order of conditions and clocks so neither always runs first.
            conds = [("A/A", 1.0), ("speed-up", args.speedup)]
            for clock in (clocks if i % 2 == 0 else clocks[::-1]):
                for cond, factor in (conds if (i // len(clocks)) % 2 == 0 else conds[::-1]):
                    trial, _ = await run_trial(evaluators[clock], clock, cond, factor, parent_dir, cand_dir, root,
                                               index)
                    trials.append(trial)
                    index += 1
            if args.progress:
                print(f"  {i + 1}/{args.trials} rounds, {time.monotonic() - started:.0f} s", file=sys.stderr)
        total = time.monotonic() - started
        print(f"ran {len(trials)} trials in {total:.0f} s")
        summary = report(trials, args)
        summary["replay"] = replay_report(trials, args)
        summary["total_wall_s"] = total
        summary["iterations"] = iterations
        summary["args"] = vars(args)
        if args.json:
            Path(args.json).write_text(json.dumps({"summary": summary, "trials": [asdict(t) for t in trials]},
                                                  indent=1, default=str))
            print(f"wrote {args.json}")
        if args.keep:
            print(f"kept {root}")
        missed = [k for k, v in summary.items() if isinstance(v, dict) and "better_rate" in v and (
            (k.endswith("A/A") and v["better_rate"] > TARGET_FALSE_BETTER)
            or (k.endswith("speed-up") and v["better_rate"] < TARGET_DETECTION))]
        return 1 if args.strict and missed else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40, help="trials per condition (A/A, speed-up) and clock")
    ap.add_argument("--repeats", type=int, default=5, help="bench.repeats (pairs before the first verdict)")
    ap.add_argument("--max-repeats", type=int, default=10, help="bench.max_repeats (most pairs per trial)")
    ap.add_argument("--alpha", type=float, default=0.05, help="bench.alpha")
    ap.add_argument("--test", choices=["paired", "mann-whitney"], default="paired", help="bench.test")
    ap.add_argument("--speedup", type=float, default=0.95, help="candidate work factor for the speed-up trials")
    ap.add_argument("--work-ms", type=float, default=30.0, help="CPU time of one timed loop in the parent")
    ap.add_argument("--inner", type=int, default=5, help="timed loops (metrics rows) per bench run")
    ap.add_argument("--clock", choices=["wall", "cpu", "both"], default="wall")
    ap.add_argument("--quick", action="store_true", help="6 trials, 10 ms loops: a smoke test")
    ap.add_argument("--what-if", action="store_true",
                    help="run max-repeats pairs every trial and replay alternative policies on them")
    ap.add_argument("--simulate", type=lambda v: [float(x) / 100 for x in v.split(",")], default=None,
                    metavar="CV%,...", help="no benches: replay the policies on synthetic noise with these "
                    "per-repeat CVs in percent (e.g. 1,2,3,5)")
    ap.add_argument("--sims", type=int, default=200, help="simulated trials per cell with --simulate")
    ap.add_argument("--slow-share", type=float, default=0.0,
                    help="with --simulate: share of repeats hit by a slow phase (heavy right tail), e.g. 0.1")
    ap.add_argument("--spell-share", type=float, default=0.0,
                    help="with --simulate: share of pairs inside a slow spell that slows both runs alike")
    ap.add_argument("--slow-by", type=lambda v: tuple(float(x) for x in v.split(",")), default=(0.3, 0.5),
                    metavar="LO,HI", help="with --slow-share: a slow repeat is 1+U(LO,HI) times slower")
    ap.add_argument("--json", help="write the summary and every trial's measurements here")
    ap.add_argument("--keep", action="store_true", help="keep the temp projects and logs")
    ap.add_argument("--progress", action="store_true", help="a line on stderr after every round")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.work_ms = min(args.trials, 6), 10.0
    if args.trials < 1 or args.repeats < 1 or args.max_repeats < args.repeats or not 0 < args.speedup < 2:
        ap.error("need --trials ≥ 1, 1 ≤ --repeats ≤ --max-repeats, 0 < --speedup < 2")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
