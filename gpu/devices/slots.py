"""Device slots: one benchmark per GPU at a time, handed out fairly.

Why: two benchmarks sharing a GPU both measure garbage. Every GPU stage therefore holds exactly
one device index for its whole duration (``async with slots.acquire("gpu", holder=node_id)``),
and runs with ``env_for(device)`` so CUDA inside the child process sees only that device. CPU
stages never wait for GPUs and run with no GPU visible at all.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Literal

from looptree.engine.errors import ConfigError, LooptreeError

SlotKind = Literal["gpu", "cpu"]


class NoGpuSlot(LooptreeError):
    """A GPU stage was asked for while no GPU is configured for benchmarks."""


def env_for(device: int | None) -> dict[str, str]:
    """Environment for a child process pinned to ``device`` (``None``: CPU-only, no GPU visible).

    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` makes CUDA number devices the way NVML (and
    ``looptree gpus``) does; CUDA's default "fastest first" order can differ.
    """
    if device is None:
        return {"CUDA_VISIBLE_DEVICES": ""}
    return {"CUDA_VISIBLE_DEVICES": str(int(device)), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def parse_devices(spec: object, backend: object | None = None) -> list[int]:
    """Resolve config ``gpu.devices`` to the device indices benchmarks may use.

    ``"auto"``: every device the telemetry backend sees (none without a GPU). ``"none"``: no
    GPU. A list of ints (or a string such as ``"0,2"`` from a KEY=VALUE override) is checked
    against the devices present. ``backend`` is a ``TelemetryBackend``; ``None`` means no GPU.
    """
    count = backend.device_count() if backend is not None else 0  # type: ignore[attr-defined]
    reason = getattr(backend, "reason", None) or "no GPU found"
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "auto":
            return list(range(count))
        if text in ("none", ""):
            return []
        try:
            spec = [int(part) for part in text.strip("[]").split(",") if part.strip()]
        except ValueError:
            raise ConfigError(
                f'gpu.devices = {spec!r}: expected "auto", "none" or a list of device indices'
            ) from None
    if not isinstance(spec, (list, tuple)):
        raise ConfigError(f'gpu.devices = {spec!r}: expected "auto", "none" or a list of device indices')
    devices: list[int] = []
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ConfigError(f"gpu.devices = {list(spec)!r}: {item!r} is not a device index (an int >= 0)")
        if item in devices:
            raise ConfigError(f"gpu.devices = {list(spec)!r}: device {item} is listed twice")
        devices.append(item)
    if devices and count == 0:
        raise ConfigError(f"gpu.devices = {devices!r} but there is no GPU ({reason})")
    bad = [d for d in devices if d >= count]
    if bad:
        raise ConfigError(
            f"gpu.devices = {devices!r}: no device {bad[0]}; this machine has {count} "
            f"(indices 0..{count - 1})"
        )
    return devices


class DeviceSlots:
    """Hands out free GPU indices, first come first served; CPU slots are free for all."""

    def __init__(self, devices: Sequence[int] | Literal["none"]) -> None:
        self.devices: list[int] = [] if devices == "none" else [int(d) for d in devices]
        self._free: list[int] = sorted(self.devices)
        self._holders: dict[int, str] = {}
        self._waiters: deque[tuple[asyncio.Future[int], str]] = deque()

    def busy(self) -> dict[int, str]:
        """Device → holder (e.g. node ID) of every device in use, for the dashboard."""
        return dict(self._holders)

    def waiting(self) -> list[str]:
        """Holders waiting for a GPU, in the order they will get one."""
        return [holder for fut, holder in self._waiters if not fut.done()]

    def free(self) -> list[int]:
        return list(self._free)

    @asynccontextmanager
    async def acquire(self, kind: SlotKind = "gpu", holder: str = "") -> AsyncIterator[int | None]:
        """Hold one device (``kind="gpu"``: yields its index) or none (``"cpu"``: yields None).

        Waits while every GPU is busy; waiters are served in arrival order. A waiter cancelled
        before or just after a device was handed to it gives that device back.
        """
        if kind == "cpu":
            yield None
            return
        if kind != "gpu":
            raise ValueError(f"slot kind must be 'gpu' or 'cpu', not {kind!r}")
        if not self.devices:
            raise NoGpuSlot('a GPU stage needs a device but gpu.devices is "none" (or no GPU was found)')
        device = await self._take(holder)
        try:
            yield device
        finally:
            self._release(device)

    async def _take(self, holder: str) -> int:
        if self._free and not any(not fut.done() for fut, _ in self._waiters):
            device = self._free.pop(0)
            self._holders[device] = holder
            return device
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        entry = (fut, holder)
        self._waiters.append(entry)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Handed a device in the same instant we were cancelled: pass it on.
                self._release(fut.result())
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
            raise

    def _release(self, device: int) -> None:
        self._holders.pop(device, None)
        while self._waiters:
            fut, holder = self._waiters.popleft()
            if fut.done():
                continue
            self._holders[device] = holder
            fut.set_result(device)
            return
        self._free.append(device)
        self._free.sort()
