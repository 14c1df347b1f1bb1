"""What GPUs a Ray cluster has, sampled on its nodes (``looptree gpus DIR`` for a Ray project, and
the dashboard's GPU panel during a Ray run: ``sample_cluster`` and ``cluster_sample_loop``).

Why on the nodes: NVML only sees the devices of the machine it runs on, so a zero-CPU Ray task
pinned to each alive node samples there (``gpu.telemetry.choose_backend``) and sends the readings
back; nothing but Ray has to reach the workers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from looptree.engine.cluster.ray_executor import CALL_TIMEOUT_S, _ray
from looptree.engine.errors import LooptreeError
from looptree.gpu.devices.telemetry import poll_in_thread

__all__ = ["cluster_gpus", "format_cluster_gpus", "sample_cluster", "cluster_sample_loop", "cluster_device_samples"]

log = logging.getLogger(__name__)


def _sample_node() -> dict[str, Any]:
    """Runs on one node: its host name, its NVML table (or the one-line reason there is none)."""
    from looptree.gpu.devices.telemetry import choose_backend, format_gpus

    backend = choose_backend("auto")
    try:
        samples = []
        for i in range(backend.device_count()):
            try:
                s = backend.sample(i)
                samples.append({"index": i, "name": s.name, "uuid": s.uuid, "util_pct": s.util_pct,
                                "mem_used_mb": s.mem_used_mb, "mem_total_mb": s.mem_total_mb,
                                "fields": s.event_fields()})
            except Exception as exc:  # noqa: BLE001 - one device's failure is shown in its row
                samples.append({"index": i, "error": str(exc)})
        return {"host": socket.gethostname(), "table": format_gpus(backend), "devices": samples}
    finally:
        backend.close()


def cluster_gpus(address: str = "") -> list[dict[str, Any]]:
    """Per alive node: ``{"node", "host", "table", "devices"}``. Connects (and disconnects) when needed."""
    ray = _ray()

    owns = not ray.is_initialized()
    if owns:
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as exc:  # noqa: BLE001 - one line for the user, not Ray's traceback
            raise LooptreeError(f"cannot reach the Ray cluster at {address or 'auto'}: "
                                f"{str(exc).strip().splitlines()[0][:200]}") from None
    try:
        nodes, refs = _sample_every_node(ray)
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


def _sample_every_node(ray: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """The alive nodes, and one `_sample_node` task pinned to each (their object refs, in order)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(_sample_node)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    return nodes, refs


def format_cluster_gpus(nodes: list[dict[str, Any]]) -> str:
    """One block per node: ``<host> (node <id>)`` and what NVML sees there."""
    blocks = [f"{n['host']} (node {n['node'][:12]})\n{n['table']}" for n in nodes]
    return "\n\n".join(blocks) if blocks else "the Ray cluster has no alive node"


def sample_cluster() -> list[dict[str, Any]]:
    """One sample of every GPU of the cluster this process is connected to (the Ray executor's
    connection; none: no samples). Blocking: the engine calls it in a thread, with a timeout."""
    ray = _ray()
    if not ray.is_initialized():
        return []
    nodes, refs = _sample_every_node(ray)
    out = []
    for node, ref in zip(nodes, refs):
        try:
            out.append({"node": node["NodeID"], **ray.get(ref, timeout=CALL_TIMEOUT_S)})
        except Exception:  # noqa: BLE001 - a node that cannot answer now may next time
            ray.cancel(ref, force=True)
    return cluster_device_samples(out)


def cluster_device_samples(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-node answers -> ``{"device": "host:index", "fields": {..., "host", "uuid"}}``, one per GPU
    (the shape of a telemetry.jsonl sample; the host keeps devices of different nodes apart)."""
    out = []
    for node in nodes:
        host = str(node.get("host") or "?")
        for d in node.get("devices") or []:
            if "fields" not in d:
                continue  # a device NVML could not read there: `looptree gpus` names why
            fields = {**d["fields"], "host": host, "uuid": d.get("uuid"), "name": d.get("name")}
            out.append({"device": f"{host}:{d['index']}", "fields": fields})
    return out


async def cluster_sample_loop(sampler: Callable[[], list[dict[str, Any]]], interval_s: float,
                              emit: Callable[[str, dict[str, Any]], None], stop: asyncio.Event,
                              *, timeout_s: float | None = None) -> None:
    """Call ``sampler`` (blocking: in a thread) every ``interval_s`` until ``stop``; emit each sample.

    The same loop as the local NVML sampling (`poll_in_thread`): a hung node never piles up
    threads, a failing round is logged and skipped.
    """
    await poll_in_thread(sampler, interval_s, lambda sample: emit(str(sample["device"]), dict(sample["fields"])),
                         stop, timeout_s=timeout_s if timeout_s is not None else max(interval_s * 2, 10.0),
                         what="cluster GPU sampling")
