"""GPU side of looptree: telemetry, device slots, timing, correctness and metrics helpers.

Importing ``gpu`` never imports torch (plain-Python projects do not have it) nor the UI; the
timing and correctness helpers load torch only when a tensor or a CUDA device is involved.
"""

from looptree.gpu.correctness import CorrectnessReport, check_outputs, default_tolerance
from looptree.gpu.report import MetricsWriter, metric_column, write_metrics_csv
from looptree.gpu.slots import DeviceSlots, NoGpuSlot, env_for, parse_devices
from looptree.gpu.telemetry import (
    DeviceSample,
    FakeBackend,
    NoGpu,
    NoneBackend,
    NvmlBackend,
    TelemetryBackend,
    choose_backend,
    format_gpus,
    sample_loop,
)
from looptree.gpu.timing import TimingResult, interleaved_ab, time_callable

__all__ = [
    "CorrectnessReport",
    "DeviceSample",
    "DeviceSlots",
    "FakeBackend",
    "MetricsWriter",
    "NoGpu",
    "NoGpuSlot",
    "NoneBackend",
    "NvmlBackend",
    "TelemetryBackend",
    "TimingResult",
    "check_outputs",
    "choose_backend",
    "default_tolerance",
    "env_for",
    "format_gpus",
    "interleaved_ab",
    "metric_column",
    "parse_devices",
    "sample_loop",
    "time_callable",
    "write_metrics_csv",
]
