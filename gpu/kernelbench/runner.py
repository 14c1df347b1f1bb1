"""Bench one KernelBench task: is ModelNew correct, and how fast is it against eager and compile?

    python -m looptree.gpu.kernelbench.runner --problem problem.py [--solution solution.py] [--metrics metrics.csv]
                           [--json result.json] [--precision fp32|fp16|bf16] [--protocol looptree|kernelbench]

Three processes. The one started by this command (the *launcher*) never imports torch nor any
candidate code. It starts the *reference's process*, which times eager PyTorch and
torch.compile and never imports solution.py, then the *candidate's process*, which imports it.
Nothing a process that ran candidate code writes is evidence: it owns its pipes, its memory, its
clocks and any file it can name. So:
- The launcher clocks every timed trial itself. Each trial is paced by it: the child asks for
  the trial's seed (drawn by the launcher, so no input can be known earlier), says when the
  inputs are made, gets "go" (the launcher's clock starts), says "done" (it stops), then commits a
  digest of the output. The figures (``eager_ms``, ``compile_ms``, ``runtime_ms``, the
  speed-ups) are the launcher's, less its own round trip to the child (calibrated in the
  reference's process), the same way on both sides. Work moved out of the timed call (a "done"
  sent early, a clock slowed inside) shows as a trial that takes longer, on the launcher's clock,
  than its call plus what the reference's trials need besides the call: beyond the tolerance
  (``ACCOUNT_*``) the result is **suspect**; a time the candidate's process claims that is less
  than a third of what the launcher saw is suspect too.
- The reference's process judges: it checks ModelNew's outputs on KernelBench's correctness
  seeds, and on timed trials the launcher picks only after their digests are committed (a few
  at random and the last), against its own reference on the same inputs. Outputs travel as raw
  bytes with a JSON description (never pickled), bounded by the reference's output size.
- The candidate's own report (its result record, its in-process checks, stdout) can only count
  against it: a failure or a tampering it found in itself. Before the launcher writes the JSON
  and the metrics row, every process the candidate started is killed (the launcher is their
  subreaper), the output paths are never passed to a child, and while the candidate runs the
  launcher and the judge are not dumpable (a process of the same user cannot trace them or open
  their pipes through /proc).

The order of work inside a bench process (all of it with ``--in-process``, which has no clock
outside the process: speed-ups over 10x are then suspect; the candidate's process does steps 2-5
the same way, as a second net whose findings only count against it):
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
JUDGED_SHARE = 0.25  # …or this share of them when the judge compares (a cheap wrong output on most trials,
# to move the median, then passes every check with probability below 0.5 ** checks)
OUTSIDE_FACTOR = 3.0  # the launcher's clock may exceed the time the candidate's process claims by this factor…
OUTSIDE_FLOOR_MS = 1.0  # …plus this much, or the claim is a tampered clock (suspect); one scheduling
# delay on a loaded machine (2 cores, CI) is about a millisecond: a smaller floor marked honest runs of
# a 20 µs problem suspect. A forged clock that hides less than this per call is not caught.
RESOLUTION_MS = 0.005  # the launcher's per-trial figure is never taken below this (its clock's resolution)
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
    eager_inside_ms: float | None = None  # the reference's process's own figures (no candidate ran there)
    compile_inside_ms: float | None = None
    runtime_claimed_ms: float | None = None  # what the candidate's process said: never evidence
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


def _time(trials: _Trials | _NoopTrials, args: argparse.Namespace, device: str, phase: str) -> Any:
    """Time ``trials`` in this process; as a launcher's child, every trial is paced (and clocked)
    by the launcher through ``_Paced``: the figures computed here are then only the child's claim."""
    _warm(trials.call, args.warmup_seconds, device)
    hooks: tuple[Callable[[int], None], Callable[[int], None], Callable[[str], None]]
    if _CHAN is not None:
        paced = _Paced(_CHAN, trials)
        hooks = (paced.before, paced.after, paced.mark)
    else:
        hooks = (trials.before, trials.after, _PROGRESS.mark)
    _PROGRESS.phase(phase, f"begin {trials.total}")
    try:
        return _timing.time_callable(trials.call, warmup=args.warmup, trials=args.trials, device=device,
                                     flush_l2=args.flush, discard_first=args.discard_first,
                                     before=hooks[0], after=hooks[1], marker=hooks[2])
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


def run_bench(args: argparse.Namespace, result: BenchResult, role: str = "all") -> tuple[Any, Any] | None:
    """The bench; raises BenchFailure on any verdict other than success.

    ``role``: ``all`` (``--in-process``: everything here), ``reference`` (the launcher's trusted
    child: the baselines, the calibration and the correctness seeds; returns the task and the
    reference for judging) or ``candidate`` (the launcher's untrusted child: ModelNew only; its
    outputs go to the judge, and every figure it computes is only its claim)."""
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
        if role == "reference":
            # The same per-trial work as in the candidate's process (a guard restored around each
            # trial), so the launcher can compare what each side's trials cost outside the call.
            task.guard = ProcessGuard([("problem", module), *_reference_classes(reference)],
                                      threads=result.threads if device == "cpu" else None)
        if role != "candidate":
            with _stage("timing the eager reference", device, reference=True):
                eager = _time(_Trials(task, reference, args, guard=task.guard), args, device, "time:eager")
            result.eager_ms = _stat(eager, args)
            result.eager_median_ms, result.eager_mean_ms = float(eager.median), float(eager.mean)
            result.eager_wall_ms = _wall(eager)
            result.timing_method = eager.method
            result.compile_ms = _time_compile(task, reference, args, device, result.eager_ms, result)
        if role == "reference":
            with _stage("calibrating the launcher's clock", device, reference=True):
                _time(_NoopTrials(args), args, device, "calibrate")
            result.seeds_checked = kernelbench_trial_seeds(args.seeds)
            if fp_out and not any(t.is_floating_point() or t.is_complex() for t in fp_out):
                args.atol = args.rtol = None  # integer outputs (indices, counts) must match exactly
            result.atol, result.rtol = args.atol, args.rtol
            task.guard = None
            result.ok = True
            return task, reference
        if args.solution is None:
            result.ok = True
            return None

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
        if role == "candidate":  # the verdict that counts: the judge's, on outputs sent to it
            _send_for_judging(task, candidate, args, device)
        result.correct = True

        # 3. timing the candidate, each trial on fresh inputs, a few outputs spot-checked (by the
        # judge when paced by the launcher: it picks the trials once their outputs are committed)
        with _stage("timing ModelNew", device, reference=False):
            trials = _Trials(task, candidate, args, reference=reference if role == "all" else None, guard=guard,
                             on_tamper=tampered)
            timing = _time(trials, args, device, "time:candidate")
            del trials
    result.tampering = tampering
    runtime = _stat(timing, args)
    result.runtime_ms = runtime
    result.runtime_median_ms, result.runtime_mean_ms = float(timing.median), float(timing.mean)
    result.runtime_wall_ms = _wall(timing)
    if result.eager_ms is not None:
        result.speedup_vs_eager = result.eager_ms / runtime if runtime > 0 else math.inf
        result.speedup_vs_compile = (result.compile_ms or 0.0) / runtime if runtime > 0 else math.inf
        result.excessive_speedup = result.speedup_vs_eager > EXCESSIVE_SPEEDUP
    if tampering:
        result.suspect = True
        raise BenchFailure(f"suspect: solution.py tampered with the process: {'; '.join(tampering)}",
                           EXIT_CANDIDATE, correct=True)
    result.ok = True
    return None


