"""Dashboard soak: attach to a run growing at 200 events/s for 30 minutes; is memory flat?

Why: users leave the dashboard open for hours over SSH. A fault that needs minutes to show (a
timer that crashes on its first firing at 300 s, a buffer that is never trimmed, a cache keyed
by something that keeps growing) is invisible to every short test. This script keeps the real
dashboard (`LooptreeApp`, headless through Textual's `App.run_test`, started as
`looptree attach` starts it: live mode, `freeze_gc=True`, default timer periods) attached to a
synthetic run that a forked writer process grows at `--rate` events per second, and samples
this process's resident memory (VmRSS from /proc/self/status) and CPU time every `--every`
seconds. The writer is a separate process, so its CPU and memory are not counted.

While it runs it cycles the bottom panel through its tabs (one per `--tab-every` seconds) and
moves the tree cursor now and then, so every panel's redraw path is exercised.

Two workloads (`--grow`):
- `nodes` (default): the synthetic run of `app.synthetic.stream_events`, about 20 events per
  node, so the tree gains ~10 nodes a second. Memory must grow here: the folded state and the
  tree widget hold every node (about 3 KiB of `RunState` per node alone). The verdict is the
  growth per 1,000 new nodes over the second half, against `--max-per-knode` MiB: a leak per
  event or per timer firing shows up as a larger figure the longer the soak runs.
- `rows`: the node count stays put; the events are metric rows of the 8 nodes benchmarking at
  once (each node's rows restart with every bench repeat, as the engine's do) and GPU samples,
  i.e. a run in a long benchmarking spell. Here flat means flat: the verdict is the slope of
  RSS over the second half in MiB per minute, against `--max-slope`.
The second half is used because the first includes the load, the first render of every panel
and the first GC-freeze firing (300 s).

Usage: python benchmarks/soak_bench.py [--minutes 30] [--grow nodes|rows] [--rate 200] [--every 10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The same event feeder as the dashboard benchmark (this folder is on sys.path when run as a script).
from dashboard_bench import preload, writer  # noqa: E402

from looptree.app.dashboard import LooptreeApp
from looptree.app.synthetic import stream_events

TABS = ["live", "plot", "gpu", "budget", "events"]
EVENTS_PER_NODE = 15  # a lower bound on the synthetic lifecycle, to size the stream generously


@dataclass
class Sample:
    t_s: float  # seconds since the writer started
    rss_mib: float
    cpu_s: float  # process CPU time (user + system) since the start of the measurement
    cpu_share: float  # CPU over wall since the previous sample (1.0 = one core)
    nodes: int
    events_applied: int
    events_written: int


def rss_mib() -> float:
    """Resident set size of this process, from /proc (Linux); psutil is not a dependency."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def steady_rows(ids: list[str], t0: float, rate: float) -> Iterator[dict[str, Any]]:
    """Endless bench traffic on `ids` (no new node): repeats of 50 rows each, GPU samples between."""
    from looptree.app.synthetic import COLUMNS, gpu_fields

    dt = 1.0 / rate
    seq = itertools.count(10_000_000)
    ts = itertools.count()
    for round_ in itertools.count():
        repeat = round_ % 5
        for node_id in ids:
            yield {"seq": next(seq), "ts": t0 + next(ts) * dt, "type": "stage_started", "id": node_id,
                   "stage": "bench", "repeat": repeat, "side": "candidate"}
        for iteration in range(50):
            for node_id in ids:
                value = 10.0 + (hash((node_id, iteration)) % 100) / 100.0
                yield {"seq": next(seq), "ts": t0 + next(ts) * dt, "type": "metric_row", "id": node_id,
                       "repeat": repeat, "iteration": iteration, "columns": COLUMNS,
                       "values": {COLUMNS[0]: value, COLUMNS[1]: round(1000.0 / value, 3)}}
            if iteration % 5 == 0:
                for device in range(2):
                    yield {"seq": next(seq), "ts": t0 + next(ts) * dt, "type": "gpu_sample", "device": device,
                           "fields": gpu_fields(device, round_ * 50 + iteration)}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


