"""What does the sandbox cost per project command?

Why this benchmark exists: every build, check and bench of every candidate now runs inside
bubblewrap (engine/evaluation/sandbox.py). Its price is paid once per command, on top of whatever the
command does, so a tiny command shows it best. This script times `procs.run_command` end to end
(spawn, wait, process-tree clean-up, log footer) for the same commands with and without the
sandbox, interleaved (U S U S …) so slow spells of a shared machine hit both sides alike, in a
real linked git worktree laid out the way a run lays it out, with the engine's limits
(`run_limits` of a default config: memory ceiling, log cap) on both sides.

Commands: `true` (the floor: what the runner and the sandbox cost), and
`python -c pass` with the interpreter running this script (a tiny Python command: the
interpreter and its venv come through the read-only binds).

Usage:  python benchmarks/sandbox_bench.py [--n 40] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from looptree.engine.core.config import validate_config
from looptree.engine.evaluation.procs import run_command, run_limits
from looptree.engine.evaluation.sandbox import command_env, resolve_sandbox


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=cwd, check=True,
                   capture_output=True)


async def _time(command: str, wt: Path, log: Path, sandbox, limits, private: Path | None) -> float:
    env = command_env(os.environ)
    t0 = time.perf_counter()
    result = await run_command(command, cwd=wt, env=env, timeout=60, log_path=log, job_tag="lt-bench-sandbox",
                               limits=limits, sandbox=sandbox, private_dir=private)
    elapsed = time.perf_counter() - t0
    if not result.ok:
        raise SystemExit(f"{command!r} failed (sandbox={sandbox is not None}): {result.tail[-300:]}")
    return elapsed


async def main_async(n: int) -> dict[str, dict[str, float]]:
    config = validate_config({"project": {"goal": "g", "writable": ["a.py"]}, "bench": {"command": "true"}})
    limits, plan = run_limits(config)
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        (project / "a.py").write_text("x = 1\n")
        _git(project, "init", "-q")
        _git(project, "add", "-A")
        _git(project, "commit", "-qm", "base")
        run_dir = project / ".looptree" / "runs" / "1"
        wt = run_dir / "worktrees" / "1"
        _git(project, "worktree", "add", "-q", "--detach", str(wt), "HEAD")
        decision = resolve_sandbox(config, hide=[project])
        if decision.sandbox is None:
            raise SystemExit(f"cannot measure: {decision.line}")
        logs = run_dir / "nodes" / "1"
        commands = {"true": "true", "python -c pass": f"{sys.executable} -c pass"}
        out: dict[str, dict[str, float]] = {}
        for label, command in commands.items():
            plain: list[float] = []
            boxed: list[float] = []
            for i in range(n + 3):  # three warm-up pairs are dropped
                order = [(None, plain), (decision.sandbox, boxed)]
                if i % 2:
                    order.reverse()
                for sandbox, sink in order:
                    seconds = await _time(command, wt, logs / "cmd.log", sandbox, limits,
                                          logs / "sandbox-candidate" if sandbox else None)
                    if i >= 3:
                        sink.append(seconds)
            out[label] = {"unsandboxed_ms": statistics.median(plain) * 1e3,
                          "sandboxed_ms": statistics.median(boxed) * 1e3}
            out[label]["cost_ms"] = out[label]["sandboxed_ms"] - out[label]["unsandboxed_ms"]
            # Back-to-back pairs: the median of the differences is robust to slow spells.
            out[label]["paired_cost_ms"] = statistics.median(b - u for u, b in zip(plain, boxed)) * 1e3
        out["_meta"] = {"n": n, "memory": plan.mechanism, "sandbox": decision.record.get("version", "?")}  # type: ignore[dict-item]
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="timed runs per command and side (default 40)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = asyncio.run(main_async(args.n))
    meta = results.pop("_meta")
    print(f"median wall time per command through procs.run_command, n={meta['n']} per side, "
          f"bubblewrap {meta['sandbox']}, memory ceiling via {meta['memory']}")
    print(f"{'command':<18}{'unsandboxed':>14}{'sandboxed':>12}{'cost':>10}{'paired cost':>14}")
    for label, row in results.items():
        print(f"{label:<18}{row['unsandboxed_ms']:>11.1f} ms{row['sandboxed_ms']:>9.1f} ms"
              f"{row['cost_ms']:>7.1f} ms{row['paired_cost_ms']:>11.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({**results, "_meta": meta}, indent=2))


if __name__ == "__main__":
    main()