def _wall(timing: Any) -> float:
    """Median host span of a trial (CUDA: launch to whole-device sync; CPU: the trial itself)."""
    walls = getattr(timing, "wall_times_ms", None) or timing.times_ms
    return float(statistics.median(walls))


class _NoopTrials:
    """Empty paced trials: the launcher learns its own round trip to the child from them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.total = args.trials + args.discard_first
        self.seeds = [0] * self.total
        self.out: Any = None

    def call(self) -> None:
        self.out = None

    def before(self, i: int) -> None:
        pass

    def after(self, i: int) -> None:
        pass


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


# --------------------------------------------------------------------------- the children's side


class _FdReader:
    """Lines and exact byte counts from a pipe, with a bound on a line (a hostile writer)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def readline(self, limit: int) -> bytes | None:
        """The next line without its newline; None at end of file; ValueError past ``limit``."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 1]
                return line
            if len(self.buf) > limit:
                raise ValueError(f"a line longer than {limit} bytes")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk

    def readinto(self, view: memoryview) -> bool:
        """Fill ``view`` exactly; False when the pipe ends first."""
        take = min(len(view), len(self.buf))
        view[:take] = self.buf[:take]
        del self.buf[:take]
        pos = take
        while pos < len(view):
            got = os.readv(self.fd, [view[pos:]])
            if got == 0:
                return False
            pos += got
        return True


class _Chan:
    """A child's end of the launcher's pipes: lines out (shared with the stage lines), commands in."""

    def __init__(self, cmd_fd: int, judge_fd: int | None) -> None:
        self.commands = _FdReader(cmd_fd)
        self.judge_fd = judge_fd  # the candidate: outputs to the judge; the reference: outputs from it

    def send(self, line: str) -> None:
        _PROGRESS.send(line)

    def recv(self) -> str:
        line = self.commands.readline(4096)
        if line is None:
            raise BenchFailure("the launcher went away", EXIT_PROBLEM)
        return line.decode(errors="replace")


_CHAN: _Chan | None = None  # set in the launcher's children: trials are paced by the launcher


class _Paced:
    """One trial's handshake with the launcher, around ``time_callable``'s own hooks.

    ``A`` asks for the trial's seed (the launcher draws it, so nothing in this process can know
    it earlier), ``R`` says the inputs are made (the launcher answers ``G`` and starts its clock),
    ``D`` says the call returned (the launcher stops its clock), ``H`` commits a digest of the
    output before the launcher says whether the judge wants it (``V nonce``) or not (``N``): the
    work has to be done by then, and the launcher clocks that too."""

    def __init__(self, chan: _Chan, trials: Any) -> None:
        self.chan = chan
        self.trials = trials

    def before(self, i: int) -> None:
        self.chan.send("A")
        self.trials.seeds[i] = int(self.chan.recv())
        self.trials.before(i)

    def mark(self, what: str) -> None:
        if what == "B":
            self.chan.send("R")
            if self.chan.recv() != "G":
                raise BenchFailure("the launcher broke the trial protocol", EXIT_PROBLEM)
        elif what == "E":
            self.chan.send("D")

    def after(self, i: int) -> None:
        out = self.trials.out
        self.trials.after(i)
        header, leaves = _encode_output(out)
        self.chan.send(f"H {_output_digest(header, leaves)}")
        answer = self.chan.recv()
        if answer.startswith("V "):
            _send_output(self.chan.judge_fd, answer[2:], header, leaves)
            self.chan.send("O")
        self.trials.out = None


# An output travels to the judge as: the nonce line, a JSON header line describing the structure
# (tensors by dtype and shape, numbers by value), then each tensor's raw bytes. Never pickle: the
# judge must not run code the candidate chose.
_FRAME_HEADER_MAX = 1 << 20
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "complex64", "complex128", "int8", "int16",
                "int32", "int64", "uint8", "bool")


def _encode_output(value: Any) -> tuple[bytes, list[Any]]:
    """(the JSON description, the tensors in the order their bytes follow)."""
    leaves: list[Any] = []
    tree = _describe_output(value, leaves)
    return json.dumps(tree, sort_keys=True, separators=(",", ":")).encode(), leaves


def _describe_output(v: Any, leaves: list[Any]) -> Any:
    # A module-level function, not a closure: a recursive closure is a reference cycle, which
    # kept every trial's output alive until the garbage collector happened to run.
    import torch

    if isinstance(v, torch.Tensor):
        leaves.append(v.detach())
        return {"t": str(v.dtype).removeprefix("torch."), "shape": [int(d) for d in v.shape]}
    if isinstance(v, (list, tuple)):
        return {"l": [_describe_output(x, leaves) for x in v]}
    if isinstance(v, dict):
        return {"d": [[str(k), _describe_output(x, leaves)] for k, x in v.items()]}
    if v is None:
        return {"n": 0}
    if isinstance(v, (bool, int, float)):
        return {"s": v}
    return {"o": repr(v)[:200]}


def _leaf_chunks(t: Any) -> Iterator[Any]:
    import torch

    from looptree.gpu.bench.correctness import CHUNK

    flat = t.reshape(-1)
    for i in range(0, flat.numel(), CHUNK):
        part = flat[i:i + CHUNK].to("cpu").contiguous()
        if part.dtype == torch.bool:
            part = part.to(torch.uint8)
        yield part.view(torch.uint8).numpy()


def _output_digest(header: bytes, leaves: list[Any]) -> str:
    import hashlib

    h = hashlib.blake2b(header, digest_size=16)
    for t in leaves:
        for chunk in _leaf_chunks(t):
            h.update(chunk)
    return h.hexdigest()


def _write_all(fd: int | None, data: Any) -> None:
    if fd is None:
        raise BenchFailure("no pipe to the judge", EXIT_PROBLEM)
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _send_output(fd: int | None, nonce: str, header: bytes, leaves: list[Any]) -> None:
    _write_all(fd, nonce.encode() + b"\n" + header + b"\n")
    for t in leaves:
        for chunk in _leaf_chunks(t):
            _write_all(fd, chunk)


def _read_output(reader: _FdReader, nonce: str, max_bytes: int) -> tuple[Any, str]:
    """The judge's side: (the output, its digest); _Fail on anything malformed or too large."""
    import hashlib

    import torch

    from looptree.gpu.bench.correctness import _Fail

    line = reader.readline(256)
    if line is None:
        raise _Fail("ModelNew's process sent no output (it ended first)")
    if line.decode(errors="replace") != nonce:
        raise _Fail("ModelNew's process sent something other than the output asked for")
    try:
        header = reader.readline(_FRAME_HEADER_MAX)
    except ValueError:
        raise _Fail("the output's description is larger than 1 MiB") from None
    if header is None:
        raise _Fail("ModelNew's process sent no output (it ended first)")
    h = hashlib.blake2b(header, digest_size=16)
    try:
        tree = json.loads(header)
    except ValueError:
        raise _Fail("the output's description is not JSON") from None
    total = [0]
    dtypes = {name: getattr(torch, name) for name in _DTYPE_NAMES}

    def dec(node: Any, depth: int = 0) -> Any:
        if depth > 64 or not isinstance(node, dict) or len(node) not in (1, 2):
            raise _Fail("the output's description is malformed")
        if "t" in node:
            dtype, shape = dtypes.get(node["t"]), node.get("shape")
            if dtype is None or not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape):
                raise _Fail(f"an output tensor of an unsupported dtype or shape ({str(node)[:80]})")
            numel = math.prod(shape)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            total[0] += nbytes
            if total[0] > max_bytes:
                raise _Fail(f"the output is larger than the reference's ({total[0]} bytes so far)")
            if nbytes == 0:
                return torch.empty(shape, dtype=dtype)
            buf = bytearray(nbytes)
            if not reader.readinto(memoryview(buf)):
                raise _Fail("ModelNew's process sent a truncated output")
            h.update(buf)
            raw = torch.frombuffer(buf, dtype=torch.uint8)
            return raw.view(dtype).reshape(shape)
        if "l" in node and isinstance(node["l"], list):
            return [dec(x, depth + 1) for x in node["l"]]
        if "d" in node and isinstance(node["d"], list):
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in node["d"]):
                raise _Fail("the output's description is malformed")
            return {str(k): dec(v, depth + 1) for k, v in node["d"]}
        if "n" in node:
            return None
        if "s" in node and isinstance(node["s"], (bool, int, float)):
            return node["s"]
        if "o" in node:
            return str(node["o"])
        raise _Fail("the output's description is malformed")

    value = dec(tree)
    return value, h.hexdigest()


