"""Bench one KernelBench task: is ModelNew correct, and how fast is it against eager and compile?

    python -m looptree.gpu.kb_bench --problem problem.py [--solution solution.py] [--metrics metrics.csv]
                           [--json result.json] [--trials N] [--no-compile] [--device auto|cpu|cuda]

Why this order of work (all in one process, so the three timings share a device state):
1. Everything about the reference happens *before* solution.py is imported: a fingerprint of its
   output, then the eager timing, then the ``torch.compile`` timing. A solution that patches
   torch (or the problem) at import time can therefore neither slow the baselines down nor make
   them agree with a wrong answer.
2. After the import, the reference is run again on the fingerprint inputs: if its output
   changed, the solution tampered with it, and the node fails saying so.
3. Correctness is a gate, not a metric: ``looptree.gpu.correctness.check_outputs`` on several seeds with
   fresh inputs and the hack guards (cached results, zeros, returned inputs, the reference's own
   tensors). Any failure exits 1 with the reason as the last line, which is what looptree shows
   the fix agent.
4. The candidate is timed on the same inputs as the baselines; afterwards those inputs are
   overwritten in place with another seed's values and the candidate must follow: a result
   cached by tensor identity is caught here.

Out of memory (``torch.cuda.OutOfMemoryError``, ``MemoryError``, or a RuntimeError that says
"out of memory") is reported as such: in the reference it means the problem's sizes do not fit
this machine (exit 3); in the candidate it is the candidate's failure (exit 1).

Exit status: 0 ok, 1 the candidate failed (import, correctness, crash, its own OOM), 2 the
problem file or the arguments are unusable, 3 the reference does not fit in memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from looptree.gpu.kernelbench import (
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

EXIT_OK, EXIT_CANDIDATE, EXIT_PROBLEM, EXIT_OOM = 0, 1, 2, 3
TIMING_SEED = 1234
REFRESH_SEED = 4321
FINGERPRINT_SEED = 0
DEFAULT_TOL = 1e-2  # KernelBench's atol/rtol; custom kernels reorder float sums


@dataclass
class BenchResult:
    """Everything one bench run learned; written as JSON for `looptree kernelbench --eval-only`."""

    problem: str
    solution: str | None
    device: str = ""
    ok: bool = False
    correct: bool | None = None
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
    """Out of memory, whichever way torch or Python says it."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def reason_mentions_oom(reason: str) -> bool:
    low = reason.lower()
    return "out of memory" in low or "outofmemoryerror" in low or "memoryerror" in low


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


@contextmanager
def _stage(what: str, device: str, *, reference: bool) -> Iterator[None]:
    """Turn any exception raised inside into a BenchFailure saying which stage it was."""
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


def _to_device(value: Any, device: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


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
    """The problem module, its init inputs and input maker, on one device."""

    def __init__(self, module: Any, device: str) -> None:
        self.module = module
        self.device = device

    def init_inputs(self) -> list[Any]:
        _seed_all(42)
        return list(self.module.get_init_inputs())

    def make_inputs(self, seed: int) -> list[Any]:
        _seed_all(seed)
        return list(_to_device(list(self.module.get_inputs()), self.device))

    def build(self, cls: Any) -> Any:
        """Construct under the same seed for Model and ModelNew, so even unmatched params agree."""
        init = self.init_inputs()
        _seed_all(42)
        model = cls(*init)
        return model.to(self.device)


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
    end = time.monotonic() + seconds
    calls = 0
    while calls < max_calls and (calls == 0 or time.monotonic() < end):
        fn()
        calls += 1
        if device.startswith("cuda") and torch is not None and calls % 10 == 0:
            torch.cuda.synchronize()
    if device.startswith("cuda") and torch is not None:
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], args: argparse.Namespace, device: str) -> Any:
    from looptree.gpu.timing import time_callable

    _warm(fn, args.warmup_seconds, device)
    return time_callable(fn, warmup=args.warmup, trials=args.trials, device=device, flush_l2=args.flush)


