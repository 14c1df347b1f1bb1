"""Device slots: exclusive GPUs, FIFO, CPU never waits, cancellation never leaks a device."""

from __future__ import annotations

import asyncio

import pytest

from looptree.engine.errors import ConfigError
from looptree.gpu.devices.slots import DeviceSlots, NoGpuSlot, env_for, parse_devices
from looptree.gpu.devices.telemetry import FakeBackend, NoneBackend


async def test_concurrent_holders_never_share_a_gpu() -> None:
    slots = DeviceSlots([0, 1])
    in_use: set[int] = set()
    seen: list[int] = []
    peak = 0

    async def job(n: int) -> None:
        nonlocal peak
        async with slots.acquire("gpu", holder=f"n{n}") as dev:
            assert dev not in in_use, f"device {dev} handed out twice"
            in_use.add(dev)
            peak = max(peak, len(in_use))
            seen.append(dev)
            assert slots.busy()[dev] == f"n{n}"
            await asyncio.sleep(0.001 * (n % 3))
            in_use.discard(dev)

    await asyncio.wait_for(asyncio.gather(*(job(n) for n in range(30))), timeout=5)
    assert peak == 2
    assert set(seen) == {0, 1} and len(seen) == 30
    assert slots.busy() == {} and slots.free() == [0, 1]


async def test_waiters_are_served_in_arrival_order() -> None:
    slots = DeviceSlots([3])
    order: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with slots.acquire("gpu", holder="first"):
            await release.wait()

    async def waiter(name: str) -> None:
        async with slots.acquire("gpu", holder=name) as dev:
            assert dev == 3
            order.append(name)

    t0 = asyncio.create_task(first())
    await asyncio.sleep(0)
    tasks = []
    for name in ["a", "b", "c", "d"]:
        tasks.append(asyncio.create_task(waiter(name)))
        await asyncio.sleep(0)
    assert slots.waiting() == ["a", "b", "c", "d"]
    assert slots.busy() == {3: "first"}
    release.set()
    await asyncio.wait_for(asyncio.gather(t0, *tasks), timeout=5)
    assert order == ["a", "b", "c", "d"]


async def test_cpu_never_waits_for_busy_gpus() -> None:
    slots = DeviceSlots([0])
    async with slots.acquire("gpu", holder="gpu-job"):
        async with asyncio.timeout(0.5):
            async with slots.acquire("cpu", holder="cpu-job") as dev:
                assert dev is None
        assert slots.busy() == {0: "gpu-job"}


async def test_cpu_works_without_any_gpu_but_gpu_is_refused() -> None:
    slots = DeviceSlots("none")
    async with slots.acquire("cpu") as dev:
        assert dev is None
    with pytest.raises(NoGpuSlot):
        async with slots.acquire("gpu"):
            pass


async def test_cancelled_waiter_does_not_leak_the_slot() -> None:
    slots = DeviceSlots([0])
    release = asyncio.Event()

    async def holder() -> None:
        async with slots.acquire("gpu", holder="h"):
            await release.wait()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    w = asyncio.create_task(_hold(slots, "w"))
    await asyncio.sleep(0)
    assert slots.waiting() == ["w"]
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert slots.waiting() == []
    release.set()
    await h
    assert slots.free() == [0]
    async with asyncio.timeout(1):
        async with slots.acquire("gpu", holder="later") as dev:
            assert dev == 0


async def test_cancel_right_after_handoff_passes_the_device_on() -> None:
    slots = DeviceSlots([0])
    release = asyncio.Event()

    tasks: dict[str, asyncio.Task[int]] = {}

    async def holder() -> None:
        async with slots.acquire("gpu", holder="h"):
            await release.wait()
        # the release just handed device 0 to w1's future; w1 has not run since
        assert slots.busy() == {0: "w1"}
        tasks["w1"].cancel()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks["w1"] = w1 = asyncio.create_task(_hold(slots, "w1"))
    w2 = asyncio.create_task(_hold(slots, "w2"))
    await asyncio.sleep(0)
    release.set()
    await h
    with pytest.raises(asyncio.CancelledError):
        await w1
    assert await asyncio.wait_for(w2, timeout=1) == 0
    assert slots.free() == [0] and slots.busy() == {}


async def test_cancelling_a_holder_releases_its_device() -> None:
    slots = DeviceSlots([0])
    started = asyncio.Event()

    async def long_job() -> None:
        async with slots.acquire("gpu", holder="long"):
            started.set()
            await asyncio.sleep(60)

    t = asyncio.create_task(long_job())
    await started.wait()
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert slots.busy() == {} and slots.free() == [0]


async def _hold(slots: DeviceSlots, name: str) -> int:
    async with slots.acquire("gpu", holder=name) as dev:
        return dev


def test_env_for() -> None:
    assert env_for(2) == {"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert env_for(None) == {"CUDA_VISIBLE_DEVICES": ""}


def test_parse_devices() -> None:
    two = FakeBackend([{}, {}])
    none = NoneBackend("no NVIDIA driver found (libnvidia-ml.so not loadable)")
    assert parse_devices("auto", two) == [0, 1]
    assert parse_devices("auto", none) == []
    assert parse_devices("none", two) == []
    assert parse_devices([1], two) == [1]
    assert parse_devices("0,1", two) == [0, 1]
    with pytest.raises(ConfigError, match="no device 2; this machine has 2"):
        parse_devices([0, 2], two)
    with pytest.raises(ConfigError, match="no GPU .*libnvidia-ml"):
        parse_devices([0], none)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_devices([1, 1], two)
    for bad in ([True], [-1], ["x"], "most", 3.5):
        with pytest.raises(ConfigError):
            parse_devices(bad, two)
