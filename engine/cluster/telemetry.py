"""What GPUs a Ray cluster has, sampled on its nodes (``looptree gpus DIR`` for a Ray project).

Why on the nodes: NVML only sees the devices of the machine it runs on, so a zero-CPU Ray task
pinned to each alive node samples there (``gpu.telemetry.choose_backend``) and sends the readings
back; nothing but Ray has to reach the workers.
"""

from __future__ import annotations

import socket
from typing import Any

from looptree.engine.cluster.ray_executor import CALL_TIMEOUT_S, _ray
from looptree.engine.errors import LooptreeError

__all__ = ["cluster_gpus", "format_cluster_gpus"]


def _sample_node() -> dict[str, Any]:
    """Runs on one node: its host name, its NVML table (or the one-line reason there is none)."""
    from looptree.gpu.telemetry import choose_backend, format_gpus

    backend = choose_backend("auto")
    try:
        samples = []
        for i in range(backend.device_count()):
            try:
                s = backend.sample(i)
                samples.append({"index": i, "name": s.name, "uuid": s.uuid, "util_pct": s.util_pct,
                                "mem_used_mb": s.mem_used_mb, "mem_total_mb": s.mem_total_mb})
            except Exception as exc:  # noqa: BLE001 - one device's failure is shown in its row
                samples.append({"index": i, "error": str(exc)})
        return {"host": socket.gethostname(), "table": format_gpus(backend), "devices": samples}
    finally:
        backend.close()


def cluster_gpus(address: str = "") -> list[dict[str, Any]]:
    """Per alive node: ``{"node", "host", "table", "devices"}``. Connects (and disconnects) when needed."""
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    owns = not ray.is_initialized()
    if owns:
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - one line for the user, not Ray's traceback
            raise LooptreeError(f"cannot reach the Ray cluster at {address or 'auto'}: "
                                f"{str(exc).strip().splitlines()[0][:200]}") from None
    try:
        task = ray.remote(num_cpus=0)(_sample_node)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in nodes]
        out = []
        for node, ref in zip(nodes, refs):
            try:
                found = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a node that cannot answer is listed as such
                found = {"host": node.get("NodeManagerHostname", "?"), "devices": [],
                         "table": f"no answer: {str(exc).strip().splitlines()[0][:200]}"}
            out.append({"node": node["NodeID"], **found})
        return out
    finally:
        if owns:
            ray.shutdown()


def format_cluster_gpus(nodes: list[dict[str, Any]]) -> str:
    """One block per node: ``<host> (node <id>)`` and what NVML sees there."""
    blocks = [f"{n['host']} (node {n['node'][:12]})\n{n['table']}" for n in nodes]
    return "\n\n".join(blocks) if blocks else "the Ray cluster has no alive node"