def _time_compile(model: Any, inputs: list[Any], args: argparse.Namespace, device: str, eager_ms: float,
                  result: BenchResult) -> float:
    """torch.compile's time, or the eager time (with a note) when compile is off, fails or hangs."""
    import torch

    if args.no_compile:
        result.compile_note = "torch.compile skipped (--no-compile): compile_ms is the eager time"
        _note(result.compile_note)
        return eager_ms
    try:
        compiled = torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
        with _deadline(args.compile_timeout):
            compiled(*inputs)  # the compile itself, outside the timed region
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        with _stage("timing the torch.compile baseline", device, reference=True):
            timing = _time(lambda: compiled(*inputs), args, device)
        return float(timing.median)
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
    from looptree.gpu.correctness import check_outputs

    seeds = list(range(args.seeds))
    try:
        report = check_outputs(reference, candidate, task.make_inputs, seeds=seeds, atol=args.atol, rtol=args.rtol)
    except BaseException as exc:  # noqa: BLE001 - make_inputs runs outside check_outputs' own guard
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


def _check_refresh(task: Task, reference: Any, candidate: Any, inputs: list[Any], args: argparse.Namespace) -> None:
    """Overwrite the timing inputs in place with other values; the candidate must follow them."""
    fresh = task.make_inputs(REFRESH_SEED)
    pairs = [(old, new) for old, new in zip(_tensors(inputs), _tensors(fresh)) if old.shape == new.shape]
    if not pairs:
        return
    for old, new in pairs:
        old.copy_(new)
    with _stage("running on refreshed inputs", task.device, reference=True):
        expected = _snapshot(reference(*task.make_inputs(REFRESH_SEED)))
    with _stage("running on refreshed inputs", task.device, reference=False):
        got = _snapshot(candidate(*inputs))
    atol = 0.0 if args.atol is None else args.atol
    rtol = 0.0 if args.rtol is None else args.rtol
    if not _same_outputs(expected, got, atol, rtol):
        raise BenchFailure(
            "incorrect: after its inputs were overwritten in place with new values, ModelNew returned "
            "a stale result (cached by tensor identity?)", EXIT_CANDIDATE, correct=False)


def run_bench(args: argparse.Namespace, result: BenchResult) -> None:
    """The whole bench; raises BenchFailure on any verdict other than success."""
    try:
        import torch
    except ImportError as exc:
        raise BenchFailure(f"torch is not importable ({exc}); install it to bench KernelBench problems",
                           EXIT_PROBLEM) from exc
    from looptree.gpu.timing import resolve_device

    try:
        device = resolve_device(args.device)
    except Exception as exc:  # noqa: BLE001 - NoGpu or a malformed --device
        raise BenchFailure(f"--device {args.device}: {exc}", EXIT_PROBLEM) from exc
    result.device = device
    if args.flush is None:
        args.flush = device.startswith("cuda")  # a 64 MiB CPU flush would dwarf tiny CPU problems
    if args.trials is None:
        args.trials = 100 if device.startswith("cuda") else 20
    if args.warmup is None:
        args.warmup = 5 if device.startswith("cuda") else 2
    result.trials = args.trials
    if device == "cpu" and args.threads > 0:
        # One thread by default: on a shared CPU, torch's thread pool waits for a busy core at
        # every parallel region and tiny ops take milliseconds at random, whichever model runs.
        torch.set_num_threads(args.threads)

    with torch.no_grad():
        # 1. the reference, before any candidate code has run
        with _stage("importing problem.py", device, reference=True):
            module = load_problem(args.problem)
        task = Task(module, device)
        with _stage("building Model", device, reference=True):
            reference = task.build(module.Model)
        with _stage("making the reference's inputs", device, reference=True):
            fp_in = task.make_inputs(FINGERPRINT_SEED)
        with _stage("running the reference", device, reference=True):
            fp_out = _snapshot(reference(*fp_in))
        del fp_in
        with _stage("making the timing inputs", device, reference=True):
            inputs = task.make_inputs(TIMING_SEED)
        with _stage("timing the eager reference", device, reference=True):
            eager = _time(lambda: reference(*inputs), args, device)
        result.eager_ms = float(eager.median)
        result.timing_method = eager.method
        result.compile_ms = _time_compile(reference, inputs, args, device, result.eager_ms, result)
        del inputs  # made again (same seed, same values) for the candidate: less memory meanwhile
        if args.solution is None:
            result.ok = True
            return

        # 2. the candidate
        sys.modules.pop("problem", None)  # the solution's `import problem` finds the file beside it
        with _stage("importing solution.py", device, reference=False):
            solution = load_module(args.solution, "solution")
        cls = getattr(solution, "ModelNew", None)
        if cls is None:
            raise BenchFailure(f"{Path(args.solution).name} defines no ModelNew (class ModelNew(nn.Module))",
                               EXIT_CANDIDATE, correct=False)
        with _stage("building ModelNew", device, reference=False):
            candidate = task.build(cls)
            note = _load_weights(reference, candidate)
        if note:
            _note(note)
        with _stage("re-running the reference after importing solution.py", device, reference=True):
            again = _snapshot(reference(*task.make_inputs(FINGERPRINT_SEED)))
        if not _same_outputs(fp_out, again, DEFAULT_TOL, DEFAULT_TOL):
            raise BenchFailure(
                "incorrect: importing or building ModelNew changed what the reference Model computes "
                "(solution.py must not patch torch, problem.py or Model)", EXIT_CANDIDATE, correct=False)
        if fp_out and not any(t.is_floating_point() or t.is_complex() for t in fp_out):
            args.atol = args.rtol = None  # integer outputs (indices, counts) must match exactly
        _check_correctness(task, reference, candidate, args, result)
        result.correct = True

        # 3. timing the candidate on the baselines' inputs
        with _stage("making the timing inputs", device, reference=True):
            inputs = task.make_inputs(TIMING_SEED)
        with _stage("timing ModelNew", device, reference=False):
            timing = _time(lambda: candidate(*inputs), args, device)
        _check_refresh(task, reference, candidate, inputs, args)
    runtime = float(timing.median)
    result.runtime_ms = runtime
    result.speedup_vs_eager = result.eager_ms / runtime if runtime > 0 else math.inf
    result.speedup_vs_compile = (result.compile_ms or 0.0) / runtime if runtime > 0 else math.inf
    result.ok = True


