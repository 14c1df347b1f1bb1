"""`looptree eval`: benchmark git refs or node IDs with the project's own stages, no agent.

Why separate from runs: a user checking "is branch X really faster than main?" wants numbers,
not a new run in the tree; the worktrees go to a scratch folder and are removed afterwards.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from looptree.engine.core.config import load_config
from looptree.engine.core.metrics import MetricSpec
from looptree.engine.evaluation.evaluator import Evaluator
from looptree.engine.vcs import gitops

_NODE_ID = re.compile(r"^\d+(\.\d+)*$")


async def eval_refs(project: Path, refs: list[str], *, repeats: int | None, config_file: Path | None,
                    json_mode: bool) -> int:
    if not project.is_dir():  # `looptree eval 1.2.1` run inside the project: DIR left out
        refs, project = [project.name, *refs], Path.cwd()
    config = load_config(project, config_file, [])
    repo = await gitops.open_repo(project, create=False)
    targets: list[tuple[str, str]] = []
    if not refs:
        targets.append(("working tree", await gitops.snapshot_working_tree(repo, "looptree eval: working tree")))
    for ref in refs:
        name = f"looptree/{ref}" if _NODE_ID.match(ref) else ref
        targets.append((ref, await gitops.resolve_ref(repo, name)))
    # The same limits, sandbox and device pinning as a run, so the numbers are comparable.
    from looptree.engine.evaluation.procs import run_limits
    from looptree.engine.evaluation.sandbox import resolve_sandbox
    from looptree.gpu.devices.locks import hold_async, key_with_telemetry
    from looptree.gpu.devices.slots import env_for, parse_devices
    from looptree.gpu.devices.telemetry import choose_backend

    telemetry = choose_backend(config.gpu.telemetry)
    try:
        devices = [] if config.bench.device == "cpu" else parse_devices(config.gpu.devices, telemetry)
        containment = resolve_sandbox(config, hide=[repo.root, project], telemetry=telemetry, devices=devices[:1])
        lock_key = key_with_telemetry(devices[0] if devices else None, telemetry, config.bench.concurrency)
    finally:
        telemetry.close()
    if containment.line:
        print(f"looptree: {containment.line}", file=sys.stderr)
    evaluator = Evaluator(config, run_limits(config)[0], sandbox=containment.sandbox)
    device_env = env_for(devices[0] if devices else None)
    results: list[dict[str, Any]] = []
    specs: list[MetricSpec] | None = None
    scratch = project / ".looptree" / "eval"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        for index, (label, commit) in enumerate(targets):
            wt = Path(tmp) / f"wt{index}"
            await gitops.add_worktree(repo, wt, commit)
            try:
                def emit(type_: str, **fields: Any) -> None:
                    if type_ == "stage_finished" and not json_mode:
                        status = "ok" if fields.get("ok") else f"FAILED: {fields.get('reason')}"
                        print(f"{label}: {fields.get('stage')} {status}", file=sys.stderr)  # noqa: B023 - runs within this iteration
                # the same machine-wide device lock as a run: an eval never times beside a run's bench
                async with hold_async(lock_key, f"looptree eval {label} in {project}", on_wait=lambda who: print(
                        f"{label}: waiting for device lock {lock_key}, held by {who}",  # noqa: B023 - runs within this iteration
                        file=sys.stderr, flush=True)):
                    outcome = await evaluator.evaluate(node_id=f"eval{index}", project_dir=repo.project_in(wt),
                                                       node_dir=Path(tmp) / f"logs{index}", run_dir=Path(tmp),
                                                       job_tag=f"lt-eval-{index}", emit=emit, repeats=repeats,
                                                       device_env=device_env, device=devices[0] if devices else None)
            finally:
                await gitops.remove_worktree(repo, wt)
            specs = specs or outcome.specs
            results.append({"ref": label, "commit": commit, "ok": outcome.ok, "stage": outcome.stage,
                            "reason": outcome.reason,
                            "metrics": outcome.aggregate.values if outcome.aggregate else {},
                            "spread": outcome.aggregate.spread if outcome.aggregate else {}})
    if json_mode:
        print(json.dumps(results, indent=2))
    else:
        cols = [s.column for s in specs or []]
        print("\t".join(["ref", "commit", *cols]))
        for r in results:
            cells = [f"{r['metrics'][c]:.6g}" if c in r["metrics"] else "-" for c in cols]
            status = cells if r["ok"] else [f"FAILED at {r['stage']}: {r['reason']}"]
            print("\t".join([r["ref"], r["commit"][:10], *status]))
    return 0 if all(r["ok"] for r in results) else 1