def _send_for_judging(task: Task, candidate: Any, args: argparse.Namespace, device: str) -> None:
    """The candidate's outputs on KernelBench's correctness seeds, one at a time, to the judge."""
    assert _CHAN is not None
    from looptree.gpu.bench.correctness import _device_sync

    for seed in kernelbench_trial_seeds(args.seeds):
        with _stage(f"sending ModelNew's output on seed {seed} to the judge", device, reference=False):
            out = candidate(*task.make_inputs(seed))
            _device_sync()
            header, leaves = _encode_output(out)
            _CHAN.send(f"C {seed}")
            answer = _CHAN.recv()
            if not answer.startswith("V "):
                raise BenchFailure("the launcher broke the judging protocol", EXIT_PROBLEM)
            _send_output(_CHAN.judge_fd, answer[2:], header, leaves)
            _CHAN.send("O")
            del out, leaves


def _judge(chan: _Chan, task: Task, reference: Any, args: argparse.Namespace) -> None:
    """The reference's process, once its own figures are sent: compare what the candidate's process
    sends with the reference's output on the same seed, with the correctness checks (values at
    the tolerance, NaN, all zeros, an input handed back, one output for different inputs), and
    check that a timed trial's output is the one whose digest was committed when it ended.

    Commands: ``J <seed> <nonce> <digest or -> <c|t>``; answers ``J ok <max abs err>`` or
    ``J fail <reason>`` (after a failure the stream is out of step: judging ends)."""
    from looptree.gpu.bench.correctness import (
        _all_zero,
        _check_pair,
        _device_sync,
        _digests,
        _Fail,
        _leaves,
        _pairs,
        _structure,
    )

    reader = _FdReader(chan.judge_fd) if chan.judge_fd is not None else None
    previous: tuple[list[bytes], list[bytes]] | None = None
    while True:
        line = chan.commands.readline(4096)
        if line is None or line == b"Q" or reader is None:
            return
        try:
            _, seed_text, nonce, committed, kind = line.decode().split()
            seed = int(seed_text)
        except ValueError:
            chan.send("J fail the launcher sent a malformed judging command")
            return
        try:
            inputs = task.make_inputs(seed)
            in_digests = _digests(list(_leaves(_structure(inputs, "input"))))
            expected = reference(*inputs)
            _device_sync()
            del inputs
            ref_s = _structure(expected)
            ref_leaves = list(_leaves(ref_s))
            ref_bytes = sum(t.numel() * t.element_size() for t in _tensors(expected))
            got, digest = _read_output(reader, nonce, 2 * ref_bytes + (1 << 20))
            if committed != "-" and digest != committed:
                raise _Fail("the output sent for checking is not the one ModelNew's trial committed to when it "
                            "ended (its digest differs): the work was not done inside the trial")
            cand_s = _structure(got)
            worst = 0.0
            for r, c in _pairs(ref_s, cand_s):
                err, _rel = _check_pair(r, c, True, [], in_digests, [], args.atol, args.rtol)
                worst = max(worst, err)
            if kind == "c":
                ref_d, cand_d = _digests(ref_leaves), _digests(list(_leaves(cand_s)))
                if previous is not None and ref_d != previous[0] and cand_d == previous[1]:
                    raise _Fail(f"the same output for different inputs (seed {seed} vs the previous seed) although "
                                "the reference's changed: cached result?")
                previous = (ref_d, cand_d)
                if any(c.comparable and c.size > 0 and _all_zero(c) for c in _leaves(cand_s)) and not any(
                        r.comparable and r.size > 0 and _all_zero(r) for r in ref_leaves):
                    raise _Fail("output is all zeros (the reference's is not)")
            chan.send(f"J ok {worst!r}")
            del expected, got, ref_s, cand_s, ref_leaves
        except _Fail as fail:
            chan.send("J fail " + " ".join(fail.reason.split())[:400])
            return
        except Exception as exc:  # noqa: BLE001 - the judge must answer, whatever the data did to it
            what = "oom" if is_oom(exc) else "error"  # the judge's failure, not the candidate's
            chan.send(f"J {what} the judge could not check the output ({_clip(_one_line(exc), 300)})")
            return


