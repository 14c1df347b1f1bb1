"""Timing a callable so the number means what users think it means.

Why each step:
- warm-up: the first calls pay for compilation, autotuning, allocator growth and lazy init.
- an L2 (or CPU cache) flush before every trial, outside the timed region: otherwise a kernel
  that re-reads the same inputs looks faster than it will be in a real model.
- on CUDA, events bracket the trial on the current stream, then the WHOLE device is
  synchronized; the host clock is read around the same span. Work launched on a side stream is
  invisible to the events but not to the device-wide sync, so when the host span is much longer
  than the event span we report the host span (``method="cuda_wall"``) instead of timing only
  the launch.
- ``interleaved_ab`` alternates A and B back to back so drift (clocks, thermals, neighbours)
  hits both equally; comparing two separately timed blocks confounds drift with speed.

- the clocks are taken when this module is imported (``perf_counter_ns``) and when
  ``capture_clocks()`` runs (CUDA events, ``synchronize``): a benchmark imports this module and
  calls ``capture_clocks`` before any candidate code, so a candidate that patches
  ``time.perf_counter_ns`` or ``torch.cuda.Event`` at import does not change what is measured.
- ``before``/``after`` hooks run outside the timed region of every call: the KernelBench bench
  makes fresh inputs there, checks the process state and spot-checks outputs.
- ``marker`` is called right before and right after each timed region: the bench writes these
  marks to a parent process, which keeps its own clock around each trial.

torch is optional: it is imported only when a CUDA device is asked for or found.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from looptree.engine.errors import NoGpu

# The clocks as they were when looptree imported this module (before any candidate code).
_perf_counter_ns = time.perf_counter_ns
_CUDA: dict[str, Any] = {}

# Side-stream guard: the host span may exceed the event span by launch/sync overhead only.
_WALL_SLACK_MS = 0.1
_WALL_SLACK_FRAC = 0.25
_CUDA_FLUSH_BYTES = 256 * 1024 * 1024
_CPU_FLUSH_BYTES = 64 * 1024 * 1024


@dataclass
class TimingResult:
    """Per-trial times in milliseconds plus their summary."""

    times_ms: list[float]
    median: float
    mean: float
    stdev: float
    min: float
    max: float
    device: str
    method: str  # "cpu_perf_counter" | "cuda_event" | "cuda_wall"
    note: str = ""
    wall_times_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_times(
        cls, times_ms: list[float], device: str, method: str, note: str = "", wall_times_ms: list[float] | None = None
    ) -> TimingResult:
        if not times_ms:
            raise ValueError("no timing trials")
        return cls(
            times_ms=list(times_ms),
            median=statistics.median(times_ms),
            mean=statistics.fmean(times_ms),
            stdev=statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0,
            min=min(times_ms),
            max=max(times_ms),
            device=device,
            method=method,
            note=note,
            wall_times_ms=list(wall_times_ms or []),
        )


def capture_clocks() -> None:
    """Keep torch's CUDA timing functions as they are now (call before importing candidate code)."""
    torch = _torch()
    if torch is None or _CUDA:
        return
    try:
        event = torch.cuda.Event
        _CUDA.update(event=event, record=event.record, elapsed=event.elapsed_time,
                     ev_sync=event.synchronize, sync=torch.cuda.synchronize, device=torch.cuda.device)
    except AttributeError:  # a CPU-only build without torch.cuda.Event
        pass


def _cuda(name: str) -> Any:
    if not _CUDA:
        capture_clocks()
    return _CUDA[name]


def _torch() -> Any | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def resolve_device(device: str | int = "auto") -> str:
    """``"auto"`` → ``"cuda:N"`` (current device) when torch sees CUDA, else ``"cpu"``."""
    if isinstance(device, int):
        device = f"cuda:{device}"
    if device == "cpu":
        return "cpu"
    torch = _torch()
    has_cuda = bool(torch is not None and torch.cuda.is_available())
    if device == "auto":
        return f"cuda:{torch.cuda.current_device()}" if has_cuda else "cpu"  # type: ignore[union-attr]
    if device == "cuda" or device.startswith("cuda:"):
        if not has_cuda:
            why = "torch is not installed" if torch is None else "torch.cuda.is_available() is False"
            raise NoGpu(f"timing on {device} was requested but {why}")
        return device if ":" in device else f"cuda:{torch.cuda.current_device()}"  # type: ignore[union-attr]
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


