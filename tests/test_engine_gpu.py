"""The engine on GPUs it is told about: device slots, CUDA env pinning and telemetry, end to end.

Why a fake backend and still a real run: what matters to a user — two benchmarks never share a
GPU, each child process sees only its own device, telemetry names the node on each device, and a
machine without a GPU neither blocks nor lies — lives in the engine's wiring of DeviceSlots,
env_for and the telemetry loop, not in those pieces alone. FakeBackend plays the NVML side; the
benchmarks are real processes that report the environment they were given.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from looptree.engine.core.config import Config, validate_config
from looptree.engine.core.events import read_events
from looptree.engine.errors import LooptreeError
from looptree.engine.run.control import append_control, make_command
from looptree.engine.run.engine import Engine
from looptree.gpu.devices.telemetry import FakeBackend, NoneBackend

SOLVER = "VALUE = 100\nSLEEP = 0.25\n# knob\n"
# Sleeps like a GPU kernel would, and says which devices CUDA would have seen.
BENCH = """\
import os
import time
import solver

time.sleep(solver.SLEEP)
print("CVD=" + repr(os.environ.get("CUDA_VISIBLE_DEVICES")), flush=True)
print("ORDER=" + repr(os.environ.get("CUDA_DEVICE_ORDER")), flush=True)
with open(os.environ.get("LOOPTREE_METRICS", "metrics.csv"), "w") as fh:
    fh.write("iteration,runtime_ms (lower is better)\\n")
    fh.write(f"0,{float(solver.VALUE)}\\n")
"""
NUM_SAMPLES = 5


def change(step: int) -> str:
    return (f"Lower VALUE by {step}.\n\nsolver.py\n<<<<<<< SEARCH\n# knob\n=======\nVALUE -= {step}\n# knob\n"
            ">>>>>>> REPLACE\n")


def record(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "node_id": None, "request_hash": None, "when": None, "request": None,
            "response": {"text": text, "usage": {"prompt_tokens": 100, "completion_tokens": 20},
                         "finish_reason": "stop", "model": "test-model"}}


def make_project(tmp_path: Path) -> tuple[Path, Path]:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "solver.py").write_text(SOLVER)
    (project / "bench.py").write_text(BENCH)
    ideas = [f"idea number {i}" for i in range(NUM_SAMPLES)]
    records = [record("ideas", json.dumps(ideas))] + [record("optimize", change(i + 1)) for i in range(NUM_SAMPLES)]
    cassette = tmp_path / "cassette.jsonl"  # outside the project: never shown to the agent
    cassette.write_text("".join(json.dumps(r) + "\n" for r in records))
    return project, cassette


def make_config(cassette: Path, **gpu_bench: Any) -> Config:
    return validate_config({
        "project": {"goal": "Lower runtime_ms.", "writable": ["solver.py"], "readonly": ["bench.py"]},
        "bench": {"command": f"{sys.executable} bench.py", "repeats": 1, "compare": "off", "timeout": 60,
                  "device": gpu_bench.pop("device", "auto")},
        "agent": {"provider": "replay", "cassette": str(cassette)},
        "search": {"num_samples": NUM_SAMPLES, "num_phases": 1, "num_workers": 8, "max_fix_attempts": 0,
                   "early_stop_patience": 0},
        "gpu": {"devices": gpu_bench.pop("devices", "auto"), "telemetry": "auto", "sample_interval": 0.05},
    })


def two_fake_gpus() -> FakeBackend:
    return FakeBackend([{"name": "Fake H100 A", "util_pct": 87, "mem_used_mb": 1234},
                        {"name": "Fake H100 B", "util_pct": 12, "mem_used_mb": 4321}])


async def run_to_end(engine: Engine, timeout: float = 60) -> list[dict[str, Any]]:
    task = asyncio.create_task(engine.run())
    try:
        reason = await asyncio.wait_for(asyncio.shield(task), timeout)
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    assert reason == "phases done"
    return list(read_events(engine.run_dir / "events.jsonl"))


def bench_intervals(events: list[dict[str, Any]]) -> dict[str, tuple[int, int, Any]]:
    """Node → (seq of bench start, seq of bench end, device) for candidate bench runs."""
    out: dict[str, tuple[int, int, Any]] = {}
    starts: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("stage") != "bench":
            continue
        if e["type"] == "stage_started":
            starts[e["id"]] = e
        elif e["type"] == "stage_finished":
            start = starts.pop(e["id"])
            out[e["id"]] = (start["seq"], e["seq"], start["device"])
    assert not starts, f"bench runs that never finished: {sorted(starts)}"
    return out


def seen_env(run_dir: Path, node_id: str) -> tuple[str, str]:
    """What the node's bench process printed about its CUDA environment."""
    lines = (run_dir / "nodes" / node_id / "bench.log").read_text().splitlines()
    cvd = next(line for line in lines if line.startswith("CVD="))[4:]
    order = next(line for line in lines if line.startswith("ORDER="))[6:]
    return cvd, order