def _set_dumpable(on: bool) -> None:
    """PR_SET_DUMPABLE: a process that is not dumpable cannot be traced, nor its memory or file
    descriptors opened through /proc, by another process of the same user without privileges."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 1 if on else 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


def _child_main(args: argparse.Namespace) -> int:
    """A launcher's child: the reference (trusted: it never imports the candidate, then judges) or
    the candidate (untrusted: whatever it reports can only count against it)."""
    global _CHAN
    role = args.child_role
    if role == "reference":
        _set_dumpable(False)  # the candidate's process, a sibling, cannot reach into the judge
    _CHAN = _Chan(args.child_cmd_fd, args.child_judge_fd)
    result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
    judged = _run_here(args, result, role=role)
    _CHAN.send("X " + json.dumps(asdict(result), allow_nan=True))
    sys.stdout.flush()
    if judged is not None and args.solution:
        torch = sys.modules.get("torch")
        if torch is not None and result.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the candidate's process shares the device
        _give_back_memory()  # the candidate's process runs beside this one now
        with torch.no_grad() if torch is not None else _nullcontext():
            _judge(_CHAN, judged[0], judged[1], args)
    return result.exit_code


def _give_back_memory() -> None:
    """Return the heap the timing freed to the system (glibc keeps it otherwise)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


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


# --------------------------------------------------------------------------- the launcher


# The tolerance of the launcher's accounting: a candidate's trial (seed asked → digest committed)
# may exceed its timed call plus what the reference's trials spend outside the call by
ACCOUNT_FRAC = 0.5  # this share of the call…
ACCOUNT_FLOOR_MS = 1.0  # …plus this much (a scheduling delay under load) plus 5 round trips of the pipe…
ACCOUNT_SLACK_MS = 0.25  # …plus this much (absolute: a share of the digest's time is room to hide a kernel
# still running when "done" came, finished by the digest's own device-to-host copy)…
ACCOUNT_NOISE = 2.0  # …plus this many times its spread (median − least): a loaded machine's clock confirms less


class _ProtocolBroken(Exception):
    pass


@dataclass
class _Trial:
    seed: int
    a: int  # ns on the launcher's clock: the child asked for the seed
    r: int = 0  # the inputs were made
    g: int = 0  # the launcher said go
    d: int = 0  # the call returned
    h: int = 0  # the output's digest was committed


@dataclass
class _Phase:
    name: str
    total: int
    begin_ns: int
    begin_cpu: float | None
    trials: list[_Trial] = field(default_factory=list)
    spots: set[int] = field(default_factory=set)
    end_ns: int | None = None
    end_cpu: float | None = None


@dataclass
class _Session:
    """What the launcher saw of one child, on its own clock."""

    phases: dict[str, _Phase] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None
    judged: list[int] = field(default_factory=list)  # correctness seeds the judge accepted
    max_abs_err: float = 0.0
    failure: str = ""  # the judge's or the protocol's verdict against the candidate
    failure_kind: str = ""  # "incorrect" | "suspect" | "protocol" | "judge" (the judge's own failure)
    oom: bool = False  # the judge's failure was out of memory
    ended: set[str] = field(default_factory=set)  # phases begun and ended, complete or not: never begun again


def _child_cpu_seconds(pid: int) -> float | None:
    """utime + stime of every thread of ``pid`` (Linux /proc; the kernel's count), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode(errors="replace")
        rest = data[data.rindex(")") + 2:].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Child:
    """One bench child: its lines stamped on receipt by a reader thread, commands written to it."""

    def __init__(self, role: str, argv: list[str], judge_fd: int) -> None:
        import queue

        self.role = role
        msg_r, msg_w = os.pipe()
        cmd_r, cmd_w = os.pipe()
        cmd = [sys.executable, "-c", "import sys; from looptree.gpu.kernelbench.runner import main; sys.exit(main(sys.argv[1:]))",
               *argv, "--_child-role", role, "--_child-fd", str(msg_w), "--_child-cmd-fd", str(cmd_r),
               "--_child-judge-fd", str(judge_fd)]
        self.lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        try:
            # preexec_fn is safe here: the reader thread starts only after the fork
            self.proc = subprocess.Popen(cmd, pass_fds=(msg_w, cmd_r, judge_fd), env=_child_env(),  # noqa: PLW1509
                                         preexec_fn=_die_with_parent)
        finally:
            os.close(msg_w)
            os.close(cmd_r)
        self.cmd_fd = cmd_w
        self.reader = threading.Thread(target=self._read, args=(msg_r,), daemon=True)
        self.reader.start()

    def _read(self, fd: int) -> None:
        reader = _FdReader(fd)
        try:
            while True:
                try:
                    raw = reader.readline(16 << 20)
                except ValueError:
                    raw = None
                now = _monotonic_ns()
                if raw is None:
                    return
                self.lines.put((now, raw.decode(errors="replace")))
        except OSError:
            return
        finally:
            self.lines.put((_monotonic_ns(), None))
            os.close(fd)

    def get(self) -> tuple[int, str | None]:
        """The next line with its time of arrival; None once the child has ended (a process it left
        behind holding the pipe open does not keep the launcher waiting)."""
        import queue

        while True:
            try:
                return self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    return _monotonic_ns(), None

    def send(self, text: str) -> int:
        """Write one command; returns the launcher's clock just before it left."""
        now = _monotonic_ns()
        try:
            os.write(self.cmd_fd, (text + "\n").encode())
        except OSError:
            pass  # the child is gone; its end of file says so
        return now

    def close(self, grace: float | None = None) -> int:
        try:
            os.close(self.cmd_fd)
        except OSError:
            pass
        try:
            if grace is not None:
                try:
                    return self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            return self.proc.wait()
        except KeyboardInterrupt:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            raise


