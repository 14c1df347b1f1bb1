"""GPU telemetry: n/a handling through the driver seam, the no-GPU path, the sampling loop."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from looptree.engine.errors import ConfigError
from looptree.gpu.devices.telemetry import (
    DeviceSample,
    FakeBackend,
    FieldNotSupported,
    NoGpu,
    NoneBackend,
    TelemetryBackend,
    choose_backend,
    decode_throttle,
    format_gpus,
    sample_loop,
)


def _nvml_loadable() -> bool:
    try:
        choose_backend("nvml").close()
    except NoGpu:
        return False
    return True


def test_fake_sample_converts_raw_units() -> None:
    backend = FakeBackend(
        [
            {
                "name": "Fake A100",
                "util_pct": 87,
                "mem_used_mb": 1024,
                "mem_total_mb": 40960,
                "power_w": 251.5,
                "power_limit_w": 400,
                "temp_c": 61,
                "throttle_reasons": ["sw_power_cap", "hw_thermal"],
                "processes": [(4242, 512), (77, None)],
            }
        ]
    )
    assert isinstance(backend, TelemetryBackend)
    assert backend.device_count() == 1
    s = backend.sample(0)
    assert (s.name, s.util_pct, s.mem_used_mb, s.mem_total_mb) == ("Fake A100", 87.0, 1024.0, 40960.0)
    assert (s.power_w, s.power_limit_w, s.temp_c) == (251.5, 400.0, 61.0)
    assert s.throttle_reasons == ["sw_power_cap", "hw_thermal"]
    assert s.processes == [(4242, 512.0), (77, None)]
    assert s.uuid == "GPU-fake-0000" and s.pci_bus_id == "00000000:10:00.0"
    fields = s.event_fields()
    assert fields["util"] == 87.0 and fields["throttle"] == ["sw_power_cap", "hw_thermal"]
    assert fields["processes"] == [[4242, 512.0], [77, None]]


def test_unsupported_and_raising_fields_become_none_not_errors() -> None:
    backend = FakeBackend(
        [
            {
                "unsupported": ["power_w", "temp_c", "processes", "name"],
                "sm_clock_mhz": RuntimeError("GPU is lost"),
                "throttle_reasons": FieldNotSupported("throttle"),
            }
        ]
    )
    s = backend.sample(0)
    assert s.power_w is None and s.temp_c is None and s.processes is None and s.name is None
    assert s.sm_clock_mhz is None and s.throttle_reasons is None
    assert s.power_limit_w == 700.0 and s.mem_total_mb == 81559.0  # the rest still reads
    table = format_gpus(backend)
    row = table.splitlines()[2]
    assert "n/a / 700" in row and row.count("n/a") >= 5


def test_scripted_values_change_between_samples() -> None:
    readings = iter([10, 55, 99])
    backend = FakeBackend([{"util_pct": lambda: next(readings)}])
    assert [backend.sample(0).util_pct for _ in range(3)] == [10.0, 55.0, 99.0]


def test_sample_out_of_range_is_index_error() -> None:
    with pytest.raises(IndexError):
        FakeBackend([{}]).sample(1)


def test_decode_throttle_keeps_unknown_bits_visible() -> None:
    assert decode_throttle(0) == []
    assert decode_throttle(0x4 | 0x40) == ["sw_power_cap", "hw_thermal"]
    assert decode_throttle(0x1000) == ["0x1000"]


def test_auto_without_driver_gives_none_backend_with_reason() -> None:
    if _nvml_loadable():
        pytest.skip("this machine has an NVIDIA driver")
    backend = choose_backend("auto")
    assert isinstance(backend, NoneBackend)
    assert backend.device_count() == 0
    assert "libnvidia-ml.so" in backend.reason or "driver" in backend.reason
    assert format_gpus(backend) == f"no GPU: {backend.reason}"
    with pytest.raises(NoGpu) as err:
        choose_backend("nvml")
    assert str(err.value).startswith("no GPU: ")


def test_choose_backend_kinds() -> None:
    assert choose_backend("none").device_count() == 0
    assert choose_backend("fake").device_count() == 2
    with pytest.raises(ConfigError):
        choose_backend("cuda")


def test_telemetry_imports_without_torch() -> None:
    # torch is installed here, so check it is never loaded: users without it then import fine
    code = (
        "import sys\n"
        "import looptree.gpu.devices.telemetry, looptree.gpu.devices.slots, looptree.gpu, looptree.engine.evaluation.stats\n"
        "print('leaked' if 'torch' in sys.modules else 'ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


async def test_sample_loop_never_overlaps_and_survives_errors() -> None:
    active = 0
    peak = 0
    calls = 0
    lock = threading.Lock()

    def slow_util() -> float:
        nonlocal active, peak, calls
        with lock:
            active += 1
            peak = max(peak, active)
            calls += 1
            n = calls
        time.sleep(0.03)  # longer than the interval: a naive timer loop would overlap
        with lock:
            active -= 1
        if n == 2:
            raise RuntimeError("driver hiccup")  # becomes n/a for this field only
        return 50.0

    backend = FakeBackend([{"util_pct": slow_util}])
    got: list[DeviceSample] = []
    stop = asyncio.Event()

    async def emit(sample: DeviceSample) -> None:
        got.append(sample)
        if len(got) == 1:
            raise ValueError("consumer bug")  # logged, loop goes on
        if len(got) >= 5:
            stop.set()

    await asyncio.wait_for(sample_loop(backend, 0.01, emit, stop), timeout=5)
    assert peak == 1
    assert len(got) == 5
    assert got[1].util_pct is None and got[0].util_pct == 50.0


async def test_sample_loop_tolerates_a_raising_sample_and_sync_emit() -> None:
    class Flaky:
        name = "flaky"

        def __init__(self) -> None:
            self.n = 0

        def device_count(self) -> int:
            return 1

        def sample(self, index: int) -> DeviceSample:
            self.n += 1
            if self.n % 2 == 0:
                raise RuntimeError("boom")
            return DeviceSample(index=index, util_pct=float(self.n))

        def close(self) -> None:
            pass

    got: list[float | None] = []
    stop = asyncio.Event()

    def emit(sample: DeviceSample) -> None:
        got.append(sample.util_pct)
        if len(got) == 3:
            stop.set()

    await asyncio.wait_for(sample_loop(Flaky(), 0.001, emit, stop), timeout=5)
    assert got == [1.0, 3.0, 5.0]


async def test_sample_loop_keeps_its_interval() -> None:
    backend = FakeBackend([{}])
    stamps: list[float] = []
    stop = asyncio.Event()

    def emit(sample: DeviceSample) -> None:
        stamps.append(time.monotonic())
        if len(stamps) == 4:
            stop.set()

    await asyncio.wait_for(sample_loop(backend, 0.05, emit, stop), timeout=5)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert all(g >= 0.04 for g in gaps), gaps


def test_format_gpus_table_lists_every_device() -> None:
    table = format_gpus(FakeBackend([{"name": "Alpha"}, {"name": "Beta", "util_pct": 42}]))
    lines = table.splitlines()
    assert lines[0] == "fake: 2 GPUs"
    assert lines[1].split()[:3] == ["#", "name", "bus"]
    assert "Alpha" in lines[2] and "Beta" in lines[3] and "42%" in lines[3]


async def test_hung_sample_is_waited_for_not_started_twice() -> None:
    gate = threading.Event()
    active = 0
    peak = 0
    lock = threading.Lock()

    def util() -> float:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        gate.wait(timeout=5)  # the first query hangs until the test lets it go
        with lock:
            active -= 1
        return 1.0

    backend = FakeBackend([{"util_pct": util}])
    got: list[DeviceSample] = []
    stop = asyncio.Event()

    def emit(sample: DeviceSample) -> None:
        got.append(sample)
        if len(got) == 3:
            stop.set()

    task = asyncio.create_task(sample_loop(backend, 0.01, emit, stop, sample_timeout_s=0.02))
    await asyncio.sleep(0.2)  # several timed-out ticks pass while the query hangs
    assert got == [] and peak == 1
    gate.set()
    await asyncio.wait_for(task, timeout=5)
    assert peak == 1 and len(got) == 3
