"""Timing: the CPU path measures real durations, A/B interleaves, CUDA path on a GPU only."""

from __future__ import annotations

import time

import pytest

from looptree.gpu.bench.timing import TimingResult, interleaved_ab, resolve_device, time_callable
from looptree.gpu.devices.telemetry import NoGpu


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def test_cpu_sleep_of_2ms_measures_about_2ms() -> None:
    res = time_callable(lambda: time.sleep(0.002), warmup=1, trials=15, device="cpu", flush_l2=False)
    assert res.device == "cpu" and res.method == "cpu_perf_counter"
    assert len(res.times_ms) == 15
    assert 1.9 <= res.median <= 4.0, res.median
    assert res.min <= res.median <= res.max
    assert res.min >= 1.9


def test_flush_runs_outside_the_timed_region() -> None:
    # the flush writes 64 MiB before every trial; a no-op must still time as ~nothing
    res = time_callable(lambda: None, warmup=0, trials=3, device="cpu", flush_l2=True)
    assert res.max < 1.0, res.times_ms


def test_warmup_calls_are_not_timed() -> None:
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        if len(calls) <= 2:
            time.sleep(0.05)  # a slow first call (compilation, lazy init)

    res = time_callable(fn, warmup=2, trials=5, device="cpu", flush_l2=False)
    assert len(calls) == 7
    assert res.max < 20, res.times_ms


def test_summary_statistics() -> None:
    r = TimingResult.from_times([1.0, 2.0, 3.0, 10.0], "cpu", "cpu_perf_counter")
    assert (r.median, r.mean, r.min, r.max) == (2.5, 4.0, 1.0, 10.0)
    assert r.stdev == pytest.approx(4.0825, abs=1e-3)


def test_interleaved_ab_alternates_and_separates_speeds() -> None:
    order: list[str] = []

    def fa() -> None:
        order.append("A")
        time.sleep(0.001)

    def fb() -> None:
        order.append("B")
        time.sleep(0.004)

    a, b = interleaved_ab(fa, fb, 6, warmup=1, device="cpu", flush_l2=False)
    assert order[:2] == ["A", "B"]  # warm-up, once each
    assert order[2:] == ["A", "B"] * 6
    assert len(a.times_ms) == len(b.times_ms) == 6
    assert a.median < b.median


def test_device_resolution_without_cuda() -> None:
    if _cuda():
        pytest.skip("CUDA present")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(NoGpu):
        resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")


@pytest.mark.gpu
def test_cuda_side_stream_work_is_not_timed_as_just_the_launch() -> None:
    if not _cuda():
        pytest.skip("no CUDA")
    import torch

    x = torch.randn(4096, 4096, device="cuda")
    side = torch.cuda.Stream()

    def on_side_stream() -> None:
        with torch.cuda.stream(side):
            for _ in range(20):
                x @ x

    def on_current_stream() -> None:
        for _ in range(20):
            x @ x

    honest = time_callable(on_current_stream, warmup=2, trials=5, device="cuda")
    sneaky = time_callable(on_side_stream, warmup=2, trials=5, device="cuda")
    assert honest.method == "cuda_event"
    assert sneaky.method == "cuda_wall"
    assert sneaky.median > 0.5 * honest.median


# --------------------------------------------------------------------------- metrics CSV (gpu.report)


def test_metrics_csv_written_row_by_row(tmp_path) -> None:
    import csv

    from looptree.gpu.bench.report import MetricsWriter, metric_column, write_metrics_csv

    runtime = metric_column("runtime_ms", lower_is_better=True)
    speedup = metric_column("speedup_vs_eager", lower_is_better=False)
    assert (runtime, speedup) == ("runtime_ms (lower is better)", "speedup_vs_eager (higher is better)")
    path = tmp_path / "out" / "metrics.csv"
    with MetricsWriter(path, [runtime, speedup]) as w:
        w.append({runtime: 1.25, speedup: 2.0})
        # flushed already: a tailing reader sees the row before the writer closes
        assert path.read_text().splitlines() == ["iteration,runtime_ms (lower is better),speedup_vs_eager (higher is better)", "0,1.25,2.0"]
        w.append({runtime: 1.5, speedup: float("nan")})
    write_metrics_csv(path, [{runtime: 0.1, speedup: 3}], ["iteration", runtime, speedup])  # appends
    rows = list(csv.reader(path.open()))
    assert rows[1:] == [["0", "1.25", "2.0"], ["1", "1.5", "nan"], ["2", "0.1", "3"]]
    with pytest.raises(ValueError, match="lacks column"):
        write_metrics_csv(path, [{runtime: 1.0}], [runtime, speedup])
    with pytest.raises(ValueError, match="already has columns"):
        write_metrics_csv(path, [], ["other (lower is better)"])