JUDGE_GRACE_S = 10.0  # the judge may take this long to answer once the candidate's process has ended


def _judge_answer(judge: _Child, cand: _Child | None = None) -> tuple[str, str]:
    """("ok" | "fail" | "oom" | "error" | "stuck", the rest of the answer). "oom"/"error" are the
    judge's own failures; "stuck": the candidate's process ended and the judge still waits on its
    output (a process the candidate left holds the pipe open), so the launcher stops waiting."""
    import queue

    deadline: float | None = None
    while True:
        try:
            _, line = judge.lines.get(timeout=0.2)
        except queue.Empty:
            if judge.proc.poll() is not None and judge.lines.empty():
                line = None
            elif cand is not None and cand.proc.poll() is not None:
                deadline = deadline or _monotonic() + JUDGE_GRACE_S
                if _monotonic() > deadline:
                    return "stuck", (f"ModelNew's process ended and, {JUDGE_GRACE_S:g} s later, the judge still "
                                     "waited on the rest of its output (a process it left holds the pipe open)")
                continue
            else:
                continue
        if line is None:
            rc = judge.proc.poll()
            why, oom = _death_reason(rc, "judging", None) if rc else ("ended", False)
            return ("oom" if oom else "error"), f"the judge (the reference's process) {why} before answering"
        for word in ("ok", "fail", "oom", "error"):
            if line.startswith(f"J {word}"):
                return word, line[len(word) + 3:]


def _judge_failed(session: _Session, verdict: str, why: str) -> bool:
    """Record a judging answer that is not "ok" and say whether there was one: the judge's own
    failure (out of memory included) is not held against the candidate."""
    if verdict == "ok":
        return False
    if verdict in ("oom", "error"):
        session.failure_kind, session.oom = "judge", verdict == "oom"
        session.failure = f"internal error: {'out of memory: ' if session.oom else ''}{why}"
    else:
        session.failure_kind = "protocol" if verdict == "stuck" else "incorrect"
        session.failure = why
    return True


def _drive(child: _Child, session: _Session, *, judge: _Child | None = None, seeds: list[int] | None = None,
           trials: int | None = None, phases: tuple[str, ...] = ()) -> None:
    """Serve one child's trials on the launcher's clock until its result record (the reference)
    or its end (the candidate). Anything out of protocol from the candidate ends its session."""
    phase: _Phase | None = None
    trial: _Trial | None = None
    rng = random.SystemRandom()
    while True:
        ns, line = child.get()
        if line is None:
            return
        kind, _, text = line.partition(" ")
        try:
            if kind == "S":
                session.stages.append(text[:300])
            elif kind == "P":
                name, _, event = text.partition(" ")
                if event.startswith("begin") and name in session.ended:
                    # a phase dropped part way may not begin again with fresh spot checks: that would
                    # let the candidate abort every window that went badly for it
                    raise _ProtocolBroken(f"the timed phase {name[:40]!r} begun again after it ended incomplete")
                if event.startswith("begin") and phase is None and name in phases and name not in session.phases:
                    total = int(event.split()[1])
                    if trials is not None and total != trials:
                        raise _ProtocolBroken(f"{total} timed trials announced where the reference had {trials}")
                    phase = _Phase(name, total, ns, _child_cpu_seconds(child.proc.pid))
                    if judge is not None and total > 0:
                        checks = min(max(SPOT_CHECKS, int(JUDGED_SHARE * total)), total - 1)
                        phase.spots = set(rng.sample(range(total - 1), checks)) | {total - 1}
                elif event == "end" and phase is not None and phase.name == name:
                    session.ended.add(name)
                    if len(phase.trials) == phase.total:  # else it failed part way: its record says why
                        phase.end_ns, phase.end_cpu = ns, _child_cpu_seconds(child.proc.pid)
                        session.phases[name] = phase
                    phase, trial = None, None
                else:
                    raise _ProtocolBroken(f"unexpected phase line {line[:80]!r}")
            elif kind == "A" and phase is not None and trial is None and len(phase.trials) < phase.total:
                trial = _Trial(seed=secrets.randbelow(2**31 - 2) + 1, a=ns)
                child.send(str(trial.seed))
            elif kind == "R" and trial is not None and not trial.r:
                trial.r = ns
                trial.g = child.send("G")
            elif kind == "D" and trial is not None and trial.g and not trial.d:
                trial.d = ns
            elif kind == "H" and trial is not None and trial.d and phase is not None:
                trial.h = ns
                index = len(phase.trials)
                phase.trials.append(trial)
                digest = text.strip()
                if judge is not None and index in phase.spots:
                    if not all(c in "0123456789abcdef" for c in digest) or not digest:
                        raise _ProtocolBroken("a malformed output digest")
                    nonce = secrets.token_hex(8)
                    judge.send(f"J {trial.seed} {nonce} {digest} t")
                    child.send(f"V {nonce}")
                    verdict, why = _judge_answer(judge, child)
                    if verdict == "fail":
                        last = index == phase.total - 1
                        what = ("after its inputs were overwritten in place with new values" if last
                                else f"while being timed (trial {index})")
                        why = (f"incorrect: an output ModelNew produced {what} differs from the "
                               f"reference's on the same inputs (cached or precomputed?): {why}")
                    if _judge_failed(session, verdict, why):
                        return
                else:
                    child.send("N")
                trial = None
            elif kind == "C" and judge is not None and seeds is not None and phase is None:
                seed = int(text)
                if len(session.judged) >= len(seeds) or seed != seeds[len(session.judged)]:
                    raise _ProtocolBroken(f"an output for seed {seed} where the judge expected another")
                nonce = secrets.token_hex(8)
                judge.send(f"J {seed} {nonce} - c")
                child.send(f"V {nonce}")
                verdict, why = _judge_answer(judge, child)
                if verdict == "fail":
                    why = f"incorrect: ModelNew's output differs from Model's (seed {seed}): {why}"
                if _judge_failed(session, verdict, why):
                    return
                session.judged.append(seed)
                try:
                    session.max_abs_err = max(session.max_abs_err, float(why))
                except ValueError:
                    pass
            elif kind == "O":
                pass
            elif kind == "X" and session.record is None:
                record = json.loads(text)
                session.record = record if isinstance(record, dict) else {}
                return  # the reference judges next; the candidate's process has nothing more to say
            else:
                raise _ProtocolBroken(f"unexpected line {line[:80]!r}")
        except (_ProtocolBroken, ValueError, IndexError, TypeError, RecursionError) as exc:
            who = "ModelNew's process" if judge is not None else "the reference's process"
            session.failure_kind = "protocol"
            what = "a record nested too deeply" if isinstance(exc, RecursionError) else _clip(exc, 200)
            session.failure = f"{who} broke the bench's protocol ({what})"
            return