async def test_two_gpus_one_bench_per_device_pinned_env_and_telemetry(tmp_path: Path) -> None:
    project, cassette = make_project(tmp_path)
    fake = two_fake_gpus()
    engine = await Engine.create(project, make_config(cassette), telemetry=fake)
    assert engine.gpu_devices == [0, 1]
    events = await run_to_end(engine)
    assert fake.driver.closed, "the engine must shut its telemetry backend down at the end of the run"
    run_dir = engine.run_dir

    intervals = bench_intervals(events)
    assert len(intervals) == 1 + NUM_SAMPLES
    # Never two benchmarks on one device at a time ...
    for device in (0, 1):
        spans = sorted((s, f, node) for node, (s, f, d) in intervals.items() if d == device)
        for (s1, f1, n1), (s2, f2, n2) in zip(spans, spans[1:]):
            assert f1 < s2, f"{n1} and {n2} benchmarked on GPU {device} at the same time"
    # ... both devices used, and at the same time (that is what two GPUs are for).
    assert {d for _, _, d in intervals.values()} == {0, 1}
    assert any(s1 < f2 and s2 < f1 for n1, (s1, f1, d1) in intervals.items()
               for n2, (s2, f2, d2) in intervals.items() if d1 != d2), "the two GPUs never ran in parallel"

    # Each evaluated node records the device it was timed on; its process saw only that device.
    evaluated = {e["id"]: e for e in events if e["type"] == "node_evaluated"}
    assert set(evaluated) == set(intervals)
    for node_id, e in evaluated.items():
        assert e["device"] == intervals[node_id][2]
        assert seen_env(run_dir, node_id) == (repr(str(e["device"])), repr("PCI_BUS_ID"))

    status = [e for e in events if e["type"] == "gpu_status"]
    assert len(status) == 1 and status[0]["available"] is True
    assert status[0]["devices"] == [0, 1] and status[0]["backend"] == "fake" and status[0]["reason"] is None

    # Telemetry: samples of both devices, naming the node that held the device when taken. They
    # live in telemetry.jsonl, so the event log (read by every fold) stays small.
    assert not [e for e in events if e["type"] == "gpu_sample"]
    samples = read_events(run_dir / "telemetry.jsonl")
    assert {e["device"] for e in samples} == {0, 1}
    assert {e["fields"]["util"] for e in samples if e["device"] == 0} == {87.0}
    assert {e["fields"]["mem_used"] for e in samples if e["device"] == 1} == {4321.0}
    named = [e for e in samples if e["fields"].get("node")]
    assert named, "no gpu_sample named the node benchmarking on its device"
    ts_of = {e["seq"]: e["ts"] for e in events}  # samples carry a time, not a place in the event log
    for e in named:
        start, end, device = intervals[e["fields"]["node"]]
        assert device == e["device"] and e["ts"] <= ts_of[end], e
    last_end = max(ts_of[f] for _, f, _ in intervals.values())
    assert all(e["fields"]["node"] is None for e in samples if e["ts"] > last_end)


async def test_gpu_devices_subset_keeps_every_bench_on_the_chosen_device(tmp_path: Path) -> None:
    project, cassette = make_project(tmp_path)
    (project / "solver.py").write_text(SOLVER.replace("0.25", "0.0"))
    engine = await Engine.create(project, make_config(cassette, devices=[1]), telemetry=two_fake_gpus())
    events = await run_to_end(engine)
    intervals = bench_intervals(events)
    assert {d for _, _, d in intervals.values()} == {1}
    spans = sorted((s, f) for s, f, _ in intervals.values())
    assert all(f1 < s2 for (_, f1), (s2, _) in zip(spans, spans[1:]))
    for node_id in intervals:
        assert seen_env(engine.run_dir, node_id) == ("'1'", "'PCI_BUS_ID'")