async def soak(args: argparse.Namespace) -> tuple[list[Sample], dict[str, Any]]:
    seconds = args.minutes * 60.0
    workdir = Path(tempfile.mkdtemp(prefix="looptree-soak-"))
    run_dir = workdir / "runs" / "7"
    run_dir.mkdir(parents=True)
    events_path = run_dir / "events.jsonl"
    total_nodes = args.preload + int(args.rate * seconds / EVENTS_PER_NODE) + 1000
    # Timestamps in step with the wall clock, so the dashboard's clock and durations look real.
    stream = stream_events(total_nodes, run=7, seed=3, t0=time.time(), dt=1.0 / args.rate)
    preloaded = preload(events_path, stream, args.preload)
    if args.grow == "rows":
        created = [json.loads(line)["id"] for line in events_path.read_text().splitlines()
                   if '"node_created"' in line]
        stream = steady_rows(created[-8:], time.time(), args.rate)

    app = LooptreeApp(run_dir, mode="live", freeze_gc=True)  # as `looptree attach` starts it
    samples: list[Sample] = []
    info: dict[str, Any] = {"preloaded_events": preloaded, "workdir": str(workdir)}
    async with app.run_test(size=(160, 50)) as pilot:
        while not app.loaded:
            await asyncio.sleep(0.05)
        await pilot.pause()
        ctx = multiprocessing.get_context("fork")
        counter = ctx.Value("l", 0)
        proc = ctx.Process(target=writer, args=(str(events_path), stream, args.rate, seconds, counter), daemon=True)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        proc.start()
        prev_cpu, prev_wall = cpu0, wall0
        next_sample = wall0
        next_tab = wall0 + args.tab_every
        next_key = wall0 + 5.0
        tabs = itertools.cycle(TABS[1:] + TABS[:1])
        keys = itertools.cycle(["down", "down", "down", "b", "up"])
        while True:
            now = time.perf_counter()
            if now >= next_sample:
                cpu = cpu_seconds()
                share = (cpu - prev_cpu) / (now - prev_wall) if samples and now > prev_wall else 0.0
                samples.append(Sample(now - wall0, rss_mib(), cpu - cpu0, share, len(app.view.state.nodes),
                                      app.view.events_applied, counter.value))
                prev_cpu, prev_wall = cpu, now
                if not args.quiet:
                    s = samples[-1]
                    print(f"  {s.t_s / 60:6.2f} min  rss {s.rss_mib:7.1f} MiB  cpu {s.cpu_share * 100:5.1f} %  "
                          f"nodes {s.nodes:6d}  events {s.events_applied:7d}", file=sys.stderr, flush=True)
                if now - wall0 >= seconds:
                    break
                next_sample += args.every
            if not app.is_running:
                info["died"] = f"the dashboard stopped after {now - wall0:.0f} s (return code {app.return_code})"
                break
            if now >= next_tab:
                app.query_one("#panels").active = f"tab-{next(tabs)}"  # type: ignore[attr-defined]
                next_tab += args.tab_every
            if now >= next_key:
                await pilot.press(next(keys))
                next_key += 5.0
            await asyncio.sleep(0.1)
        info["alive"] = app.is_running and app.return_code is None
        info["timer_firings"] = dict(app.timer_firings)
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
    return samples, info


def verdict(samples: list[Sample], grow: str, max_slope: float, max_per_knode: float) -> tuple[bool, str]:
    """Over the second half: MiB/min (`rows`) or MiB per 1,000 new nodes (`nodes`) within the limit."""
    if len(samples) < 4:
        return False, "too few samples for a verdict (run longer or sample more often)"
    half = samples[len(samples) // 2:]
    per_min = slope([(s.t_s / 60.0, s.rss_mib) for s in half])
    new_nodes = half[-1].nodes - half[0].nodes
    per_knode = slope([(s.nodes / 1000.0, s.rss_mib) for s in half]) if new_nodes > 0 else float("nan")
    window = f"second half ({half[0].t_s / 60:.1f}–{half[-1].t_s / 60:.1f} min, +{new_nodes} nodes)"
    if grow == "rows":
        ok = per_min <= max_slope
        return ok, (f"RSS slope over the {window}: {per_min:+.2f} MiB/min; "
                    f"{'flat' if ok else 'NOT flat'} (limit {max_slope:g} MiB/min)")
    ok = per_knode <= max_per_knode
    return ok, (f"RSS over the {window}: {per_min:+.2f} MiB/min, {per_knode:+.2f} MiB per 1,000 new nodes; "
                f"{'within' if ok else 'OVER'} the limit of {max_per_knode:g} MiB per 1,000 nodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to stay attached (default 30)")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second appended to the run")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--preload", type=int, default=500, help="nodes already in the run when the dashboard opens")
    parser.add_argument("--tab-every", type=float, default=60.0, help="seconds between switches of the bottom tab")
    parser.add_argument("--grow", choices=["nodes", "rows"], default="nodes",
                        help="nodes: the tree grows (~10 nodes/s); rows: bench rows and GPU samples only")
    parser.add_argument("--max-slope", type=float, default=1.0, help="--grow rows: the limit in MiB/min")
    parser.add_argument("--max-per-knode", type=float, default=12.0,
                        help="--grow nodes: the limit in MiB per 1,000 new nodes")
    parser.add_argument("--table-every", type=float, default=60.0, help="seconds between rows of the printed table")
    parser.add_argument("--json", metavar="F", help="also write every sample to F")
    parser.add_argument("--quiet", action="store_true", help="no progress line per sample on stderr")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.every <= 0:
        parser.error("--minutes, --rate and --every must be positive")
    samples, info = asyncio.run(soak(args))
    print(f"looptree dashboard soak: {args.minutes:g} min attached to a run growing at {args.rate:g} events/s "
          f"(--grow {args.grow}) "
          f"(160x50, sampled every {args.every:g} s, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
    print(f"{'min':>6} {'RSS MiB':>8} {'CPU s':>8} {'CPU %':>6} {'nodes':>7} {'events folded':>14} {'written':>9}")
    shown_at = -1e9
    for i, s in enumerate(samples):
        if s.t_s - shown_at >= args.table_every - 1e-6 or i == len(samples) - 1:
            print(f"{s.t_s / 60:6.1f} {s.rss_mib:8.1f} {s.cpu_s:8.1f} {s.cpu_share * 100:6.1f} {s.nodes:7d} "
                  f"{s.events_applied:14d} {s.events_written:9d}")
            shown_at = s.t_s
    if len(samples) >= 2:
        wall = samples[-1].t_s - samples[0].t_s
        print(f"mean CPU {samples[-1].cpu_s / wall * 100:.1f} % of one core; "
              f"folded {samples[-1].events_applied - samples[0].events_applied} events "
              f"of {samples[-1].events_written} written")
    print(f"timer firings: {', '.join(f'{k} {v}' for k, v in sorted(info['timer_firings'].items()))}")
    if "died" in info:
        print(f"FAILED: {info['died']}")
    ok, text = verdict(samples, args.grow, args.max_slope, args.max_per_knode)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "info": info,
                                               "samples": [s.__dict__ for s in samples]}, indent=1))
    return 0 if ok and info.get("alive") else 1


if __name__ == "__main__":
    raise SystemExit(main())