def _ms(ns: int) -> float:
    return ns / 1e6


def _figures(phase: _Phase | None, latency: float, discard: int, statistic: str) -> dict[str, Any]:
    """The launcher's figures for one phase: the call (go → done, less its own round trip), what
    each trial cost outside the call (making inputs, the digest), and each trial in all."""
    if phase is None or not phase.trials:
        return {}
    kept = phase.trials[discard:] or phase.trials
    calls = [max(RESOLUTION_MS, _ms(t.d - t.g) - latency) for t in kept]
    outside = [_ms(t.r - t.a) + _ms(t.h - t.d) for t in kept]
    whole = [_ms(t.h - t.a) for t in kept]
    fig: dict[str, Any] = {
        "inputs_ms": statistics.median([_ms(t.r - t.a) for t in kept]),
        "digest_ms": statistics.median([_ms(t.h - t.d) for t in kept]),
        "ms": statistics.fmean(calls) if statistic == "mean" else statistics.median(calls),
        "median_ms": statistics.median(calls), "mean_ms": statistics.fmean(calls), "least_ms": min(calls),
        "outside_ms": statistics.median(outside), "whole_ms": statistics.median(whole), "trials": len(kept),
        # the least a trial cost besides its call: load spikes on a shared machine only ever add
        "least_outside_ms": min(outside), "least_besides_call_ms": min(w - c for w, c in zip(whole, calls)),
    }
    if phase.end_ns is not None and phase.begin_cpu is not None and phase.end_cpu is not None:
        wall = (phase.end_ns - phase.begin_ns) / 1e9
        fig["wall_s"] = wall
        if wall > 0:
            fig["cores"] = (phase.end_cpu - phase.begin_cpu) / wall
    return fig


def _clip(value: Any, n: int = 400) -> str:
    return " ".join(str(value).split())[:n]


def _descendants(roots: set[int]) -> list[int]:
    """Every live process below ``roots`` or this process's new children (Linux /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read().decode(errors="replace")
            parent[int(entry)] = int(data[data.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found: list[int] = []
    frontier = set(roots)
    while frontier:
        kids = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in found}
        found += sorted(kids)
        frontier = kids
    return found


def _end_candidate_tree(pid: int, before: set[int]) -> None:
    """Kill the candidate's process and everything it started, orphans included (this process is
    their subreaper), so none can write a file after the launcher has written the result."""
    me = os.getpid()
    for _ in range(20):
        strays = _descendants({pid}) + [p for p in _descendants({me}) if p not in before and p != pid]
        if not strays:
            return
        for victim in strays:
            try:
                os.kill(victim, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)
        for victim in strays:  # orphans reparented here are ours to reap (only those: never -1)
            try:
                os.waitpid(victim, os.WNOHANG)
            except ChildProcessError:
                pass


def _child_argv(argv: list[str]) -> list[str]:
    """The bench's arguments without the output paths: no child needs to know where they are."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json", "--metrics"):
            skip = True
            continue
        if a.startswith(("--json=", "--metrics=")):
            continue
        out.append(a)
    return out


def _death(child: _Child, session: _Session, rc: int, kills_before: int | None) -> tuple[str, bool]:
    stage = session.stages[-1] if session.stages else ""
    return _death_reason(rc, stage, kills_before)


