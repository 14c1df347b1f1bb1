"""Bench one KernelBench task: is ModelNew correct, and how fast is it against eager and compile?

    python -m looptree.gpu.kernelbench.runner --problem problem.py [--solution solution.py] [--metrics metrics.csv]
                           [--json result.json] [--precision fp32|fp16|bf16] [--protocol looptree|kernelbench]

Two processes. The one started by this command (the *launcher*) never imports torch nor any
candidate code: it starts the bench in a child process, keeps its own clock (wall and the
child's CPU time) around every timed trial the child announces on a pipe, and finally writes
the JSON and the metrics row. Reported times that the launcher's clock contradicts, and
speed-ups beyond KernelBench's 10x threshold that it cannot confirm, make the result
**suspect**: not credited (exit 1, no metrics row) and ``suspect: true`` in the JSON.

Why this order of work in the child (one process, so the three timings share a device state):
1. The clocks (``perf_counter_ns``, CUDA events) are taken and everything about the reference
   happens *before* solution.py is imported: a fingerprint of its output, the eager timing,
   the ``torch.compile`` timing. A solution that patches torch (or the problem, or the clock)
   at import can neither slow the baselines down nor change how the candidate is timed.
2. Then a snapshot of the process state (``guards.ProcessGuard``: time.*, RNG, torch and
   torch.nn.functional functions, the problem module, the reference's classes, the thread
   count). After the import, and before and after every input creation and trial, whatever
   changed is put back and the candidate is marked suspect, naming what it changed.
3. The reference is run again on the fingerprint inputs: if its output changed, the solution
   tampered with it, and the node fails saying so.
4. Correctness is a gate, not a metric: ``looptree.gpu.bench.correctness.check_outputs`` on
   KernelBench's correctness trials (seeds drawn from seed 42 as upstream does), at the
   tolerance of the precision (fp32 1e-4, fp16/bf16 1e-2), with the hack guards.
5. Every timed trial (reference and candidate alike) gets fresh inputs from a seed the candidate
   cannot predict, made outside the timed region, so a cache keyed by input content cannot pay;
   the last trial overwrites the previous trial's tensors in place (a cache keyed by tensor
   identity returns a stale result). Outputs of a few trials chosen at random, and the last,
   are compared against the reference on the same inputs.

Out of memory (``torch.cuda.OutOfMemoryError``, ``MemoryError``, the CPU allocator's "can't
allocate memory", or the child killed by the kernel with OOM evidence) is reported as such: in
the reference it means the problem's sizes do not fit this machine (exit 3); in the candidate it
is the candidate's failure (exit 1).

Exit status: 0 ok, 1 the candidate failed (import, correctness, crash, its own OOM) or is
suspect, 2 the problem file or the arguments are unusable, 3 the reference does not fit in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from looptree.gpu.bench import timing as _timing  # takes the clock now, before any candidate code
from looptree.gpu.kernelbench.problems import (
    COMPILE,
    EAGER,
    METRIC_COLUMNS,
    REFERENCE_COLUMNS,
    RUNTIME,
    SPEEDUP_COMPILE,
    SPEEDUP_EAGER,
    KernelBenchError,
    load_module,
    load_problem,
)

_monotonic = time.monotonic  # our own references: a patched time.monotonic changes nothing here
_monotonic_ns = time.monotonic_ns

EXIT_OK, EXIT_CANDIDATE, EXIT_PROBLEM, EXIT_OOM = 0, 1, 2, 3
FINGERPRINT_SEED = 0
KB_SEED = 42  # KernelBench's seed_num: weights, timing inputs and the correctness trial seeds
KB_COMMIT = "423217d9fda91e0c2d67e4a43bf62f96f6d104f1"  # ScalingIntelligence/KernelBench, 2026-03-05
EXCESSIVE_SPEEDUP = 10.0  # KernelBench's excessive_speedup_threshold
PRECISION_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}  # KernelBench get_tolerance_for_precision
SPOT_CHECKS = 2  # timed trials (besides the last) whose outputs are compared with the reference
OUTSIDE_FACTOR = 3.0  # the launcher's clock may exceed the reported trial time by this factor…
OUTSIDE_FLOOR_MS = 0.05  # …plus the pipe's latency and this much
_OOM_WORDS = ("out of memory", "outofmemoryerror", "memoryerror", "can't allocate memory",
              "cannot allocate memory", "std::bad_alloc", "failed to allocate memory")


@dataclass
class BenchResult:
    """Everything one bench run learned; written as JSON for `looptree kernelbench --eval-only`."""

    problem: str
    solution: str | None
    device: str = ""
    ok: bool = False
    correct: bool | None = None
    suspect: bool = False
    reason: str = ""
    oom: bool = False
    exit_code: int = EXIT_OK
    eager_ms: float | None = None
    compile_ms: float | None = None
    compile_note: str = ""
    runtime_ms: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None
    max_abs_err: float | None = None
    seeds_checked: list[int] = field(default_factory=list)
    trials: int = 0
    timing_method: str = ""
    protocol: str = "looptree"
    precision: str = "fp32"
    atol: float | None = None
    rtol: float | None = None
    statistic: str = "median"  # which statistic runtime_ms/eager_ms are (KernelBench: mean)
    eager_median_ms: float | None = None
    runtime_median_ms: float | None = None
    eager_mean_ms: float | None = None
    runtime_mean_ms: float | None = None
    eager_wall_ms: float | None = None  # median host span of a trial (with the device sync): what the
    runtime_wall_ms: float | None = None  # launcher's clock is compared with
    threads: int = 0
    excessive_speedup: bool = False  # what KernelBench flags: > 10x over eager
    tampering: list[str] = field(default_factory=list)
    outside: dict[str, Any] = field(default_factory=dict)  # the launcher's own clock
    stage: str = ""  # the last stage begun (a killed bench says where it was)


class BenchFailure(Exception):
    """Ends the bench with ``exit_code`` and a one-line ``reason``."""

    def __init__(self, reason: str, exit_code: int, *, oom: bool = False, correct: bool | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code
        self.oom = oom
        self.correct = correct


class _CompileTimeout(Exception):
    pass


# --------------------------------------------------------------------------- helpers


def is_oom(exc: BaseException) -> bool:
    """Out of memory, whichever way torch, numpy or Python says it."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, OSError)) and reason_mentions_oom(str(exc))


