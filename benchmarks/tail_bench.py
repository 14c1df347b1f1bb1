"""Tailing a run directory: 10 Hz polling against watchfiles (inotify), side by side in one run.

The two tails:
- `poll`: what the dashboard runs, `looptree.app.feed.looks` over a `RunSource` every 0.1 s;
- `watch`: the candidate it was measured against, here only (`watch_looks`): `watchfiles.awatch`
  on the run directory (not recursive, filtered to events.jsonl and telemetry.jsonl), a 20 ms
  step and 100 ms debounce, and a look every second without a notification (`rust_timeout` +
  `yield_on_timeout`), which a network filesystem, blind to inotify, would need.

What it measures, for each:
- latency: from a line appended to events.jsonl (stamped with CLOCK_MONOTONIC by the writer, a
  separate process) to the moment the feed has read it and folded it into a `RunView`; lines are
  written one at a time at random intervals (0.15-0.35 s), so they land at random phases of the
  polling period; median, p95 and max;
- idle CPU: CPU time of the tailing process (every thread, watchfiles' included) over `--idle`
  seconds with no writes, as a share of one core;
- CPU at `--rate` events/s: the same while a writer process appends synthetic events
  (`app.synthetic.stream_events`) every 10 ms, the way the dashboard bench feeds the dashboard;
  the fold into a `RunView` is included (it costs the same in every mode).

Each (mode, phase) runs in a fresh child process, one after another, so one mode's threads never
count against another. Run by hand (not a test), after `pip install '.[bench]'` (watchfiles):

    python benchmarks/tail_bench.py                     # poll, watch; 60 s idle, 30 s at 200/s, 100 latencies
    python benchmarks/tail_bench.py --idle 10 --load 5 --samples 30   # a quick look
    python benchmarks/tail_bench.py --modes poll watch --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looptree.app.feed import Events, RunSource, looks  # noqa: E402
from looptree.app.model import RunView  # noqa: E402
from looptree.app.synthetic import stream_events  # noqa: E402

PERIOD = 0.1  # the dashboard's refresh_hz of 10
MODES = ("poll", "watch")
WATCH_STEP_MS = 20  # watchfiles waits this long for more writes before it reports a change
WATCH_DEBOUNCE_MS = 100  # ... and never longer than this under a steady stream of writes
FALLBACK_MS = 1000  # a look without a notification, for filesystems inotify cannot see


async def watch_looks(run_dir: Path, source: RunSource) -> AsyncIterator[Events]:
    """The watchfiles candidate: a look on each change notification, and one a second regardless."""
    from watchfiles import awatch  # only the benchmark needs it: pip install watchfiles

    names = {"events.jsonl", "telemetry.jsonl"}

    def ours(_change: object, path: str) -> bool:
        return os.path.basename(path) in names

    async for _changes in awatch(run_dir, watch_filter=ours, step=WATCH_STEP_MS, debounce=WATCH_DEBOUNCE_MS,
                                 rust_timeout=FALLBACK_MS, yield_on_timeout=True, recursive=False):
        yield source.poll()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- writers (separate processes: their CPU is not the tailer's) ----------------------------------
def latency_writer(path: str, samples: int, seed: int) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    time.sleep(1.0)  # let the tailer settle (watchfiles starts its watch)
    for index in range(samples):
        time.sleep(rng.uniform(0.15, 0.35))
        line = {"seq": index, "ts": time.time(), "type": "message", "text": "ping", "t_write": time.monotonic()}
        os.write(fd, (json.dumps(line) + "\n").encode())
    os.close(fd)


def rate_writer(path: str, rate: float, seconds: float) -> None:
    stream = stream_events(100_000, run=7, seed=3)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    start = time.perf_counter()
    sent = 0
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(rate * elapsed) - sent
        if due > 0:
            batch = list(itertools.islice(stream, due))
            os.write(fd, "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in batch).encode())
            sent += len(batch)
        time.sleep(0.01)
    os.close(fd)


# -- the tailer (a child process per mode and phase) ---------------------------------------------
async def tail(run_dir: Path, mode: str, phase: str, seconds: float, expect: int) -> dict[str, Any]:
    source = RunSource(run_dir)
    view = RunView()
    view.apply_all(source.load())
    latencies: list[float] = []
    folded = 0

    async def consume() -> None:
        nonlocal folded
        feed = looks(source.poll, PERIOD) if mode == "poll" else watch_looks(run_dir, source)
        async for batch in feed:
            if not batch:
                continue
            view.apply_all(batch)
            now = time.monotonic()
            folded += len(batch)
            latencies.extend(now - e["t_write"] for e in batch if "t_write" in e)
            if phase == "latency" and len(latencies) >= expect:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.5)  # the watcher's start-up is not what is measured
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=seconds)
    except TimeoutError:
        pass
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    view.take_changes()
    return {"mode": mode, "phase": phase, "wall_s": wall, "cpu_s": cpu, "cpu_share": cpu / wall if wall else 0.0,
            "folded": folded, "latencies": latencies}


def child(args: argparse.Namespace) -> None:
    result = asyncio.run(tail(Path(args.run_dir), args.child, args.phase, args.seconds, args.expect))
    print(json.dumps(result))


def run_phase(mode: str, phase: str, seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"looptree-tail-{mode}-{phase}-"))
    events = run_dir / "events.jsonl"
    events.write_text("")
    writer: multiprocessing.Process | None = None
    expect = 0
    if phase == "latency":
        expect = args.samples
        writer = multiprocessing.Process(target=latency_writer, args=(str(events), args.samples, 7))
        seconds = 1.0 + args.samples * 0.35 + 5.0
    elif phase == "load":
        writer = multiprocessing.Process(target=rate_writer, args=(str(events), args.rate, seconds + 1.0))
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, "--phase", phase, "--run-dir", str(run_dir),
                             "--seconds", str(seconds), "--expect", str(expect)], stdout=subprocess.PIPE, text=True)
    if writer is not None:
        writer.start()
    out, _ = proc.communicate(timeout=seconds + 60)
    if writer is not None:
        writer.join(timeout=seconds + 10)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of the idle phase")
    parser.add_argument("--load", type=float, default=30.0, help="seconds of the loaded phase")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second in the loaded phase")
    parser.add_argument("--samples", type=int, default=100, help="lines timed in the latency phase")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        results[mode] = {
            "latency": run_phase(mode, "latency", 0.0, args),
            "idle": run_phase(mode, "idle", args.idle, args),
            "load": run_phase(mode, "load", args.load, args),
        }
    print(f"load average {os.getloadavg()[0]:.2f}; idle {args.idle:g} s, {args.rate:g} events/s for {args.load:g} s, "
          f"{args.samples} latencies")
    print(f"{'mode':<6} {'lat median ms':>13} {'p95 ms':>7} {'max ms':>7} {'n':>4} {'idle CPU %':>10} "
          f"{'CPU % at rate':>13} {'folded/s':>9}")
    for mode, r in results.items():
        lat = [x * 1000 for x in r["latency"]["latencies"]]
        load = r["load"]
        print(f"{mode:<6} {statistics.median(lat) if lat else float('nan'):>13.1f} {percentile(lat, 0.95):>7.1f} "
              f"{max(lat, default=float('nan')):>7.1f} {len(lat):>4} {r['idle']['cpu_share'] * 100:>10.3f} "
              f"{load['cpu_share'] * 100:>13.2f} {load['folded'] / load['wall_s']:>9.0f}")
    if len(results) == 2 and "poll" in results and "watch" in results:
        def ratio(key: str, get: Any) -> str:
            a, b = get(results["watch"]), get(results["poll"])
            return f"{key} watch/poll {a / b:.2f}" if b else f"{key}: n/a"
        print("; ".join([
            ratio("latency median", lambda r: statistics.median(r["latency"]["latencies"] or [float("nan")])),
            ratio("idle CPU", lambda r: r["idle"]["cpu_share"]),
            ratio("CPU at rate", lambda r: r["load"]["cpu_share"]),
        ]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