async def test_without_a_gpu_benches_run_on_cpu_with_no_device_visible(tmp_path: Path) -> None:
    project, cassette = make_project(tmp_path)
    (project / "solver.py").write_text(SOLVER.replace("0.25", "0.0"))
    reason = "no NVIDIA driver found (libnvidia-ml.so not loadable)"
    engine = await Engine.create(project, make_config(cassette), telemetry=NoneBackend(reason))
    assert engine.gpu_devices == []
    started = time.monotonic()
    events = await run_to_end(engine, timeout=30)
    assert time.monotonic() - started < 30

    status = [e for e in events if e["type"] == "gpu_status"]
    assert len(status) == 1
    assert (status[0]["available"], status[0]["reason"], status[0]["devices"]) == (False, reason, [])
    assert not [e for e in events if e["type"] == "gpu_sample"]
    assert not (engine.run_dir / "telemetry.jsonl").exists()
    intervals = bench_intervals(events)
    assert len(intervals) == 1 + NUM_SAMPLES and {d for _, _, d in intervals.values()} == {None}
    for node_id in intervals:
        assert seen_env(engine.run_dir, node_id)[0] == "''", "a CPU bench must see no GPU at all"
    assert {e["id"] for e in events if e["type"] == "node_evaluated"} == set(intervals)


async def test_bench_device_gpu_without_a_gpu_is_refused_at_start(tmp_path: Path) -> None:
    project, cassette = make_project(tmp_path)
    reason = "the NVIDIA driver is not loaded"
    with pytest.raises(LooptreeError) as info:
        await Engine.create(project, make_config(cassette, device="gpu"), telemetry=NoneBackend(reason))
    message = str(info.value)
    assert message == f"bench.device = 'gpu' but no GPU can be used: {reason}"


async def test_resume_uses_the_telemetry_backend_it_is_given(tmp_path: Path) -> None:
    project, cassette = make_project(tmp_path)
    engine = await Engine.create(project, make_config(cassette), telemetry=two_fake_gpus())
    append_control(engine.run_dir, make_command("stop"))  # stopped at once, to be resumed
    assert await engine.run() == "stopped by user"

    fake = two_fake_gpus()
    resumed = await Engine.reopen(engine.run_dir, telemetry=fake)
    assert resumed.telemetry is fake and resumed.gpu_devices == [0, 1]
    events = await run_to_end(resumed)
    assert [e for e in events if e["type"] == "gpu_status"][-1]["backend"] == "fake"
    evaluated = [e for e in events if e["type"] == "node_evaluated"]
    assert len(evaluated) == 1 + NUM_SAMPLES and {e["device"] for e in evaluated} <= {0, 1}


async def test_a_refused_start_leaves_no_run_behind(tmp_path: Path) -> None:
    project, cassette = make_project(tmp_path)
    with pytest.raises(LooptreeError):
        await Engine.create(project, make_config(cassette, device="gpu"), telemetry=NoneBackend("no driver"))
    runs = project / ".looptree" / "runs"
    leftovers = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    assert leftovers == [], f"a start that was refused left run directories {leftovers}"


@pytest.mark.gpu
async def test_real_gpus_through_nvml_when_present(tmp_path: Path) -> None:
    """The same run on whatever NVML sees (skipped on machines without an NVIDIA GPU)."""
    from looptree.gpu.devices.telemetry import choose_backend

    backend = choose_backend("auto")
    if backend.device_count() == 0:
        pytest.skip(f"no GPU: {getattr(backend, 'reason', 'none found')}")
    project, cassette = make_project(tmp_path)
    engine = await Engine.create(project, make_config(cassette), telemetry=backend)
    events = await run_to_end(engine)
    status = [e for e in events if e["type"] == "gpu_status"][-1]
    assert status["available"] is True and status["backend"] == "nvml"
    for e in (e for e in events if e["type"] == "node_evaluated"):
        assert e["device"] in status["devices"]
        assert seen_env(engine.run_dir, e["id"]) == (repr(str(e["device"])), repr("PCI_BUS_ID"))
    samples = read_events(engine.run_dir / "telemetry.jsonl")
    assert samples and all((e["fields"]["mem_total"] or 0) > 0 for e in samples)