def reason_mentions_oom(reason: str) -> bool:
    low = reason.lower()
    return any(word in low for word in _OOM_WORDS)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text[:300] + ("…" if len(text) > 300 else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _memory_note(device: str) -> str:
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None:
        try:
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
            return f"{device} has {total / 2**30:.1f} GiB"
        except Exception:  # noqa: BLE001 - a note, not a verdict
            return device
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            return f"address space limited to {soft / 2**30:.1f} GiB"
    except (ImportError, ValueError, OSError):
        pass
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"this machine has {pages * size / 2**30:.1f} GiB of RAM"
    except (ValueError, OSError, AttributeError):
        return "cpu"


def oom_failure(what: str, exc: BaseException | str, device: str, *, reference: bool) -> BenchFailure:
    detail = exc if isinstance(exc, str) else _one_line(exc)
    if reference:
        return BenchFailure(
            f"out of memory while {what}: the problem's sizes do not fit this machine "
            f"({_memory_note(device)}); {detail}",
            EXIT_OOM,
            oom=True,
        )
    return BenchFailure(f"candidate ran out of memory while {what} ({_memory_note(device)}); {detail}",
                        EXIT_CANDIDATE, oom=True, correct=False)


class _Progress:
    """Stage lines on stderr as the bench goes (a timeout then says which stage was slow), and
    the same stages, plus a mark around each timed trial, on the launcher's pipe."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.started = _monotonic()
        self.stage = ""
        self.result: BenchResult | None = None

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (line + "\n").encode())
        except OSError:
            self.fd = None  # the launcher is gone; the bench still finishes

    def begin(self, stage: str) -> None:
        self.stage = stage
        if self.result is not None:
            self.result.stage = stage
        print(f"kb_bench: [{_monotonic() - self.started:6.1f} s] {stage}", file=sys.stderr, flush=True)
        self.send(f"S {stage}")

    def phase(self, name: str, event: str) -> None:
        self.send(f"P {name} {event}")

    def mark(self, what: str) -> None:
        self.send(what)


_PROGRESS = _Progress(None)


@contextmanager
def _stage(what: str, device: str, *, reference: bool) -> Iterator[None]:
    """Announce the stage, and turn any exception raised inside into a BenchFailure saying which."""
    _PROGRESS.begin(what)
    try:
        yield
    except (BenchFailure, KeyboardInterrupt):
        raise
    except KernelBenchError as exc:
        raise BenchFailure(str(exc), EXIT_PROBLEM if reference else EXIT_CANDIDATE,
                           correct=None if reference else False) from exc
    except BaseException as exc:  # noqa: BLE001 - user code: every failure is a verdict
        if isinstance(exc, SystemExit):
            exc = RuntimeError(f"called sys.exit({exc.code})")
        if is_oom(exc):
            raise oom_failure(what, exc, device, reference=reference) from exc
        who = "the reference (problem.py)" if reference else "the candidate (solution.py)"
        raise BenchFailure(f"{who} failed while {what}: {_one_line(exc)}",
                           EXIT_PROBLEM if reference else EXIT_CANDIDATE,
                           correct=None if reference else False) from exc


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device too


def kernelbench_trial_seeds(n: int, seed: int = KB_SEED) -> list[int]:
    """KernelBench's correctness trial seeds: ``torch.manual_seed(42)`` then one randint each."""
    import torch

    torch.manual_seed(seed)
    return [int(torch.randint(0, 2**32 - 1, (1,)).item()) for _ in range(n)]


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _snapshot(value: Any) -> list[Any]:
    """Host copies of every tensor in an output, for comparing later."""
    return [t.detach().to("cpu", copy=True) for t in _tensors(value)]


def _same_outputs(before: list[Any], after: list[Any], atol: float, rtol: float) -> bool:
    import torch

    if len(before) != len(after):
        return False
    for a, b in zip(before, after):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            if not torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True):
                return False
        elif not torch.equal(a, b):
            return False
    return True


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _CompileTimeout in the main thread after ``seconds`` (0: no limit)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _CompileTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _note(message: str) -> None:
    print(f"kb_bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the bench


class Task:
    """The problem module, its init inputs and input maker, on one device and precision.

    Floating-point tensors are cast to the precision (KernelBench casts every tensor; integer
    targets and indices are kept as they are here, since casting them changes the problem)."""

    def __init__(self, module: Any, device: str, dtype: Any) -> None:
        self.module = module
        self.device = device
        self.dtype = dtype
        self.guard: Any = None  # set once the candidate may run: restored before inputs are made
        self.on_tamper: Callable[[list[str], str], None] | None = None

    def _cast(self, value: Any) -> Any:
        import torch

        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dtype != self.dtype:
                value = value.to(dtype=self.dtype)
            return value.to(self.device)
        if isinstance(value, list):
            return [self._cast(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._cast(v) for v in value)
        return value

    def _clean(self, when: str) -> None:
        if self.guard is not None:
            changed = self.guard.restore()
            if changed and self.on_tamper is not None:
                self.on_tamper(changed, when)

    def init_inputs(self) -> list[Any]:
        self._clean("before making init inputs")
        _seed_all(KB_SEED)
        return [self._cast(v) for v in self.module.get_init_inputs()]

    def make_inputs(self, seed: int) -> list[Any]:
        self._clean("before making inputs")
        _seed_all(seed)
        return [self._cast(v) for v in self.module.get_inputs()]

    def build(self, cls: Any) -> Any:
        """Construct under the same seed for Model and ModelNew, so even unmatched params agree."""
        init = self.init_inputs()
        _seed_all(KB_SEED)
        model = cls(*init)
        return model.to(device=self.device, dtype=self.dtype)


def _load_weights(reference: Any, candidate: Any) -> str:
    """Copy the reference's parameters and buffers into ModelNew when the state_dicts line up."""
    try:
        ref_sd, cand_sd = reference.state_dict(), candidate.state_dict()
    except Exception as exc:  # noqa: BLE001 - a candidate that is no nn.Module is judged by its outputs
        return f"no state_dict to compare ({_one_line(exc)}); relying on seeded initialisation"
    if not ref_sd:
        return ""
    if set(ref_sd) != set(cand_sd) or any(ref_sd[k].shape != cand_sd[k].shape for k in ref_sd):
        return "ModelNew's state_dict differs from Model's; relying on seeded initialisation"
    candidate.load_state_dict(ref_sd)
    return ""


def _warm(fn: Callable[[], Any], seconds: float, device: str, max_calls: int = 10_000) -> None:
    """Call ``fn`` for at least ``seconds`` of wall time before any trial is timed.

    A fixed count of warm-up calls is not enough: thread pools spin up, clocks ramp and (on a
    shared CPU) the first few dozen calls of a tiny op can each take milliseconds, which would
    make whichever of the three models is timed first look slow.
    """
    torch = sys.modules.get("torch")
    end = _monotonic() + seconds
    calls = 0
    while calls < max_calls and (calls == 0 or _monotonic() < end):
        fn()
        calls += 1
        if device.startswith("cuda") and torch is not None and calls % 10 == 0:
            torch.cuda.synchronize()
    if device.startswith("cuda") and torch is not None:
        torch.cuda.synchronize()


class _Trials:
    """Fresh inputs for every timed trial, made outside the timed region.

    Seeds come from ``secrets`` (a candidate cannot precompute the inputs it will be timed on);
    the last trial overwrites the previous trial's tensors in place instead, so a result cached
    by tensor identity is stale there. ``spot`` trials (and the last) have their output compared
    with the reference's on the same inputs, made again from the seed (no copy is kept).
    """

    def __init__(self, task: Task, model: Any, args: argparse.Namespace, *, reference: Any = None,
                 guard: Any = None, on_tamper: Callable[[list[str], str], None] | None = None) -> None:
        self.task = task
        self.model = model
        self.reference = reference
        self.guard = guard
        self.on_tamper = on_tamper
        self.total = args.trials + args.discard_first
        base = secrets.randbelow(2**31 - self.total - 1) + 1
        self.seeds = [base + i for i in range(self.total)]
        picks = list(range(max(0, self.total - 2)))  # the trial before last keeps its tensors for the last
        rng = random.SystemRandom()
        self.spot = set(rng.sample(picks, min(SPOT_CHECKS, len(picks)))) if reference is not None else set()
        if reference is not None:
            self.spot.add(self.total - 1)
        self.inputs: list[Any] | None = task.make_inputs(KB_SEED)  # warm-up inputs (KernelBench's)
        self.out: Any = None
        self.atol = args.atol
        self.rtol = args.rtol

    def call(self) -> None:
        self.out = self.model(*self.inputs)  # type: ignore[misc]

    def before(self, i: int) -> None:
        self.out = None
        self._clean(f"before timed trial {i}")
        last = i == self.total - 1 and i > 0
        if last and self.inputs is not None:
            fresh = self.task.make_inputs(self.seeds[i])
            old = _tensors(self.inputs)
            new = _tensors(fresh)
            if len(old) == len(new) and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(old, new)):
                try:
                    for a, b in zip(old, new):
                        a.copy_(b)
                except RuntimeError:  # an input that cannot be written (an expanded view): fresh ones then
                    self.inputs = fresh
                    return
                del fresh, new
                return
            self.inputs = fresh
            return
        self.inputs = None  # free the previous set before the next is made
        self.inputs = self.task.make_inputs(self.seeds[i])

    def after(self, i: int) -> None:
        self._clean(f"during timed trial {i}")
        if i not in self.spot:
            return
        from looptree.gpu.bench.correctness import _Fail, _pairs, _structure, compare_leaves

        last = i == self.total - 1 and i > 0
        if not last:
            self.inputs = None
        got = self.out
        self.out = None
        expected = self.reference(*self.task.make_inputs(self.seeds[i]))
        try:
            for r, c in _pairs(_structure(expected), _structure(got)):
                compare_leaves(r, c, self.atol, self.rtol)
        except _Fail as fail:
            if last:
                raise BenchFailure(
                    "incorrect: after its inputs were overwritten in place with new values, ModelNew returned "
                    f"a stale result (cached by tensor identity?): {fail.reason}", EXIT_CANDIDATE,
                    correct=False) from None
            raise BenchFailure(
                f"incorrect: an output ModelNew produced while being timed (trial {i}) differs from the "
                f"reference's on the same inputs (cached or precomputed?): {fail.reason}", EXIT_CANDIDATE,
                correct=False) from None

    def _clean(self, when: str) -> None:
        if self.guard is not None:
            changed = self.guard.restore()
            if changed and self.on_tamper is not None:
                self.on_tamper(changed, when)


def _time(trials: _Trials, args: argparse.Namespace, device: str, phase: str) -> Any:
    _warm(trials.call, args.warmup_seconds, device)
    _PROGRESS.phase(phase, "begin")
    try:
        return _timing.time_callable(trials.call, warmup=args.warmup, trials=args.trials, device=device,
                                     flush_l2=args.flush, discard_first=args.discard_first,
                                     before=trials.before, after=trials.after, marker=_PROGRESS.mark)
    finally:
        _PROGRESS.phase(phase, "end")


def _stat(timing: Any, args: argparse.Namespace) -> float:
    return float(timing.mean if args.statistic == "mean" else timing.median)


def _time_compile(task: Task, reference: Any, args: argparse.Namespace, device: str, eager_ms: float,
                  result: BenchResult) -> float:
    """torch.compile's time, or the eager time (with a note) when compile is off, fails or hangs."""
    import torch

    if args.no_compile:
        result.compile_note = "torch.compile skipped (--no-compile): compile_ms is the eager time"
        _note(result.compile_note)
        return eager_ms
    _PROGRESS.begin("compiling the reference with torch.compile")
    try:
        compiled = torch.compile(reference, mode=None if args.compile_mode == "default" else args.compile_mode)
        with _deadline(args.compile_timeout):
            compiled(*task.make_inputs(KB_SEED))  # the compile itself, outside the timed region
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        with _stage("timing the torch.compile baseline", device, reference=True):
            timing = _time(_Trials(task, compiled, args), args, device, "time:compile")
        return _stat(timing, args)
    except BenchFailure as exc:
        if exc.oom:
            raise
        why = exc.reason
    except _CompileTimeout:
        why = f"compiling took longer than {args.compile_timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - inductor can fail in many ways; compile is a baseline, not the task
        if is_oom(exc):
            raise oom_failure("compiling the reference with torch.compile", exc, device, reference=True) from exc
        if "_CompileTimeout" in str(exc):  # inductor wraps our alarm in its own error type
            why = f"compiling took longer than {args.compile_timeout:g} s"
        else:
            why = _one_line(exc)
    finally:
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
    result.compile_note = f"torch.compile unavailable ({why}): compile_ms is the eager time"
    _note(result.compile_note)
    return eager_ms


def _check_correctness(task: Task, reference: Any, candidate: Any, args: argparse.Namespace,
                       result: BenchResult) -> None:
    from looptree.gpu.bench.correctness import check_outputs

    seeds = kernelbench_trial_seeds(args.seeds)
    _PROGRESS.begin(f"checking correctness ({len(seeds)} trials, atol={args.atol}, rtol={args.rtol})")
    try:
        report = check_outputs(reference, candidate, task.make_inputs, seeds=seeds, atol=args.atol, rtol=args.rtol,
                               progress=_PROGRESS.begin)
    except BaseException as exc:  # noqa: BLE001 - make_inputs runs outside check_outputs' own guard
        if isinstance(exc, (KeyboardInterrupt, BenchFailure)):
            raise
        if is_oom(exc):
            raise oom_failure("checking correctness (making inputs)", exc, task.device, reference=True) from exc
        raise BenchFailure(f"checking correctness failed: {_one_line(exc)}", EXIT_PROBLEM) from exc
    result.max_abs_err = report.max_abs_err
    result.seeds_checked = list(report.seeds_checked)
    if report.ok:
        return
    reason = report.reason
    if reason.startswith("reference raised") and reason_mentions_oom(reason):
        raise oom_failure("running the reference on correctness inputs", reason, task.device, reference=True)
    if reason.startswith("reference raised"):
        raise BenchFailure(f"the reference (problem.py) failed: {reason}", EXIT_PROBLEM)
    if reason.startswith("candidate raised") and reason_mentions_oom(reason):
        raise oom_failure("checking correctness", reason, task.device, reference=False)
    where = f" (seed {report.failed_seed})" if report.failed_seed is not None else ""
    raise BenchFailure(f"incorrect: ModelNew's output differs from Model's{where}: {reason}",
                       EXIT_CANDIDATE, correct=False)


def _reference_classes(model: Any) -> list[tuple[str, Any]]:
    """The reference's nn.Module classes (its own and torch's), whose methods a candidate could patch."""
    import torch

    seen: dict[int, tuple[str, Any]] = {}
    modules = model.modules() if isinstance(model, torch.nn.Module) else []
    for sub in modules:
        for cls in type(sub).__mro__:
            if cls in (object, torch.nn.Module):
                continue
            seen.setdefault(id(cls), (f"{cls.__module__}.{cls.__qualname__}", cls))
    return list(seen.values())


def apply_precision(args: argparse.Namespace) -> None:
    """Fill the protocol's defaults for whatever the user left unset."""
    tol = PRECISION_TOLERANCE[args.precision]
    if args.atol is None:
        args.atol = tol
    if args.rtol is None:
        args.rtol = tol
    kb = args.protocol == "kernelbench"
    if args.statistic is None:
        args.statistic = "mean" if kb else "median"
    if args.discard_first is None:
        args.discard_first = 1 if kb else 0


def run_bench(args: argparse.Namespace, result: BenchResult) -> None:
    """The whole bench; raises BenchFailure on any verdict other than success."""
    try:
        import torch
    except ImportError as exc:
        raise BenchFailure(f"torch is not importable ({exc}); install it to bench KernelBench problems",
                           EXIT_PROBLEM) from exc
    from looptree.gpu.kernelbench.guards import ProcessGuard, describe

    try:
        import torch._dynamo  # noqa: F401 - it rewraps torch functions once; before the snapshot, not after
    except Exception:  # noqa: BLE001 - no dynamo: no compile baseline either
        pass
    _timing.capture_clocks()
    try:
        device = _timing.resolve_device(args.device)
    except Exception as exc:  # noqa: BLE001 - NoGpu or a malformed --device
        raise BenchFailure(f"--device {args.device}: {exc}", EXIT_PROBLEM) from exc
    result.device = device
    cuda = device.startswith("cuda")
    if args.flush is None:
        args.flush = cuda  # a 64 MiB CPU flush would dwarf tiny CPU problems
    kb = args.protocol == "kernelbench"
    if args.trials is None:
        args.trials = 100 if (cuda or kb) else 20
    if args.warmup is None:
        args.warmup = 3 if (cuda or kb) else 2
    result.trials = args.trials
    result.protocol, result.precision, result.statistic = args.protocol, args.precision, args.statistic
    result.atol, result.rtol = args.atol, args.rtol
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    if device == "cpu" and args.threads > 0:
        # One thread by default: on a shared CPU, torch's thread pool waits for a busy core at
        # every parallel region and tiny ops take milliseconds at random, whichever model runs.
        torch.set_num_threads(args.threads)
    result.threads = torch.get_num_threads()
    tampering: list[str] = []

    seen: set[str] = set()

    def tampered(changed: list[str], when: str) -> None:
        what = describe(changed)
        if what not in seen:  # the first time each change was found, not every trial's repeat
            seen.add(what)
            tampering.append(f"{what} changed {when}")
            _note(f"suspect: {tampering[-1]} (put back)")

    with torch.no_grad():
        # 1. the reference, before any candidate code has run
        with _stage("importing problem.py", device, reference=True):
            module = load_problem(args.problem)
        task = Task(module, device, dtype)
        with _stage("building Model", device, reference=True):
            reference = task.build(module.Model)
        with _stage("making the reference's inputs", device, reference=True):
            fp_in = task.make_inputs(FINGERPRINT_SEED)
        with _stage("running the reference", device, reference=True):
            fp_out = _snapshot(reference(*fp_in))
        del fp_in
        with _stage("timing the eager reference", device, reference=True):
            eager = _time(_Trials(task, reference, args), args, device, "time:eager")
        result.eager_ms = _stat(eager, args)
        result.eager_median_ms, result.eager_mean_ms = float(eager.median), float(eager.mean)
        result.eager_wall_ms = _wall(eager)
        result.timing_method = eager.method
        result.compile_ms = _time_compile(task, reference, args, device, result.eager_ms, result)
        if args.solution is None:
            result.ok = True
            return

        # 2. the candidate: a snapshot of the process first, then the import
        guard = ProcessGuard([("problem", module), *_reference_classes(reference)],
                             threads=result.threads if device == "cpu" else None)
        task.guard, task.on_tamper = guard, tampered
        sys.modules.pop("problem", None)  # the solution's `import problem` finds the file beside it
        with _stage("importing solution.py", device, reference=False):
            solution = load_module(args.solution, "solution")
        changed = guard.restore()
        if changed:
            tampered(changed, "when solution.py was imported")
        cls = getattr(solution, "ModelNew", None)
        if cls is None:
            raise BenchFailure(f"{Path(args.solution).name} defines no ModelNew (class ModelNew(nn.Module))",
                               EXIT_CANDIDATE, correct=False)
        with _stage("building ModelNew", device, reference=False):
            candidate = task.build(cls)
            note = _load_weights(reference, candidate)
        changed = guard.restore()
        if changed:
            tampered(changed, "while ModelNew was built")
        if note:
            _note(note)
        with _stage("re-running the reference after importing solution.py", device, reference=True):
            again = _snapshot(reference(*task.make_inputs(FINGERPRINT_SEED)))
        if not _same_outputs(fp_out, again, 1e-2, 1e-2):
            raise BenchFailure(
                "incorrect: importing or building ModelNew changed what the reference Model computes "
                "(solution.py must not patch torch, problem.py or Model)", EXIT_CANDIDATE, correct=False)
        del again
        if fp_out and not any(t.is_floating_point() or t.is_complex() for t in fp_out):
            args.atol = args.rtol = None  # integer outputs (indices, counts) must match exactly
        del fp_out
        _check_correctness(task, reference, candidate, args, result)
        result.correct = True

        # 3. timing the candidate, each trial on fresh inputs, a few outputs spot-checked
        with _stage("timing ModelNew", device, reference=False):
            _calibrate()
            trials = _Trials(task, candidate, args, reference=reference, guard=guard, on_tamper=tampered)
            timing = _time(trials, args, device, "time:candidate")
            del trials
    result.tampering = tampering
    runtime = _stat(timing, args)
    result.runtime_ms = runtime
    result.runtime_median_ms, result.runtime_mean_ms = float(timing.median), float(timing.mean)
    result.runtime_wall_ms = _wall(timing)
    result.speedup_vs_eager = result.eager_ms / runtime if runtime > 0 else math.inf
    result.speedup_vs_compile = (result.compile_ms or 0.0) / runtime if runtime > 0 else math.inf
    result.excessive_speedup = result.speedup_vs_eager > EXCESSIVE_SPEEDUP
    if tampering:
        result.suspect = True
        raise BenchFailure(f"suspect: solution.py tampered with the process: {'; '.join(tampering)}",
                           EXIT_CANDIDATE, correct=True)
    result.ok = True


def _wall(timing: Any) -> float:
    """Median host span of a trial (CUDA: launch to whole-device sync; CPU: the trial itself)."""
    walls = getattr(timing, "wall_times_ms", None) or timing.times_ms
    return float(statistics.median(walls))


def _calibrate(pairs: int = 20) -> None:
    """Empty marked regions: the launcher learns the pipe's latency from them."""
    _PROGRESS.phase("calibrate", "begin")
    for _ in range(pairs):
        _PROGRESS.mark("B")
        _PROGRESS.mark("E")
    _PROGRESS.phase("calibrate", "end")


def write_metrics(path: str, result: BenchResult) -> None:
    from looptree.gpu.bench.report import MetricsWriter

    columns: tuple[str, ...]
    if result.runtime_ms is None:
        row = {EAGER: result.eager_ms, COMPILE: result.compile_ms}
        columns = REFERENCE_COLUMNS
    else:
        row = {
            SPEEDUP_EAGER: result.speedup_vs_eager,
            SPEEDUP_COMPILE: result.speedup_vs_compile,
            RUNTIME: result.runtime_ms,
            EAGER: result.eager_ms,
            COMPILE: result.compile_ms,
        }
        columns = METRIC_COLUMNS
    Path(path).unlink(missing_ok=True)  # one bench run, one file: never mix with an older run's rows
    with MetricsWriter(path, columns) as writer:
        writer.append(row)


# --------------------------------------------------------------------------- the launcher's clock


@dataclass
class _Mark:
    kind: str  # "S" stage, "P" phase, "B"/"E" around a timed trial
    text: str
    ns: int
    cpu_s: float | None


def _child_cpu_seconds(pid: int) -> float | None:
    """utime + stime of every thread of ``pid`` (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode(errors="replace")
        rest = data[data.rindex(")") + 2:].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _read_marks(fd: int, pid_box: list[int], marks: list[_Mark]) -> None:
    with os.fdopen(fd, "rb", buffering=0) as fh:
        pending = b""
        while True:
            chunk = fh.read(65536)
            now = _monotonic_ns()
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                kind, _, text = line.partition(" ")
                cpu = _child_cpu_seconds(pid_box[0]) if kind in ("P", "S") and pid_box else None
                marks.append(_Mark(kind, text, now, cpu))


def _phase_figures(marks: list[_Mark]) -> dict[str, dict[str, Any]]:
    """Per phase: the launcher's per-trial times (ms), wall and CPU seconds."""
    phases: dict[str, dict[str, Any]] = {}
    current: str | None = None
    begin: _Mark | None = None
    start_ns: int | None = None
    for m in marks:
        if m.kind == "P":
            name, _, event = m.text.rpartition(" ")
            if event == "begin":
                current, begin = name, m
                phases[name] = {"trials_ms": []}
            elif event == "end" and current == name and begin is not None:
                ph = phases[name]
                ph["wall_s"] = (m.ns - begin.ns) / 1e9
                if m.cpu_s is not None and begin.cpu_s is not None:
                    ph["cpu_s"] = m.cpu_s - begin.cpu_s
                current = None
        elif m.kind == "B":
            start_ns = m.ns
        elif m.kind == "E" and start_ns is not None and current is not None:
            phases[current]["trials_ms"].append((m.ns - start_ns) / 1e6)
            start_ns = None
    return phases


def outside_verdict(result: dict[str, Any], phases: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """Does the launcher's clock agree with the times the bench reported? ('' when it does)."""
    figures: dict[str, Any] = {}
    eager = phases.get("time:eager", {}).get("trials_ms") or []
    cand = phases.get("time:candidate", {}).get("trials_ms") or []
    calib = phases.get("calibrate", {}).get("trials_ms") or []
    claimed_cand = result.get("runtime_wall_ms") or result.get("runtime_median_ms")
    claimed_ref = result.get("eager_wall_ms") or result.get("eager_median_ms")
    speedup = result.get("speedup_vs_eager")
    if not cand or not eager or claimed_cand is None or claimed_ref is None or speedup is None:
        if speedup is not None and speedup > EXCESSIVE_SPEEDUP:
            return (f"speed-up {speedup:.3g}x exceeds KernelBench's {EXCESSIVE_SPEEDUP:g}x threshold and no clock "
                    "outside the bench process confirms it"), figures
        return "", figures
    latency = statistics.median(calib) if calib else 0.0
    resolution = max(OUTSIDE_FLOOR_MS, 2 * latency)
    o_ref = max(0.0, statistics.median(eager) - latency)
    o_cand = max(0.0, statistics.median(cand) - latency)
    figures = {"eager_ms": round(o_ref, 6), "runtime_ms": round(o_cand, 6), "latency_ms": round(latency, 6),
               "speedup_vs_eager": round(o_ref / max(o_cand, resolution), 4)}
    for name in ("time:eager", "time:candidate"):
        ph = phases.get(name, {})
        if ph.get("cpu_s") is not None and ph.get("wall_s"):
            figures[f"{name.split(':')[1]}_cores"] = round(ph["cpu_s"] / ph["wall_s"], 3)
    if speedup > 1 and o_cand > OUTSIDE_FACTOR * claimed_cand + resolution:
        return (f"the launcher's clock saw ModelNew's timed calls take {o_cand:.4g} ms (median) where the bench "
                f"reported {claimed_cand:.4g} ms: the clock inside the bench was tampered with"), figures
    cores_ref, cores_cand = figures.get("eager_cores"), figures.get("candidate_cores")
    threads = result.get("threads") or 0
    if (result.get("device") == "cpu" and threads == 1 and cores_ref is not None and cores_cand is not None
            and phases["time:candidate"]["wall_s"] >= 0.3 and cores_cand > max(1.5, 1.5 * cores_ref)):
        return (f"ModelNew kept {cores_cand:.2g} cores busy while timed with 1 thread (the reference "
                f"{cores_ref:.2g}): it raised the thread count"), figures
    if speedup > EXCESSIVE_SPEEDUP:
        confirmed = o_ref >= claimed_ref / OUTSIDE_FACTOR and o_ref / max(o_cand, resolution) >= EXCESSIVE_SPEEDUP
        figures["confirmed"] = confirmed
        if not confirmed:
            return (f"speed-up {speedup:.3g}x exceeds KernelBench's {EXCESSIVE_SPEEDUP:g}x threshold and the "
                    f"launcher's clock does not confirm it (it saw {figures['speedup_vs_eager']:.3g}x)"), figures
    return "", figures


def _oom_kills() -> int | None:
    """This cgroup's count of OOM kills (cgroup v2 memory.events), or None when unreadable."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().splitlines()[-1].split(":", 2)[2]
        text = (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.events").read_text()
    except (OSError, IndexError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


def _death_reason(rc: int, stage: str, kills_before: int | None) -> tuple[str, bool]:
    """Why the child died without a result; (reason, oom)."""
    where = f" while {stage}" if stage else ""
    if rc < 0:
        sig = -rc
        if sig == signal.SIGKILL:
            kills_after = _oom_kills()
            if kills_before is not None and kills_after is not None and kills_after > kills_before:
                return (f"out of memory{where}: the bench was killed by the kernel's OOM killer "
                        f"(SIGKILL; cgroup memory.events oom_kill {kills_before} -> {kills_after})"), True
            return f"the bench was killed by SIGKILL{where} (no OOM evidence in this cgroup's memory.events)", False
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"the bench was killed by {name}{where}", False
    if rc == 137:
        return f"the bench exited with status 137{where} (killed; out of memory?)", True
    return f"the bench exited with status {rc}{where} without a result", False


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _die_with_parent() -> None:
    """In the child: SIGKILL when the launcher dies (Linux), so no bench outlives its launcher."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(args: argparse.Namespace, argv: list[str]) -> BenchResult:
    """Run the bench in a child process, keeping the launcher's own clock around each trial."""
    result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryDirectory(prefix="kb_bench.") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", "import sys; from looptree.gpu.kernelbench.runner import main; sys.exit(main(sys.argv[1:]))",
               *argv, "--_child-result", str(out), "--_child-fd", str(write_fd)]
        kills_before = _oom_kills()
        marks: list[_Mark] = []
        pid_box: list[int] = []
        try:
            # preexec_fn is safe here: the launcher starts its reader thread only after the fork
            proc = subprocess.Popen(cmd, pass_fds=(write_fd,), env=_child_env(),  # noqa: PLW1509
                                    preexec_fn=_die_with_parent)
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            result.reason, result.exit_code = f"cannot start the bench process: {exc}", EXIT_PROBLEM
            return result
        pid_box.append(proc.pid)
        os.close(write_fd)
        reader = threading.Thread(target=_read_marks, args=(read_fd, pid_box, marks), daemon=True)
        reader.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        reader.join(timeout=10)
        data: dict[str, Any] | None
        try:
            data = json.loads(out.read_text())
        except (OSError, ValueError):
            data = None
    stages = [m.text for m in marks if m.kind == "S"]
    if data is None:
        stage = stages[-1] if stages else ""
        reason, oom = _death_reason(rc, stage, kills_before)
        result.reason, result.oom, result.stage = reason, oom, stage
        candidate_stage = any(s.startswith(("importing solution", "building ModelNew", "checking correctness",
                                            "correctness trial", "timing ModelNew")) for s in stages[-1:])
        if candidate_stage:
            result.correct, result.exit_code = False, EXIT_CANDIDATE
            if oom:
                result.reason = f"candidate ran {reason}"
        else:
            result.exit_code = EXIT_OOM if oom else EXIT_PROBLEM
        return result
    known = {f.name for f in fields(BenchResult)}
    result = BenchResult(**{k: v for k, v in data.items() if k in known})
    if result.runtime_ms is not None and result.correct:
        why, figures = outside_verdict(data, _phase_figures(marks))
        result.outside = figures
        if why and not result.suspect:
            result.suspect, result.ok, result.exit_code = True, False, EXIT_CANDIDATE
            result.reason = f"suspect: {why}"
    return result


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m looptree.gpu.kernelbench.runner", description=__doc__.split("\n\n")[0],
                                epilog=f"KernelBench protocol mirrored: ScalingIntelligence/KernelBench@{KB_COMMIT[:12]} "
                                       "(src/kernelbench/eval.py, timing.py)")
    p.add_argument("--problem", required=True, help="KernelBench problem file (Model, get_inputs, get_init_inputs)")
    p.add_argument("--solution", default=None, help="file defining ModelNew; without it only the baselines are timed")
    p.add_argument("--reference-only", action="store_true", help="ignore --solution: time only the baselines")
    p.add_argument("--metrics", default=None, help="metrics CSV to write the row to (replaced, never appended)")
    p.add_argument("--json", default=None, help="write the full result as JSON here")
    p.add_argument("--protocol", choices=("looptree", "kernelbench"), default="looptree",
                   help="kernelbench: upstream's timing (100 trials, 3 warm-up, first trial dropped, mean); "
                        "looptree (default): 20 trials on CPU, median. Correctness is KernelBench's in both")
    p.add_argument("--precision", choices=tuple(PRECISION_TOLERANCE), default="fp32",
                   help="dtype of inputs and weights; sets the tolerance (fp32 1e-4, fp16/bf16 1e-2)")
    p.add_argument("--trials", type=int, default=None,
                   help="timed calls per measurement (default 100 on GPU or with --protocol kernelbench, 20 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 on GPU, 2 on CPU)")
    p.add_argument("--discard-first", type=int, default=None,
                   help="timed calls run and dropped (default 1 with --protocol kernelbench, else 0)")
    p.add_argument("--statistic", choices=("mean", "median"), default=None,
                   help="runtime reported (default mean with --protocol kernelbench, else median)")
    p.add_argument("--warmup-seconds", type=float, default=0.2, help="keep calling before timing for this long (default 0.2)")
    p.add_argument("--seeds", type=int, default=5, help="correctness trials, each on fresh inputs (default 5, as KernelBench)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance for floating-point outputs (default by --precision); integers match exactly")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default by --precision)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch threads (default 1; 0 keeps torch's default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (compile_ms = eager)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--compile-timeout", type=float, default=300.0, help="give up on torch.compile after S seconds")
    p.add_argument("--flush", dest="flush", action="store_true", default=None,
                   help="flush caches before each trial (default on GPU)")
    p.add_argument("--no-flush", dest="flush", action="store_false", help="do not flush caches (default on CPU)")
    p.add_argument("--in-process", action="store_true",
                   help="no launcher process: faster, but no clock outside the bench (speed-ups over 10x are then suspect)")
    p.add_argument("--_child-result", dest="child_result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child-fd", dest="child_fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _run_here(args: argparse.Namespace, result: BenchResult) -> None:
    """The bench in this process; fills ``result`` whatever happens."""
    _PROGRESS.fd = args.child_fd
    _PROGRESS.result = result
    try:
        run_bench(args, result)
    except BenchFailure as exc:
        result.ok, result.reason, result.exit_code, result.oom = False, exc.reason, exc.exit_code, exc.oom
        if exc.correct is not None:
            result.correct = exc.correct
    except Exception as exc:  # noqa: BLE001 - an internal error must still leave a reason behind
        if is_oom(exc):
            failure = oom_failure("benchmarking", exc, result.device or "cpu", reference=True)
            result.ok, result.reason, result.exit_code, result.oom = False, failure.reason, EXIT_OOM, True
        else:
            traceback.print_exc()
            result.ok, result.reason, result.exit_code = False, f"internal error: {_one_line(exc)}", EXIT_PROBLEM


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.reference_only:
        args.solution = None
    if args.seeds < 1 or (args.trials is not None and args.trials < 1):
        print("kb_bench: --seeds and --trials must be at least 1", file=sys.stderr)
        return EXIT_PROBLEM
    apply_precision(args)
    if args.child_result is not None:  # the child: bench, write the result for the launcher, nothing else
        result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
        _run_here(args, result)
        Path(args.child_result).write_text(json.dumps(asdict(result), allow_nan=True) + "\n")
        sys.stdout.flush()
        return result.exit_code
    started = _monotonic()
    if args.in_process:
        result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
        _run_here(args, result)
        if result.ok and result.excessive_speedup:
            result.ok, result.suspect, result.exit_code = False, True, EXIT_CANDIDATE
            result.reason = (f"suspect: speed-up {result.speedup_vs_eager:.3g}x exceeds KernelBench's "
                             f"{EXCESSIVE_SPEEDUP:g}x threshold and --in-process has no outside clock to confirm it")
    else:
        result = launch(args, argv)
    try:
        if result.ok and args.metrics:
            write_metrics(args.metrics, result)
        elif args.metrics:
            Path(args.metrics).unlink(missing_ok=True)  # a failed or suspect bench leaves no row to credit
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(result), indent=2, allow_nan=True) + "\n")
    sys.stdout.flush()
    if result.ok:
        parts = [f"eager {result.eager_ms:.4g} ms", f"compile {result.compile_ms:.4g} ms"]
        if result.runtime_ms is not None:
            parts.insert(0, f"ModelNew {result.runtime_ms:.4g} ms")
            parts.append(f"speedup {result.speedup_vs_eager:.3f}x vs eager, {result.speedup_vs_compile:.3f}x vs compile")
        print(f"kb_bench: {'; '.join(parts)} on {result.device} ({_monotonic() - started:.1f} s)", flush=True)
        return EXIT_OK
    print(f"kb_bench: {result.reason}", file=sys.stderr, flush=True)
    return result.exit_code or EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
