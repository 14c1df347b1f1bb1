"""Which executor runs a run's stages: the local one, or Ray workers (`cluster.backend`).

Why here and not beside the seam: the seam (`engine/evaluation/executor.py`) sits below the
cluster package in the layers; choosing between them is the cluster's business.
"""

from __future__ import annotations

from typing import Any

from looptree.engine.evaluation.executor import Executor, LocalExecutor


def make_executor(config: Any, *, telemetry: Any = None, sandbox: Any = None,
                  say: Any = None) -> Executor:
    """The executor ``cluster.backend`` names (Ray is imported only when asked for)."""
    if config.cluster.backend == "ray":
        from looptree.engine.cluster.ray_executor import RayExecutor

        return RayExecutor(config.cluster, sandbox=sandbox, say=say)
    return LocalExecutor(telemetry)
