"""KernelBench bench guards: peak memory against input size, false "suspect" rate, hack verdicts.

    python benchmarks/kb_guard_bench.py --dataset DIR --level 1 --tasks 40,88,95 --solutions SOL
                                        [--hacks HACKS] [--repeats 3] [--limit-gb 6] [--json out.json]

Why: the bench's promises are figures (peak memory at most about twice the reference's own, no
honest solution marked suspect, every hack refused or suspect); this script measures them on
real problems, each bench a real process under an address-space limit, as the held-out check
does. Peak memory is the bench process's maximum RSS (``wait4``), once with ``--reference-only``
(what running the reference needs) and once with the solution; with the launcher (the default
bench) the reference's process stays up as the judge beside the candidate's, so the figure that
counts is all of the bench's processes together, sampled every 50 ms (``tree_peak_mb``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from looptree.gpu.kernelbench.problems import find_solution, list_problems


def _tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants together (Linux /proc), in MB."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                data = Path(f"/proc/{entry}/stat").read_text()
                parent[int(entry)] = int(data[data.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - tree
        tree |= frontier
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024


def run(problem: Path, solution: Path | None, limit_gb: float, extra: list[str]) -> dict:
    """One bench in a child process; returns its JSON result plus ``peak_mb`` (the largest single
    process, ``wait4``), ``tree_peak_mb`` (all its processes together, sampled every 50 ms: the
    launcher runs the reference's process beside the candidate's) and ``wall_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "looptree.gpu.kernelbench.runner", "--problem", str(problem), "--json", str(out), *extra]
        cmd += ["--solution", str(solution)] if solution else ["--reference-only"]
        limit = int(limit_gb * 2**30)

        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=cap)  # noqa: PLW1509
        tree_peak = [0.0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                tree_peak[0] = max(tree_peak[0], _tree_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        data = json.loads(out.read_text()) if out.exists() else {"reason": f"no result (exit {proc.returncode})"}
    data["peak_mb"] = usage.ru_maxrss / 1024  # kB on Linux: the largest of the launcher and its waited-for children
    data["tree_peak_mb"] = max(tree_peak[0], data["peak_mb"])
    data["wall_s"] = time.monotonic() - started
    data["rc"] = proc.returncode
    return data


def input_mb(problem: Path) -> float:
    code = (f"import sys, torch; sys.path.insert(0, {str(problem.parent)!r}); "
            f"import importlib.util as u; s = u.spec_from_file_location('p', {str(problem)!r}); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(sum(t.numel() * t.element_size() for t in m.get_inputs() "
            "if isinstance(t, torch.Tensor)) / 2**20)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    try:
        return float(proc.stdout.strip())
    except ValueError:
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="KernelBench-layout folder (level{L}/{N}_{Name}.py)")
    p.add_argument("--level", default="1", help="level (default 1)")
    p.add_argument("--tasks", required=True, help="task numbers, e.g. 40,88,95 or 1-5")
    p.add_argument("--solutions", required=True, help="folder of correct solutions {N}_*.py")
    p.add_argument("--hacks", default=None, help="folder of hacky solutions {N}_*.py (must never be credited)")
    p.add_argument("--repeats", type=int, default=1, help="honest benches per task, for the false-suspect rate")
    p.add_argument("--limit-gb", type=float, default=6.0, help="address-space limit per bench (default 6)")
    p.add_argument("--bench-args", default="--no-compile", help="extra kb_bench flags (default --no-compile)")
    p.add_argument("--credit-above", type=float, default=1.2,
                   help="a hack is credited when it is correct, not suspect and faster than this (default 1.2: "
                        "a cache that never hits runs the reference itself, at 1.0x give or take the noise)")
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)
    extra = args.bench_args.split()
    rows = []
    print(f"{'task':24} {'input MB':>9} {'ref MB':>8} {'bench MB':>9} {'all MB':>7} {'ratio':>6}  "
          "honest (suspect/runs)  hack")
    for problem in list_problems(args.dataset, args.level, args.tasks):
        solution = find_solution(args.solutions, problem.number)
        if solution is None:
            continue
        ref = run(problem.path, None, args.limit_gb, extra)
        honest = [run(problem.path, solution, args.limit_gb, extra) for _ in range(max(1, args.repeats))]
        hack_path = find_solution(args.hacks, problem.number) if args.hacks else None
        hack = run(problem.path, hack_path, args.limit_gb, extra) if hack_path else None
        credited = bool(hack and hack.get("correct") and not hack.get("suspect") and (hack.get("speedup_vs_eager") or 0) > args.credit_above)
        row = {"task": problem.stem, "input_mb": input_mb(problem.path), "reference_peak_mb": ref["peak_mb"],
               "bench_peak_mb": max(h["peak_mb"] for h in honest),
               "bench_tree_peak_mb": max(h["tree_peak_mb"] for h in honest),
               "honest_speedups": [h.get("speedup_vs_eager") for h in honest],
               "honest_correct": sum(1 for h in honest if h.get("correct")),
               "honest_suspect": sum(1 for h in honest if h.get("suspect")), "runs": len(honest),
               "hack_credited": credited, "hack_reason": (hack or {}).get("reason", ""),
               "hack_speedup": (hack or {}).get("speedup_vs_eager")}
        rows.append(row)
        ratio = row["bench_tree_peak_mb"] / row["reference_peak_mb"] if row["reference_peak_mb"] else float("nan")
        speed = f"{row['hack_speedup']:.2f}x" if isinstance(row["hack_speedup"], (int, float)) else "?"
        verdict = "-" if hack is None else ("CREDITED " + speed if credited else
                                            (hack.get("reason") or f"not faster ({speed})")[:60])
        print(f"{row['task']:24} {row['input_mb']:9.0f} {row['reference_peak_mb']:8.0f} {row['bench_peak_mb']:9.0f} "
              f"{row['bench_tree_peak_mb']:7.0f} "
              f"{ratio:6.2f}  {row['honest_suspect']}/{row['runs']} (correct {row['honest_correct']})  {verdict}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(r["hack_credited"] or r["honest_suspect"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