class _CpuTimer:
    """perf_counter_ns around each call; an optional cache flush by writing a large buffer."""

    method = "cpu_perf_counter"

    def __init__(self, flush: bool, flush_bytes: int = _CPU_FLUSH_BYTES) -> None:
        self._buf = None
        if flush:
            import numpy as np

            self._buf = np.zeros(flush_bytes // 8, dtype=np.float64)
        self._tick = 0.0
        self.marker: Callable[[str], None] | None = None

    def warm(self, fn: Callable[[], Any]) -> None:
        fn()

    def trial(self, fn: Callable[[], Any]) -> tuple[float, float]:
        if self._buf is not None:
            self._tick += 1.0
            self._buf.fill(self._tick)
        mark = self.marker
        if mark is not None:
            mark("B")
        t0 = _perf_counter_ns()
        fn()
        ms = (_perf_counter_ns() - t0) / 1e6
        if mark is not None:
            mark("E")
        return ms, ms


class _CudaTimer:
    """CUDA events on the current stream plus a device-wide sync and a host-clock cross-check."""

    method = "cuda_event"

    def __init__(self, device: str, flush: bool, sync: bool) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.sync = sync
        self._buf = None
        self.marker: Callable[[str], None] | None = None
        if flush:
            props = torch.cuda.get_device_properties(self.device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 0)
            nbytes = max(_CUDA_FLUSH_BYTES, 2 * l2)
            self._buf = torch.empty(nbytes // 4, dtype=torch.int32, device=self.device)

    def _sync(self) -> None:
        _cuda("sync")(self.device)

    def warm(self, fn: Callable[[], Any]) -> None:
        with _cuda("device")(self.device):
            fn()
        self._sync()

    def trial(self, fn: Callable[[], Any]) -> tuple[float, float]:
        event, record = _cuda("event"), _cuda("record")
        with _cuda("device")(self.device):
            if self._buf is not None:
                self._buf.zero_()
            self._sync()  # flush finished and device idle before the clock starts
            start = event(enable_timing=True)
            end = event(enable_timing=True)
            if self.marker is not None:
                self.marker("B")
            t0 = _perf_counter_ns()
            record(start)
            fn()
            record(end)
            if self.sync:
                self._sync()  # whole device: catches work launched on other streams
            else:
                _cuda("ev_sync")(end)
            wall = (_perf_counter_ns() - t0) / 1e6
            if self.marker is not None:
                self.marker("E")
            return float(_cuda("elapsed")(start, end)), wall


def _make_timer(device: str, flush_l2: bool, sync: bool) -> _CpuTimer | _CudaTimer:
    if device == "cpu":
        return _CpuTimer(flush_l2)
    return _CudaTimer(device, flush_l2, sync)


def _result(timer: _CpuTimer | _CudaTimer, device: str, events: list[float], walls: list[float]) -> TimingResult:
    if isinstance(timer, _CpuTimer):
        return TimingResult.from_times(events, device, timer.method)
    ev, wa = statistics.median(events), statistics.median(walls)
    if timer.sync and wa - ev > max(_WALL_SLACK_MS, _WALL_SLACK_FRAC * ev):
        note = (
            f"host time (median {wa:.3f} ms) far exceeds CUDA event time (median {ev:.3f} ms): "
            "work ran outside the current stream, so host times are reported"
        )
        return TimingResult.from_times(walls, device, "cuda_wall", note, walls)
    return TimingResult.from_times(events, device, timer.method, "", walls)


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    trials: int = 100,
    device: str | int = "auto",
    flush_l2: bool = True,
    sync: bool = True,
    discard_first: int = 0,
    before: Callable[[int], None] | None = None,
    after: Callable[[int], None] | None = None,
    marker: Callable[[str], None] | None = None,
) -> TimingResult:
    """Time ``fn()`` ``trials`` times after ``warmup`` calls; see the module doc for why.

    ``discard_first`` extra trials are run and dropped (KernelBench drops one). ``before(i)`` and
    ``after(i)`` run outside the timed region around trial ``i`` (0-based, discarded trials
    included; warm-up calls are not announced).
    """
    if trials < 1:
        raise ValueError("trials must be >= 1")
    dev = resolve_device(device)
    timer = _make_timer(dev, flush_l2, sync)
    for _ in range(max(0, warmup)):
        timer.warm(fn)
    timer.marker = marker
    events: list[float] = []
    walls: list[float] = []
    skip = max(0, discard_first)
    for i in range(trials + skip):
        if before is not None:
            before(i)
        ev, wa = timer.trial(fn)
        if after is not None:
            after(i)
        if i >= skip:
            events.append(ev)
            walls.append(wa)
    return _result(timer, dev, events, walls)


def interleaved_ab(
    fa: Callable[[], Any],
    fb: Callable[[], Any],
    trials: int,
    *,
    warmup: int = 3,
    device: str | int = "auto",
    flush_l2: bool = True,
    sync: bool = True,
) -> tuple[TimingResult, TimingResult]:
    """Time A and B alternately (A B A B …), ``trials`` each; returns (A's result, B's result)."""
    if trials < 1:
        raise ValueError("trials must be >= 1")
    dev = resolve_device(device)
    timer = _make_timer(dev, flush_l2, sync)
    for _ in range(max(0, warmup)):
        timer.warm(fa)
        timer.warm(fb)
    a_ev: list[float] = []
    a_wa: list[float] = []
    b_ev: list[float] = []
    b_wa: list[float] = []
    for _ in range(trials):
        ev, wa = timer.trial(fa)
        a_ev.append(ev)
        a_wa.append(wa)
        ev, wa = timer.trial(fb)
        b_ev.append(ev)
        b_wa.append(wa)
    return _result(timer, dev, a_ev, a_wa), _result(timer, dev, b_ev, b_wa)
