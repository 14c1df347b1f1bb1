"""A Ray run's GPUs in telemetry.jsonl and the dashboard's GPU panel, tested by construction.

There is no GPU and no Ray cluster here, so a FAKE cluster sampler (a plain function returning
what ``engine.cluster.telemetry.sample_cluster`` returns: one sample per worker GPU, named
"host:index") is injected into a real engine run; the panel is driven with such samples written
by the real ``TelemetryLog``."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from fixtures.dash_pilot import live_app, make_run, ready
from test_engine_gpu import make_config, make_project, run_to_end
from textual.widgets import Static

from looptree.engine.cluster.telemetry import cluster_device_samples, cluster_sample_loop
from looptree.engine.core.events import RunLock, TelemetryLog, read_events
from looptree.engine.run.engine import Engine
from looptree.gpu.devices.telemetry import NoneBackend


def fake_cluster() -> list[dict[str, Any]]:
    """FAKE: what two worker nodes (host-a with two GPUs, host-b with one) would answer."""
    def device(i: int, util: int) -> dict[str, Any]:
        return {"index": i, "name": "Fake H100", "uuid": f"GPU-fake-{util}", "fields": {
            "util": util, "mem_used": 100, "mem_total": 80000, "power_w": 300, "temp_c": 60, "sm_clock": 1980,
            "mem_clock": 2619, "throttle": [], "processes": []}}
    return cluster_device_samples([
        {"node": "n1", "host": "host-a", "devices": [device(0, 91), device(1, 12)]},
        {"node": "n2", "host": "host-b", "devices": [device(0, 55), {"index": 1, "error": "NVML: GPU is lost"}]},
    ])


def test_node_answers_become_host_named_samples() -> None:
    samples = fake_cluster()
    assert [s["device"] for s in samples] == ["host-a:0", "host-a:1", "host-b:0"]  # the lost GPU is skipped
    assert samples[2]["fields"]["host"] == "host-b" and samples[2]["fields"]["uuid"] == "GPU-fake-55"


async def test_the_engine_writes_the_cluster_gpus_to_telemetry(tmp_path: Path) -> None:
    project, cassette = make_project(tmp_path)
    engine = await Engine.create(project, make_config(cassette), telemetry=NoneBackend("no GPU on this machine"))
    calls: list[str] = []

    def sampler() -> list[dict[str, Any]]:
        calls.append(threading.current_thread().name)
        return fake_cluster()

    engine.telemetry_recorder.cluster_sampler = sampler  # the seam: a Ray run's default is sample_cluster
    engine.telemetry_recorder.cluster_sample_interval = 0.05
    await run_to_end(engine)
    samples = list(read_events(engine.run_dir / "telemetry.jsonl"))
    devices = {s["device"] for s in samples}
    assert devices == {"host-a:0", "host-a:1", "host-b:0"}
    first = next(s for s in samples if s["device"] == "host-a:0")
    assert first["fields"]["host"] == "host-a" and first["fields"]["uuid"] == "GPU-fake-91"
    assert first["fields"]["util"] == 91
    assert calls and all(name != threading.main_thread().name for name in calls)  # never on the event loop


async def test_a_hung_sampler_never_blocks_the_loop_and_is_not_started_twice() -> None:
    started: list[float] = []
    release = threading.Event()

    def hung() -> list[dict[str, Any]]:
        started.append(time.monotonic())
        release.wait(5)
        return fake_cluster()

    stop = asyncio.Event()
    got: list[str] = []
    loop_task = asyncio.create_task(cluster_sample_loop(hung, 0.02, lambda d, f: got.append(d), stop, timeout_s=0.05))
    ticks = 0
    for _ in range(20):  # the event loop keeps turning while the sampler hangs
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 20 and len(started) == 1 and not got
    release.set()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if got:
            break
    stop.set()
    await asyncio.wait_for(loop_task, 2)
    assert got[:3] == ["host-a:0", "host-a:1", "host-b:0"]


async def test_the_gpu_panel_shows_cluster_gpus_with_their_host(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, gpus=0)  # the engine's machine has no GPU; the workers do
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        async with live_app(run_dir).run_test(size=(160, 50)) as pilot:
            await ready(pilot)
            pilot.app.query_one("#panels").active = "tab-gpu"
            await pilot.pause()
            table = pilot.app.query_one("#gpu-table")
            log = TelemetryLog(run_dir)  # what the engine's telemetry loop writes for a Ray run
            try:
                for _ in range(30):  # a round every few tenths of a second, as a live run's loop would
                    for sample in fake_cluster():
                        log.append(sample["device"], sample["fields"])
                    await pilot.pause(0.3)
                    if table.row_count == 3:
                        break
            finally:
                log.close()
            assert table.display is True and table.row_count == 3
            assert pilot.app.query_one("#gpu-none", Static).display is False
            assert table.get_cell("gpuhost-b:0", "gpu") == "host-b:0"
            assert table.get_cell("gpuhost-a:1", "util") == "12"
            assert table.get_cell("gpuhost-a:0", "node") == "idle"
    finally:
        lock.release()


def test_a_sample_naming_its_host_is_shown_with_it_and_fits_its_column() -> None:
    from looptree.app.widgets.gpu import GPU_COLUMNS, gpu_cells

    assert gpu_cells(0, {"host": "host-a", "util": 5}, None)["gpu"] == "host-a:0"  # host in fields only
    assert gpu_cells("host-a:0", {"host": "host-a"}, None)["gpu"] == "host-a:0"  # not twice
    assert gpu_cells(1, {"util": 5}, "1.2")["gpu"] == "1"  # a local GPU stays an index
    width = dict((key, w) for key, _, w in GPU_COLUMNS)["gpu"]
    assert width >= len("gpu-node-17:7")  # a cluster host:index is not cut to "gpu-"