def write_metrics(path: str, result: BenchResult) -> None:
    from looptree.gpu.report import MetricsWriter

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m looptree.gpu.kb_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", required=True, help="KernelBench problem file (Model, get_inputs, get_init_inputs)")
    p.add_argument("--solution", default=None, help="file defining ModelNew; without it only the baselines are timed")
    p.add_argument("--reference-only", action="store_true", help="ignore --solution: time only the baselines")
    p.add_argument("--metrics", default=None, help="metrics CSV to append the row to")
    p.add_argument("--json", default=None, help="write the full result as JSON here")
    p.add_argument("--trials", type=int, default=None, help="timed calls per measurement (default 100 on GPU, 20 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 on GPU, 2 on CPU)")
    p.add_argument("--warmup-seconds", type=float, default=0.2, help="keep calling before timing for this long (default 0.2)")
    p.add_argument("--seeds", type=int, default=5, help="correctness trials, each with fresh inputs (default 5)")
    p.add_argument("--atol", type=float, default=DEFAULT_TOL,
                   help="absolute tolerance for floating-point outputs (default 1e-2, as KernelBench); integer outputs match exactly")
    p.add_argument("--rtol", type=float, default=DEFAULT_TOL, help="relative tolerance for floating-point outputs (default 1e-2)")
    p.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch threads (default 1; 0 keeps torch's default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (compile_ms = eager)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--compile-timeout", type=float, default=300.0, help="give up on torch.compile after S seconds")
    p.add_argument("--flush", dest="flush", action="store_true", default=None, help="flush caches before each trial")
    p.add_argument("--no-flush", dest="flush", action="store_false", help="do not flush caches (default on CPU)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reference_only:
        args.solution = None
    if args.seeds < 1 or (args.trials is not None and args.trials < 1):
        print("kb_bench: --seeds and --trials must be at least 1", file=sys.stderr)
        return EXIT_PROBLEM
    result = BenchResult(problem=str(args.problem), solution=str(args.solution) if args.solution else None)
    started = time.monotonic()
    try:
        run_bench(args, result)
        if args.metrics:
            write_metrics(args.metrics, result)
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
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(result), indent=2, allow_nan=True) + "\n")
    sys.stdout.flush()
    if result.ok:
        parts = [f"eager {result.eager_ms:.4g} ms", f"compile {result.compile_ms:.4g} ms"]
        if result.runtime_ms is not None:
            parts.insert(0, f"ModelNew {result.runtime_ms:.4g} ms")
            parts.append(f"speedup {result.speedup_vs_eager:.3f}x vs eager, {result.speedup_vs_compile:.3f}x vs compile")
        print(f"kb_bench: {'; '.join(parts)} on {result.device} ({time.monotonic() - started:.1f} s)", flush=True)
        return EXIT_OK
    print(f"kb_bench: {result.reason}", file=sys.stderr, flush=True)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
