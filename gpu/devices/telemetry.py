"""GPU telemetry: what each device is doing, sampled without ever crashing the caller.

Why a "driver" seam: every NVML query can fail on its own (a field a GPU or driver does not
support, a permission, a lost device). The backend turns each failure into ``None`` ("n/a" on
screen) one field at a time. That logic lives in ``DriverBackend`` and talks to a small driver
object that returns raw NVML units; ``NvmlDriver`` wraps ``pynvml`` and ``FakeDriver`` plays
scripted values, so the tests exercise exactly the n/a path a real GPU takes.

torch is never imported here; ``pynvml`` (from the ``nvidia-ml-py`` distribution) is imported
only when an NVML backend is asked for.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from looptree.engine.errors import ConfigError, NoGpu  # NoGpu: re-exported for callers

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# NVML "clocks event" (formerly "throttle") reason bits and the words we show for them.
THROTTLE_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "app_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
    0x200: "board_limit",
    0x400: "reliability",
}


class FieldNotSupported(Exception):
    """What ``FakeDriver`` raises for a field scripted as unsupported (NVML's NotSupported)."""


def decode_throttle(mask: int) -> list[str]:
    """Bitmask → sorted reason words; unknown bits are shown as hex so nothing is hidden."""
    words = [word for bit, word in sorted(THROTTLE_BITS.items()) if mask & bit]
    unknown = mask & ~sum(THROTTLE_BITS)
    if unknown:
        words.append(f"0x{unknown:x}")
    return words


def encode_throttle(words: list[str]) -> int:
    """Reason words → bitmask (the fake driver speaks NVML's raw units)."""
    by_word = {w: b for b, w in THROTTLE_BITS.items()}
    mask = 0
    for w in words:
        if w not in by_word:
            raise ValueError(f"unknown throttle reason {w!r}; known: {sorted(by_word)}")
        mask |= by_word[w]
    return mask


@dataclass
class DeviceSample:
    """One reading of one device. Any field the driver cannot give is ``None``."""

    index: int
    name: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    util_pct: float | None = None
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    temp_c: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    throttle_reasons: list[str] | None = field(default_factory=list)
    processes: list[tuple[int, float | None]] | None = field(default_factory=list)
    ts: float = 0.0

    def event_fields(self) -> dict[str, Any]:
        """The ``fields`` object of a ``gpu_sample`` event (see docs/ARCHITECTURE.md)."""
        return {
            "util": self.util_pct,
            "mem_used": self.mem_used_mb,
            "mem_total": self.mem_total_mb,
            "power_w": self.power_w,
            "temp_c": self.temp_c,
            "sm_clock": self.sm_clock_mhz,
            "mem_clock": self.mem_clock_mhz,
            "throttle": None if self.throttle_reasons is None else list(self.throttle_reasons),
            "processes": None
            if self.processes is None
            else [[pid, used] for pid, used in self.processes],
        }


@runtime_checkable
class TelemetryBackend(Protocol):
    """What the engine, the dashboard and ``looptree gpus`` read devices through."""

    name: str

    def device_count(self) -> int: ...

    def sample(self, index: int) -> DeviceSample: ...

    def close(self) -> None: ...


class Driver(Protocol):
    """Raw per-field queries in NVML units (bytes, milliwatts). Any of them may raise."""

    def count(self) -> int: ...
    def name(self, i: int) -> str: ...
    def uuid(self, i: int) -> str: ...
    def pci_bus_id(self, i: int) -> str: ...
    def utilization_pct(self, i: int) -> float: ...
    def memory_bytes(self, i: int) -> tuple[int, int]: ...
    def power_mw(self, i: int) -> float: ...
    def power_limit_mw(self, i: int) -> float: ...
    def temperature_c(self, i: int) -> float: ...
    def sm_clock_mhz(self, i: int) -> float: ...
    def mem_clock_mhz(self, i: int) -> float: ...
    def throttle_mask(self, i: int) -> int: ...
    def processes(self, i: int) -> list[tuple[int, int | None]]: ...
    def shutdown(self) -> None: ...


def _guard(query: Callable[[], Any], what: str, index: int) -> Any:
    """Run one query; a failure of any kind becomes ``None`` (n/a), never an exception."""
    try:
        return query()
    except Exception as exc:  # noqa: BLE001 - every driver failure is "n/a" for one field
        log.debug("gpu %d: %s n/a (%s: %s)", index, what, type(exc).__name__, exc)
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class DriverBackend:
    """Turns a driver's raw, failure-prone answers into ``DeviceSample``s (the n/a logic)."""

    def __init__(self, driver: Driver, name: str) -> None:
        self.name = name
        self._driver = driver
        self._count = int(driver.count())

    def device_count(self) -> int:
        return self._count

    def sample(self, index: int) -> DeviceSample:
        if not 0 <= index < self._count:
            raise IndexError(f"GPU index {index} out of range (0..{self._count - 1})")
        d, i = self._driver, index
        mem = _guard(lambda: d.memory_bytes(i), "memory", i)
        power = _guard(lambda: d.power_mw(i), "power", i)
        limit = _guard(lambda: d.power_limit_mw(i), "power limit", i)
        mask = _guard(lambda: d.throttle_mask(i), "throttle reasons", i)
        procs = _guard(lambda: d.processes(i), "processes", i)
        name = _guard(lambda: d.name(i), "name", i)
        uuid = _guard(lambda: d.uuid(i), "uuid", i)
        bus = _guard(lambda: d.pci_bus_id(i), "pci bus id", i)
        return DeviceSample(
            index=i,
            name=None if name is None else _text(name),
            uuid=None if uuid is None else _text(uuid),
            pci_bus_id=None if bus is None else _text(bus),
            util_pct=_num(_guard(lambda: d.utilization_pct(i), "utilization", i)),
            mem_used_mb=None if mem is None else round(mem[0] / MIB, 1),
            mem_total_mb=None if mem is None else round(mem[1] / MIB, 1),
            power_w=None if power is None else round(power / 1000.0, 1),
            power_limit_w=None if limit is None else round(limit / 1000.0, 1),
            temp_c=_num(_guard(lambda: d.temperature_c(i), "temperature", i)),
            sm_clock_mhz=_num(_guard(lambda: d.sm_clock_mhz(i), "sm clock", i)),
            mem_clock_mhz=_num(_guard(lambda: d.mem_clock_mhz(i), "mem clock", i)),
            throttle_reasons=None if mask is None else decode_throttle(int(mask)),
            processes=None
            if procs is None
            else [(int(pid), None if used is None else round(used / MIB, 1)) for pid, used in procs],
            ts=time.time(),
        )

    def close(self) -> None:
        _guard(self._driver.shutdown, "shutdown", -1)


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


# --------------------------------------------------------------------------- NVML


def _nvml_init_reason(exc: BaseException, nv: Any) -> str:
    """A user-readable reason for a failed ``nvmlInit``."""
    if isinstance(exc, getattr(nv, "NVMLError_LibraryNotFound", ())):
        return "no NVIDIA driver found (libnvidia-ml.so not loadable)"
    if isinstance(exc, getattr(nv, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is not loaded"
    if isinstance(exc, getattr(nv, "NVMLError_NoPermission", ())):
        return "no permission to talk to the NVIDIA driver"
    return f"NVML failed to start ({type(exc).__name__}: {exc})"


class NvmlDriver:
    """``pynvml`` behind the ``Driver`` interface. Construction raises ``NoGpu``."""

    def __init__(self) -> None:
        try:
            import pynvml  # type: ignore[import-untyped]
        except ImportError as exc:
            raise NoGpu(f"nvidia-ml-py is not installed ({exc})") from exc
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - every NVML start failure means "no GPU"
            raise NoGpu(_nvml_init_reason(exc, pynvml)) from exc
        self._handles: dict[int, Any] = {}

    def _h(self, i: int) -> Any:
        if i not in self._handles:
            self._handles[i] = self._nv.nvmlDeviceGetHandleByIndex(i)
        return self._handles[i]

    def count(self) -> int:
        return int(self._nv.nvmlDeviceGetCount())

    def name(self, i: int) -> str:
        return _text(self._nv.nvmlDeviceGetName(self._h(i)))

    def uuid(self, i: int) -> str:
        return _text(self._nv.nvmlDeviceGetUUID(self._h(i)))

    def pci_bus_id(self, i: int) -> str:
        return _text(self._nv.nvmlDeviceGetPciInfo(self._h(i)).busId)

    def utilization_pct(self, i: int) -> float:
        return self._nv.nvmlDeviceGetUtilizationRates(self._h(i)).gpu

    def memory_bytes(self, i: int) -> tuple[int, int]:
        info = self._nv.nvmlDeviceGetMemoryInfo(self._h(i))
        return int(info.used), int(info.total)

    def power_mw(self, i: int) -> float:
        return self._nv.nvmlDeviceGetPowerUsage(self._h(i))

    def power_limit_mw(self, i: int) -> float:
        return self._nv.nvmlDeviceGetEnforcedPowerLimit(self._h(i))

    def temperature_c(self, i: int) -> float:
        return self._nv.nvmlDeviceGetTemperature(self._h(i), self._nv.NVML_TEMPERATURE_GPU)

    def sm_clock_mhz(self, i: int) -> float:
        return self._nv.nvmlDeviceGetClockInfo(self._h(i), self._nv.NVML_CLOCK_SM)

    def mem_clock_mhz(self, i: int) -> float:
        return self._nv.nvmlDeviceGetClockInfo(self._h(i), self._nv.NVML_CLOCK_MEM)

    def throttle_mask(self, i: int) -> int:
        # Newer drivers call these "clocks event reasons"; older bindings only have "throttle".
        fn = getattr(self._nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or self._nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(fn(self._h(i)))

    def processes(self, i: int) -> list[tuple[int, int | None]]:
        seen: dict[int, int | None] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            fn = getattr(self._nv, getter, None)
            if fn is None:
                continue
            try:
                procs = fn(self._h(i))
            except Exception:  # noqa: BLE001 - graphics list is often unsupported; keep compute
                if getter.endswith("ComputeRunningProcesses"):
                    raise
                continue
            for p in procs:
                used = getattr(p, "usedGpuMemory", None)
                seen[int(p.pid)] = None if used is None else int(used)
        return sorted(seen.items())

    def shutdown(self) -> None:
        self._nv.nvmlShutdown()


class NvmlBackend(DriverBackend):
    """Real GPUs through NVML. Raises ``NoGpu`` when the library or driver is missing."""

    def __init__(self) -> None:
        super().__init__(NvmlDriver(), "nvml")


# --------------------------------------------------------------------------- none


class NoneBackend:
    """Zero devices, with the reason why, so every screen can say so plainly."""

    name = "none"

    def __init__(self, reason: str = "GPU telemetry disabled (gpu.devices = \"none\")") -> None:
        self.reason = reason

    def device_count(self) -> int:
        return 0

    def sample(self, index: int) -> DeviceSample:
        raise IndexError(f"no GPU: {self.reason}")

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- fake

_FAKE_DEFAULT: dict[str, Any] = {
    "name": "Fake GPU",
    "util_pct": 0,
    "mem_used_mb": 0,
    "mem_total_mb": 81559,
    "power_w": 60.0,
    "power_limit_w": 700.0,
    "temp_c": 35,
    "sm_clock_mhz": 1980,
    "mem_clock_mhz": 2619,
    "throttle_reasons": [],
    "processes": [],
}


class FakeDriver:
    """Scripted devices in human units, answered in NVML's raw units.

    Each device is a dict with the ``DeviceSample`` field names. A value may be a plain value,
    a zero-argument callable (called on every query: scripted sequences, delays), or an
    exception instance (raised). ``"unsupported": [field, ...]`` makes those fields raise
    ``FieldNotSupported``, like NVML's NotSupported.
    """

    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self.devices = [dict(_FAKE_DEFAULT, **d) for d in devices]
        for i, d in enumerate(self.devices):
            d.setdefault("uuid", f"GPU-fake-{i:04d}")
            d.setdefault("pci_bus_id", f"00000000:{0x10 + i:02X}:00.0")
        self.closed = False

    def _get(self, i: int, key: str) -> Any:
        dev = self.devices[i]
        if key in dev.get("unsupported", ()):
            raise FieldNotSupported(key)
        value = dev[key]
        if isinstance(value, BaseException):
            raise value
        return value() if callable(value) else value

    def count(self) -> int:
        return len(self.devices)

    def name(self, i: int) -> str:
        return self._get(i, "name")

    def uuid(self, i: int) -> str:
        return self._get(i, "uuid")

    def pci_bus_id(self, i: int) -> str:
        return self._get(i, "pci_bus_id")

    def utilization_pct(self, i: int) -> float:
        return self._get(i, "util_pct")

    def memory_bytes(self, i: int) -> tuple[int, int]:
        used = self._get(i, "mem_used_mb")
        total = self._get(i, "mem_total_mb")
        return int(used * MIB), int(total * MIB)

    def power_mw(self, i: int) -> float:
        return self._get(i, "power_w") * 1000.0

    def power_limit_mw(self, i: int) -> float:
        return self._get(i, "power_limit_w") * 1000.0

    def temperature_c(self, i: int) -> float:
        return self._get(i, "temp_c")

    def sm_clock_mhz(self, i: int) -> float:
        return self._get(i, "sm_clock_mhz")

    def mem_clock_mhz(self, i: int) -> float:
        return self._get(i, "mem_clock_mhz")

    def throttle_mask(self, i: int) -> int:
        return encode_throttle(self._get(i, "throttle_reasons"))

    def processes(self, i: int) -> list[tuple[int, int | None]]:
        return [
            (pid, None if used is None else int(used * MIB))
            for pid, used in self._get(i, "processes")
        ]

    def shutdown(self) -> None:
        self.closed = True


class FakeBackend(DriverBackend):
    """Scriptable devices for tests and demos; same n/a handling as the NVML backend."""

    def __init__(self, devices: list[dict[str, Any]] | None = None) -> None:
        if devices is None:
            devices = [{"name": "Fake H100 80GB"}, {"name": "Fake H100 80GB"}]
        self.driver = FakeDriver(devices)
        super().__init__(self.driver, "fake")


# --------------------------------------------------------------------------- choosing


def choose_backend(kind: str = "auto", *, fake_devices: list[dict[str, Any]] | None = None) -> TelemetryBackend:
    """Pick a backend. ``auto``: NVML when it starts and sees a device, else ``NoneBackend``
    with the reason. ``nvml`` insists and raises ``NoGpu``; ``none`` and ``fake`` never fail."""
    if kind == "none":
        return NoneBackend()
    if kind == "fake":
        return FakeBackend(fake_devices)
    if kind == "nvml":
        return NvmlBackend()
    if kind == "auto":
        try:
            backend = NvmlBackend()
        except NoGpu as exc:
            return NoneBackend(exc.reason)
        if backend.device_count() == 0:
            backend.close()
            return NoneBackend("NVML started but reports no devices")
        return backend
    raise ConfigError(f"unknown GPU telemetry backend {kind!r} (expected auto, nvml, none or fake)")


# --------------------------------------------------------------------------- sampling loop


def _sample_all(backend: TelemetryBackend) -> list[DeviceSample | BaseException]:
    """One tick in a worker thread; a failing device does not hide the others."""
    out: list[DeviceSample | BaseException] = []
    for i in range(backend.device_count()):
        try:
            out.append(backend.sample(i))
        except Exception as exc:  # noqa: BLE001 - reported per device, loop goes on
            out.append(exc)
    return out


async def poll_in_thread(
    fetch: Callable[[], list[Any]],
    interval_s: float,
    consume: Callable[[Any], Awaitable[None] | None],
    stop: asyncio.Event,
    *,
    timeout_s: float,
    what: str,
) -> None:
    """Call the blocking ``fetch`` in a thread every ``interval_s`` until ``stop``; consume each item.

    Why this shape: NVML calls and a cluster's sampling round block, so each round runs in a
    thread; a round never overlaps the previous one (a slow or hung round is awaited again next
    time rather than started twice, so threads never pile up), and the loop waits only the
    remainder of the interval so the cadence holds. A failing round or consumer is logged and
    skipped: telemetry must never take the run down.
    """
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[list[Any]] | None = None
    try:
        while not stop.is_set():
            started = loop.time()
            if pending is None:
                pending = asyncio.ensure_future(asyncio.to_thread(fetch))
            items: list[Any] = []
            try:
                items = await asyncio.wait_for(asyncio.shield(pending), timeout_s)
                pending = None
            except TimeoutError:
                log.warning("%s took over %.1fs; waiting for it before sampling again", what, timeout_s)
            except Exception as exc:  # noqa: BLE001 - a failed round is skipped, not fatal
                log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
                pending = None
            for item in items:
                try:
                    maybe = consume(item)
                    if inspect.isawaitable(maybe):
                        await maybe
                except Exception as exc:  # noqa: BLE001 - a consumer bug must not stop sampling
                    log.warning("%s: a sample was skipped: %s: %s", what, type(exc).__name__, exc)
            remaining = interval_s - (loop.time() - started)
            if remaining > 0:
                try:
                    await asyncio.wait_for(stop.wait(), remaining)
                except TimeoutError:
                    pass
    finally:
        if pending is not None:
            pending.cancel()


async def sample_loop(
    backend: TelemetryBackend,
    interval_s: float,
    emit: Callable[[DeviceSample], Awaitable[None] | None],
    stop: asyncio.Event,
    *,
    sample_timeout_s: float | None = None,
) -> None:
    """Sample every device every ``interval_s`` until ``stop`` is set (see `poll_in_thread`)."""

    def consume(item: DeviceSample | BaseException) -> Awaitable[None] | None:
        if isinstance(item, BaseException):  # one device's query failed: the others still count
            log.debug("GPU sample failed: %s: %s", type(item).__name__, item)
            return None
        return emit(item)

    await poll_in_thread(lambda: _sample_all(backend), interval_s, consume, stop,
                         timeout_s=sample_timeout_s if sample_timeout_s is not None else max(interval_s * 5, 5.0),
                         what="GPU sampling")


# --------------------------------------------------------------------------- `looptree gpus`


def _na(value: Any, fmt: str = "{:g}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _pair(a: Any, b: Any, fmt: str = "{:.0f}") -> str:
    if a is None and b is None:
        return "n/a"
    return f"{_na(a, fmt)} / {_na(b, fmt)}"


def format_gpus(backend: TelemetryBackend) -> str:
    """A plain table of what the backend sees, or one clear ``no GPU: <reason>`` line."""
    count = backend.device_count()
    if count == 0:
        reason = getattr(backend, "reason", "no devices")
        return f"no GPU: {reason}"
    header = ["#", "name", "bus id", "util", "memory MiB", "power W", "temp", "sm/mem MHz", "throttle", "procs"]
    rows: list[list[str]] = []
    for i in range(count):
        try:
            s = backend.sample(i)
        except Exception as exc:  # noqa: BLE001 - show the failure in its row
            rows.append([str(i), f"error: {exc}"] + ["n/a"] * (len(header) - 2))
            continue
        rows.append(
            [
                str(i),
                s.name or "n/a",
                s.pci_bus_id or "n/a",
                _na(s.util_pct, "{:.0f}%"),
                _pair(s.mem_used_mb, s.mem_total_mb),
                _pair(s.power_w, s.power_limit_w),
                _na(s.temp_c, "{:.0f}C"),
                _pair(s.sm_clock_mhz, s.mem_clock_mhz),
                "n/a" if s.throttle_reasons is None else (",".join(s.throttle_reasons) or "none"),
                "n/a"
                if s.processes is None
                else (" ".join(f"{pid}({_na(used, '{:.0f}')}MiB)" for pid, used in s.processes) or "-"),
            ]
        )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [f"{backend.name}: {count} GPU{'s' if count != 1 else ''}"]
    for r in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return "\n".join(lines)