def launch(args: argparse.Namespace, argv: list[str]) -> BenchResult:
    """Run the reference and then the candidate in child processes, each trial paced and clocked by
    the launcher; the reference's process judges the candidate's outputs. Numbers come from the
    launcher's clock and the reference's process only: the candidate's process can make its own
    result worse (a failure, a self-confessed tampering), never better."""
    result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
    child_argv = _child_argv(argv)
    judge_r, judge_w = os.pipe()
    kills_before = _oom_kills()
    try:
        ref = _Child("reference", child_argv, judge_r)
    except OSError as exc:
        os.close(judge_r)
        os.close(judge_w)
        result.reason, result.exit_code = f"cannot start the bench process: {exc}", EXIT_PROBLEM
        return result
    os.close(judge_r)
    ref_session = _Session()
    cand: _Child | None = None
    before: set[int] | None = None
    try:
        _drive(ref, ref_session, phases=("time:eager", "time:compile", "calibrate"))
        record = ref_session.record
        if record is None or ref_session.failure:
            os.close(judge_w)
            rc = ref.close()
            if ref_session.failure:
                result.reason, result.exit_code = f"internal error: {ref_session.failure}", EXIT_PROBLEM
                return result
            reason, oom = _death(ref, ref_session, rc, kills_before)
            stage = ref_session.stages[-1] if ref_session.stages else ""
            result.reason, result.oom, result.stage = reason, oom, stage
            result.exit_code = EXIT_OOM if oom else EXIT_PROBLEM
            return result
        known = {f.name for f in fields(BenchResult)}
        trusted = BenchResult(**{k: v for k, v in record.items() if k in known})
        result = trusted  # the reference's process never ran candidate code: its record is evidence
        result.solution = str(args.solution) if args.solution else None
        if not trusted.ok:
            os.close(judge_w)
            ref.close()
            return result
        result.ok = False
        statistic, discard = trusted.statistic, args.discard_first or 0
        calib = ref_session.phases.get("calibrate")
        # the least empty round trip: a median over-subtracts whenever the load eases afterwards,
        # and a call of a few microseconds then reads as nothing (a speed-up from noise)
        latency = min(_ms(t.d - t.g) for t in calib.trials) if calib and calib.trials else 0.0
        eager = _figures(ref_session.phases.get("time:eager"), latency, discard, statistic)
        compiled = _figures(ref_session.phases.get("time:compile"), latency, discard, statistic)
        outside: dict[str, Any] = {"latency_ms": round(latency, 6), "eager": eager}
        result.eager_inside_ms, result.compile_inside_ms = trusted.eager_ms, trusted.compile_ms
        result.eager_ms = eager.get("ms")
        result.eager_median_ms, result.eager_mean_ms = eager.get("median_ms"), eager.get("mean_ms")
        result.compile_ms = compiled.get("ms", result.eager_ms)
        result.timing_method = "launcher_clock"
        outside["eager_ms"] = result.eager_ms
        result.outside = outside
        if args.solution is None or result.eager_ms is None:
            os.close(judge_w)
            ref.close()
            result.ok = result.eager_ms is not None
            if not result.ok:
                result.reason, result.exit_code = "the launcher saw no timed trial of the reference", EXIT_PROBLEM
            return result

        # the candidate: everything it says is a claim; the judge and the launcher's clock decide
        seeds = list(trusted.seeds_checked)
        result.seeds_checked = []
        _set_child_subreaper()
        before = set(_descendants({os.getpid()}))
        _set_dumpable(False)  # the candidate's process cannot trace the launcher nor open its pipes
        try:
            cand = _Child("candidate", child_argv, judge_w)
        except OSError as exc:
            result.reason, result.exit_code = f"cannot start the bench process: {exc}", EXIT_PROBLEM
            return result
        finally:
            os.close(judge_w)
        cand_session = _Session()
        eager_phase = ref_session.phases.get("time:eager")
        _drive(cand, cand_session, judge=ref, seeds=seeds, trials=eager_phase.total if eager_phase else None,
               phases=("time:candidate",))
        if cand_session.failure:
            cand.proc.kill()
        rc = cand.close(grace=30)
        _end_candidate_tree(cand.proc.pid, before)
        _set_dumpable(True)
        ref.send("Q")
        ref.close()
        _verdict(result, cand_session, rc, kills_before, seeds, latency, eager, args)
        return result
    finally:
        _set_dumpable(True)
        if cand is not None and cand.proc.poll() is None:
            cand.proc.kill()
            cand.proc.wait()
        if cand is not None and before is not None:
            _end_candidate_tree(cand.proc.pid, before)
        if ref.proc.poll() is None:
            ref.proc.kill()
            ref.proc.wait()


def _set_child_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _verdict(result: BenchResult, session: _Session, rc: int, kills_before: int | None, seeds: list[int],
             latency: float, eager: dict[str, Any], args: argparse.Namespace) -> None:
    """The candidate's result from what the launcher and the judge saw; its own record only counts
    against it (a failure, tampering it found in itself)."""
    result.seeds_checked = list(session.judged)
    result.max_abs_err = session.max_abs_err if session.judged else None
    claim = session.record or {}
    result.stage = session.stages[-1] if session.stages else ""
    fail = EXIT_CANDIDATE
    if session.failure_kind == "judge":  # not the candidate's fault: no verdict on it
        result.correct, result.oom = None, session.oom
        result.reason, result.exit_code = session.failure, EXIT_OOM if session.oom else EXIT_PROBLEM
        return
    if not session.failure and (bad := _record_problem(claim)):
        session.failure_kind, session.failure = "protocol", f"ModelNew's process sent a malformed result record ({bad})"
    if session.failure:
        result.correct = False if session.failure_kind != "suspect" else result.correct
        result.suspect = session.failure_kind == "suspect"
        result.reason, result.exit_code = session.failure, fail
        return
    result.tampering = [_clip(t, 300) for t in claim.get("tampering") or []][:20]
    if not session.record:
        reason, oom = _death_reason(rc, result.stage, kills_before) if rc != 0 else (
            "the candidate's process ended without a result", False)
        result.correct, result.oom, result.exit_code = False, oom, fail
        result.reason = f"candidate ran {reason}" if oom else reason
        return
    if claim.get("ok") is not True:
        result.correct = session.judged == seeds and claim.get("correct") is True
        result.suspect = bool(claim.get("suspect"))
        result.oom = bool(claim.get("oom"))
        reason = _clip(claim.get("reason") or "ModelNew failed")
        result.reason, result.exit_code = reason, fail
        if result.suspect and not reason.startswith("suspect"):
            result.reason = f"suspect: {reason}"
        return
    if session.judged != seeds:
        result.correct, result.exit_code = False, fail
        result.reason = (f"incorrect: the judge saw ModelNew's outputs on {len(session.judged)} of the "
                         f"{len(seeds)} correctness seeds")
        return
    phase = session.phases.get("time:candidate")
    if phase is None:
        result.correct, result.exit_code = False, fail
        result.reason = "ModelNew was not timed to the end (its process skipped the timed trials)"
        return
    result.correct = True
    cand = _figures(phase, latency, args.discard_first or 0, result.statistic)
    result.outside["candidate"] = cand
    result.runtime_claimed_ms = claim.get("runtime_ms") if isinstance(claim.get("runtime_ms"), (int, float)) else None
    result.runtime_ms = cand["ms"]
    result.runtime_median_ms, result.runtime_mean_ms = cand["median_ms"], cand["mean_ms"]
    result.speedup_vs_eager = (result.eager_ms or 0.0) / result.runtime_ms
    result.speedup_vs_compile = (result.compile_ms or 0.0) / result.runtime_ms
    result.excessive_speedup = result.speedup_vs_eager > EXCESSIVE_SPEEDUP
    result.outside.update(runtime_ms=result.runtime_ms, speedup_vs_eager=round(result.speedup_vs_eager, 4))
    why = _accounting(cand, eager, latency)
    claimed = claim.get("runtime_wall_ms")
    if (not why and isinstance(claimed, (int, float)) and math.isfinite(claimed)
            and cand["least_ms"] > OUTSIDE_FACTOR * claimed + OUTSIDE_FLOOR_MS):  # the least: load only adds
        why = (f"the launcher's clock saw every timed call of ModelNew take at least {cand['least_ms']:.4g} ms where "
               f"the bench inside its process reported {claimed:.4g} ms (median): the clock inside was tampered with")
    cores_ref, cores_cand = eager.get("cores"), cand.get("cores")
    if (not why and result.device == "cpu" and result.threads == 1 and cores_ref is not None
            and cores_cand is not None and cand.get("wall_s", 0) >= 0.3 and cores_cand > max(1.5, 1.5 * cores_ref)):
        why = (f"ModelNew kept {cores_cand:.2g} cores busy while timed with 1 thread (the reference "
               f"{cores_ref:.2g}): it raised the thread count")
    if not why and result.tampering:
        why = f"solution.py tampered with the process: {'; '.join(result.tampering)}"
    if why:
        result.suspect, result.ok, result.exit_code = True, False, fail
        result.reason = f"suspect: {why}"
        return
    result.ok, result.exit_code, result.reason = True, EXIT_OK, ""


