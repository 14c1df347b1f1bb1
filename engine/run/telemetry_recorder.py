"""GPU samples while the run lives: one per device per interval, naming the node benchmarking on it.

Why samples go to telemetry.jsonl and not the event log: one sample per device per second
would dwarf the run's events, and resume, attach and `tree` read the log (see `TelemetryLog`).
The fold still sees each sample, so the in-process state and the printers stay current.
"""

from __future__ import annotations

import asyncio
from typing import Any

from looptree.engine.core.events import TelemetryLog
from looptree.engine.run.context import RunContext
from looptree.gpu.devices.slots import DeviceSlots
from looptree.gpu.devices.telemetry import TelemetryBackend, sample_loop

#: A Ray run's GPUs are sampled on the workers, over the network: not more often than this.
CLUSTER_SAMPLE_INTERVAL_S = 5.0


class TelemetryRecorder:
    def __init__(self, ctx: RunContext, *, backend: TelemetryBackend, devices: list[int], slots: DeviceSlots,
                 remote: bool) -> None:
        self.ctx = ctx
        self.backend = backend
        self.devices = devices
        self.slots = slots
        self.remote = remote
        # A seam: tests inject a fake cluster sampler (no GPU, no Ray there). A Ray run's default
        # is engine.cluster.telemetry.sample_cluster.
        self.cluster_sampler: Any = None
        self.cluster_sample_interval = CLUSTER_SAMPLE_INTERVAL_S

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until `stop` is set; first say what can be sampled (`gpu_status`)."""
        ctx = self.ctx
        count = self.backend.device_count()
        ctx.emit("gpu_status", available=count > 0, devices=self.devices, backend=self.backend.name,
                 reason=None if count else (getattr(self.backend, "reason", None) or "no GPU"))
        cluster_sampler = self.cluster_sampler
        if cluster_sampler is None and self.remote:
            from looptree.engine.cluster.telemetry import sample_cluster as cluster_sampler
        if not count and cluster_sampler is None:
            return
        samples = TelemetryLog(ctx.run_dir)

        def on_sample(sample: Any) -> None:
            fields = sample.event_fields()
            fields["node"] = self.slots.busy().get(sample.index)
            ctx.state.apply(samples.append(sample.index, fields))

        def on_cluster_sample(device: str, fields: dict[str, Any]) -> None:
            ctx.state.apply(samples.append(device, fields))  # type: ignore[arg-type]  # "host:index"

        loops = []
        if count:
            loops.append(sample_loop(self.backend, ctx.config.gpu.sample_interval, on_sample, stop))
        if cluster_sampler is not None:
            from looptree.engine.cluster.telemetry import cluster_sample_loop

            interval = max(ctx.config.gpu.sample_interval, self.cluster_sample_interval)
            loops.append(cluster_sample_loop(cluster_sampler, interval, on_cluster_sample, stop))
        try:
            await asyncio.gather(*loops)
        finally:
            samples.close()
