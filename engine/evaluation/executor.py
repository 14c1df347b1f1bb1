"""The executor seam: where a project command (build, check, bench) actually runs.

Why a seam: the evaluator decides *what* runs and what a result means (stage order, failure
reasons, the paired test, forged-metric evidence); an executor decides *where*. Today's path
(``LocalExecutor``) runs the command on this machine through ``engine.procs.run_command``; the
Ray executor (``cluster.ray_executor``) runs the very same call on a worker of a Ray cluster and
mirrors the log and the metrics file back here while the command runs, so the evaluator's live
CSV tail, its evidence record and the dashboard's live rows work unchanged.

The unit of placement is a *lease*: every stage of one node (its build, check and every bench
repeat, the parent's runs of an interleaved pair included) runs on the lease's one worker and
device, so a paired comparison compares like with like. Each lease names its worker the same
way on every backend (``worker_identity``): ``{"node", "host", "device", "uuid"}``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any, Protocol

from looptree.engine.evaluation.procs import ProcResult, kill_jobs_with_prefix, run_command

__all__ = ["Executor", "Lease", "LocalExecutor", "LocalLease", "device_identity", "worker_identity"]

Worker = dict[str, Any]
"""``{"node": <Ray node id or "local">, "host": <hostname>, "device": <GPU name or "cpu">,
"uuid": <GPU UUID or None>}`` — what every build/check/bench event names."""


def device_identity(device: int | None, telemetry: Any = None) -> tuple[str, str | None]:
    """(GPU name, UUID) of a device index on this host, or ("cpu", None).

    Read through the telemetry backend when one is given (never raises: a GPU whose name NVML
    cannot read is "gpu<N>"), else through NVML directly, else the index is all we know.
    """
    if device is None:
        return "cpu", None
    sample = None
    with contextlib.suppress(Exception):
        if telemetry is not None:
            sample = telemetry.sample(device)
    if sample is not None:
        return (getattr(sample, "name", None) or f"gpu{device}"), getattr(sample, "uuid", None) or None
    try:
        import pynvml  # nvidia-ml-py, a base dependency

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(device))
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            return (name.decode() if isinstance(name, bytes) else str(name),
                    uuid.decode() if isinstance(uuid, bytes) else str(uuid))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (no driver, no GPU): the index is all we know
        return f"gpu{device}", None


def worker_identity(node: str = "local", device: int | None = None, telemetry: Any = None,
                    host: str | None = None) -> Worker:
    """The ``worker`` field of stage events for a command run on ``host`` (default: this one)."""
    name, uuid = device_identity(device, telemetry)
    return {"node": node, "host": host or socket.gethostname(), "device": name, "uuid": uuid}


class Lease(Protocol):
    """One worker and device, held for every stage of one node."""

    worker: Worker

    async def run(self, command: str, **options: Any) -> ProcResult:
        """``engine.procs.run_command(command, **options)``, wherever the command runs.

        ``options["cwd"]`` is the engine's checkout of a *committed* tree; the log lands in
        ``options["log_path"]`` and the file ``env["LOOPTREE_METRICS"]`` names appears here as it
        grows. Cancellation kills the command's whole process tree where it runs.
        """
        ...


class Executor(Protocol):
    """Hands out leases; kills what a run left behind; says which workers it has."""

    name: str

    async def start(self, job_prefix: str) -> int:
        """Get ready for a run; first kill every process a dead engine of it left (resume)."""
        ...

    def lease(self, holder: str, device: int | None = None) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Hold one worker (and its device) for every stage of node ``holder``."""
        ...

    def workers(self) -> list[Worker]:
        """Every worker this executor runs commands on (for ``looptree gpus`` and the dashboard)."""
        ...

    async def close(self) -> None:
        """Kill whatever still runs (on every worker) and release the workers."""
        ...


class LocalLease:
    """A lease on this machine: ``run_command`` as it always was."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def run(self, command: str, **options: Any) -> ProcResult:
        return await run_command(command, **options)


class LocalExecutor:
    """Today's path: every command runs here, on the device the engine's slots handed out."""

    name = "local"

    def __init__(self, telemetry: Any = None) -> None:
        self.telemetry = telemetry
        self._prefix: str | None = None
        self._identities: dict[int | None, Worker] = {}

    def _identity(self, device: int | None) -> Worker:
        if device not in self._identities:  # one NVML look per device per run, not per stage
            self._identities[device] = worker_identity("local", device, self.telemetry)
        return dict(self._identities[device])

    async def start(self, job_prefix: str) -> int:
        import asyncio

        self._prefix = job_prefix
        return await asyncio.to_thread(kill_jobs_with_prefix, job_prefix)

    @contextlib.asynccontextmanager
    async def lease(self, holder: str, device: int | None = None) -> AsyncIterator[LocalLease]:
        yield LocalLease(self._identity(device))

    def workers(self) -> list[Worker]:
        return [self._identity(None)]

    async def close(self) -> None:
        import asyncio

        if self._prefix:
            await asyncio.to_thread(kill_jobs_with_prefix, self._prefix)