_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "ok": (bool,), "correct": (bool, type(None)), "suspect": (bool,), "oom": (bool,), "reason": (str,),
    "runtime_ms": (int, float, type(None)), "runtime_wall_ms": (int, float, type(None)), "tampering": (list,),
}


def _record_problem(claim: dict[str, Any]) -> str:
    """What is wrong with the types of the candidate's record ('' when nothing): it is hostile input,
    and a wrong type is its own fault, said in one line, never a traceback."""
    for key, types in _RECORD_TYPES.items():
        if key in claim and not isinstance(claim[key], types):
            return f"{key!r} is {type(claim[key]).__name__}"
    if not all(isinstance(t, str) for t in claim.get("tampering") or []):
        return "'tampering' holds something other than text"
    return ""


def _accounting(cand: dict[str, Any], eager: dict[str, Any], latency: float) -> str:
    """Does ModelNew's timed call account for its whole trial, as the launcher saw it? Each trial's
    work must be done between the launcher's seed and the digest committed after the call; what
    a trial costs besides the call (making inputs, the digest) is the reference's own figure."""
    whole, call, spent = cand["whole_ms"], cand["median_ms"], eager.get("least_outside_ms", 0.0)
    # what every trial spent besides its call, less what the reference's trials needed for the same
    # (inputs, the digest): the work of a call answered "done" early shows in each trial, a load
    # spike only in some, so the least of each is compared
    extra = cand["least_besides_call_ms"] - spent - latency
    noise = max(0.0, eager.get("outside_ms", spent) - spent)
    allowed = ACCOUNT_FRAC * call + ACCOUNT_FLOOR_MS + 5 * latency + ACCOUNT_SLACK_MS + ACCOUNT_NOISE * noise
    cand["unaccounted_ms"], cand["allowed_ms"] = round(extra, 6), round(allowed, 6)
    if extra > allowed:
        return (f"the launcher's clock saw each of ModelNew's timed trials take {whole:.4g} ms in all (median), "
                f"its call only {call:.4g} ms, and the reference's trials need {spent:.4g} ms besides the call: "
                f"{extra:.4g} ms of ModelNew's work was done outside its timed call (tolerance {allowed:.3g} ms)")
    return ""


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
    p.add_argument("--_child-role", dest="child_role", choices=("reference", "candidate"), default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--_child-fd", dest="child_fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child-cmd-fd", dest="child_cmd_fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child-judge-fd", dest="child_judge_fd", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _run_here(args: argparse.Namespace, result: BenchResult, role: str = "all") -> tuple[Any, Any] | None:
    """The bench in this process (``role`` as in `run_bench`); fills ``result`` whatever happens and
    returns what `run_bench` returned (None when it failed)."""
    _PROGRESS.fd = args.child_fd
    _PROGRESS.result = result
    try:
        return run_bench(args, result, role=role)
    except BenchFailure as exc:
        result.ok, result.reason, result.exit_code, result.oom = False, exc.reason, exc.exit_code, exc.oom
        if exc.correct is not None:
            result.correct = exc.correct
    except Exception as exc:  # noqa: BLE001 - an internal error must still leave a reason behind
        if is_oom(exc):
            failure = oom_failure("benchmarking", exc, result.device or "cpu", reference=role != "candidate")
            result.ok, result.reason, result.exit_code, result.oom = False, failure.reason, failure.exit_code, True
        else:
            traceback.print_exc()
            result.ok, result.reason, result.exit_code = False, f"internal error: {_one_line(exc)}", EXIT_PROBLEM
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.reference_only:
        args.solution = None
    if args.seeds < 1 or (args.trials is not None and args.trials < 1):
        print("kb_bench: --seeds and --trials must be at least 1", file=sys.stderr)
        return EXIT_PROBLEM
    apply_precision(args)
    if args.child_role is not None:  # a launcher's child: its result goes to the launcher, nowhere else
        return _child_main(args)
    started = _monotonic()
    if args.in_process:
        result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
        _run_here(args, result)
        if result.ok and result.excessive_speedup:
            result.ok, result.suspect, result.exit_code = False, True, EXIT_CANDIDATE
            result.reason = (f"suspect: speed-up {result.speedup_vs_eager:.3g}x exceeds KernelBench's "
                             f"{EXCESSIVE_SPEEDUP:g}x threshold and --in-process has no outside clock to confirm it")
    else:
        result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
    try:
        if not args.in_process:
            try:
                result = launch(args, argv)
            except Exception as exc:  # noqa: BLE001 - the launcher's own failure still leaves a reason and no row
                traceback.print_exc()
                result.ok, result.oom = False, is_oom(exc)
                result.reason = f"internal error in the launcher: {_one_line(exc)}"
                result.exit_code = EXIT_OOM if result.oom else EXIT_PROBLEM
        if result.ok and args.metrics:
            write_metrics(args.metrics, result)
        elif args.metrics:
            Path(args.metrics).unlink(missing_ok=True)  # a failed or suspect bench leaves no row to credit
    finally:
        if args.json:
            Path(args.json).unlink(missing_ok=True)  # a link planted there is replaced, not followed
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
