"""Throughput of the executors: nodes evaluated per minute and bench-slot idle share.

What it runs: the same sweep of NODES candidate commits (one build and REPEATS bench runs each,
through the real ``Evaluator``) on
- the local executor with one bench slot (the engine's default ``bench.concurrency = 1``), and
- the Ray executor with 1, 2 and 4 worker actors on a real local Ray cluster bound to 127.0.0.1
  (a head with no CPUs plus two worker nodes of two CPUs; ``ray.cluster_utils.Cluster``).

The bench stands in for a GPU bench: it writes a metrics row every ``ROW_S`` seconds and spends
that time waiting (as a host process does while its kernel runs), so several benches can share
this machine's 2 cores without slowing each other. The figures therefore measure what the
executor adds (shipping the commit, checkout, polling, leases) and how well it keeps its slots
busy, not the speed of the CPU.

Bench-slot idle share = 1 - (seconds spent inside bench commands) / (slots x wall time of the sweep).

Run: ``python benchmarks/cluster_bench.py [--nodes 16] [--repeats 2]`` (about two minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: 127.0.0.1 stays loopback

from looptree.engine.core.config import validate_config
from looptree.engine.evaluation.evaluator import Evaluator
from looptree.engine.evaluation.executor import LocalExecutor

ROWS, ROW_S = 5, 0.2
BENCH = f"""#!/bin/sh
echo "iteration,time_s (lower is better)" > "$LOOPTREE_METRICS"
i=0
while [ $i -lt {ROWS} ]; do sleep {ROW_S}; echo "$i,0.$(cat version.txt)" >> "$LOOPTREE_METRICS"; i=$((i+1)); done
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@example.com", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def make_project(root: Path, nodes: int) -> list[Path]:
    """A repository and one worktree per candidate commit (each commit changes version.txt)."""
    repo = root / "project"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "bench.sh").write_text(BENCH)
    (repo / "bench.sh").chmod(0o755)
    (repo / "version.txt").write_text("100\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "base")
    trees = []
    for n in range(nodes):
        wt = root / f"wt{n}"
        git(repo, "worktree", "add", "-q", "--detach", str(wt), "HEAD")
        (wt / "version.txt").write_text(f"{200 + n}\n")
        git(wt, "commit", "-q", "-am", f"candidate {n}")
        trees.append(wt)
    return trees


async def sweep(executor: Any, trees: list[Path], repeats: int, slots: int, out: Path) -> dict[str, float]:
    """Evaluate every tree, at most ``slots`` at once (leases queue beyond that on Ray)."""
    config = validate_config({"project": {"goal": "g", "writable": ["version.txt"]},
                              "build": {"command": "test -s version.txt"},
                              "bench": {"command": "./bench.sh", "repeats": repeats, "timeout": 60, "compare": "off"},
                              "sandbox": {"mode": "off"}})
    evaluator = Evaluator(config, executor=executor)
    bench_s: list[float] = []

    def emit(type_: str, **fields: Any) -> None:
        if type_ == "stage_finished" and fields.get("stage") == "bench":
            bench_s.append(float(fields["duration_s"]))

    gate = asyncio.Semaphore(slots)

    async def one(n: int, wt: Path) -> bool:
        async with gate:
            outcome = await evaluator.evaluate(node_id=f"n{n}", project_dir=wt, node_dir=out / f"n{n}", run_dir=out,
                                               job_tag=f"lt-clusterbench:n{n}", emit=emit)
            if not outcome.ok:
                print(f"n{n} failed: {outcome.stage}: {outcome.reason}", file=sys.stderr)
            return outcome.ok

    t0 = time.monotonic()
    oks = await asyncio.gather(*(one(n, wt) for n, wt in enumerate(trees)))
    wall = time.monotonic() - t0
    assert all(oks), "a node failed"
    return {"wall_s": wall, "nodes_per_min": len(trees) / wall * 60, "idle": 1 - sum(bench_s) / (slots * wall),
            "bench_s": sum(bench_s) / len(bench_s)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    from looptree.engine.cluster.ray_executor import RayExecutor
    from looptree.engine.core.config import ClusterSection

    results: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = make_project(Path(tmp), args.nodes)
        local = await sweep(LocalExecutor(), trees, args.repeats, 1, Path(tmp) / "local")
        results.append(("local", 1, local))
        store = 80 * 1024 * 1024
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False, "object_store_memory": store})
        for _ in range(2):
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", object_store_memory=store)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            for workers in (1, 2, 4):
                executor = RayExecutor(ClusterSection(backend="ray", cpus_per_bench=1, workers=workers))
                t0 = time.monotonic()
                await executor.start(f"lt-clusterbench-{workers}:")
                started = time.monotonic() - t0
                try:
                    figures = await sweep(executor, trees, args.repeats, workers, Path(tmp) / f"ray{workers}")
                finally:
                    await executor.close()
                figures["start_s"] = started
                results.append(("ray", workers, figures))
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(f"{args.nodes} nodes x (1 build + {args.repeats} benches of {ROWS * ROW_S:.1f} s); "
          f"python {sys.version.split()[0]}, ray {ray.__version__}, {os.cpu_count()} cores")
    print("| executor | bench slots | nodes / min | bench-slot idle | mean bench stage (s) | wall (s) | workers start (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, slots, f in results:
        print(f"| {name} | {slots} | {f['nodes_per_min']:.1f} | {f['idle']:.0%} | {f['bench_s']:.2f} | "
              f"{f['wall_s']:.1f} | {f.get('start_s', 0):.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
