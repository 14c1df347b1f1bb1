"""Dashboard under load: a 10,000-node run growing at 200 events/s, keys pressed while it runs.

What it measures (targets from the dashboard issue: p95 < 100 ms, CPU < 25% of one core):
- key → repaint latency: the time from posting a key (`down`, `b`) to the first compositor
  update whose screen already shows its effect (the cursor on the expected node), taken by
  hooking `App._display`, which Textual calls with every rendered frame even when headless;
- CPU share: this process's CPU time over wall time while the run grows. The writer that
  appends to events.jsonl is a separate (forked) process, so it is not counted;
- whether the dashboard kept up: events folded vs events written.

Usage: python benchmarks/dashboard_bench.py [--nodes 10000] [--rate 200] [--seconds 60] [--tab live]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from looptree.app.dashboard import LooptreeApp  # noqa: E402
from looptree.app.synthetic import stream_events  # noqa: E402

EVENTS_PER_NODE = 20  # a rough upper bound, to size the synthetic run


@dataclass
class Probe:
    t0: float
    key: str
    node_id: str
    cursor: Callable[[], bool]
    cursor_seen: bool = False


class ProbedApp(LooptreeApp):
    """The real dashboard, plus a hook that notes when a frame first shows a pending change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe: Probe | None = None
        self.latencies: list[tuple[str, float]] = []  # key, seconds until the cursor showed it
        self.detail_latencies: list[float] = []  # seconds until the detail panel showed the node
        self.frames = 0

    def _display(self, screen: Any, renderable: Any) -> None:
        if renderable is not None:
            self.frames += 1
            probe = self.probe
            if probe is not None:
                now = time.perf_counter()
                if not probe.cursor_seen and probe.cursor():
                    probe.cursor_seen = True
                    self.latencies.append((probe.key, now - probe.t0))
                if probe.cursor_seen and self.detail.node_id == probe.node_id:
                    self.detail_latencies.append(now - probe.t0)
                    self.probe = None
        super()._display(screen, renderable)


def preload(path: Path, stream: Iterator[dict[str, Any]], nodes: int) -> int:
    """Write events until `nodes` nodes exist; the stream then continues from there."""
    created = written = 0
    with open(path, "w", encoding="utf-8") as fh:
        for event in stream:
            fh.write(json.dumps(event, separators=(",", ":")) + "\n")
            written += 1
            if event["type"] == "node_created":
                created += 1
                if created >= nodes:
                    break
    return written


def writer(path: str, stream: Iterator[dict[str, Any]], rate: float, seconds: float, counter: Any) -> None:
    """Forked child: append events at `rate` per second, in small batches, for `seconds`."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    start = time.perf_counter()
    sent = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        due = int(rate * elapsed) - sent
        if due > 0:
            batch = list(itertools.islice(stream, due))
            if not batch:
                break
            os.write(fd, "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in batch).encode())
            sent += len(batch)
            counter.value = sent
        time.sleep(0.01)
    os.close(fd)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="looptree-dash-bench-"))
    run_dir = workdir / "runs" / "7"
    run_dir.mkdir(parents=True)
    events_path = run_dir / "events.jsonl"
    extra_nodes = int(args.rate * args.seconds / 8) + 100
    stream = stream_events(args.nodes + extra_nodes, run=7, seed=1)
    t = time.perf_counter()
    preloaded = preload(events_path, stream, args.nodes)
    write_s = time.perf_counter() - t

    width, height = (int(x) for x in args.size.split("x"))
    app = ProbedApp(run_dir, mode="live", freeze_gc=True)  # as run_dashboard (the CLI) starts it
    result: dict[str, Any] = {"preloaded_events": preloaded, "preload_write_s": write_s}
    async with app.run_test(size=(width, height)) as pilot:
        t = time.perf_counter()
        while not app.loaded:
            await asyncio.sleep(0.01)
        await pilot.pause()
        result["initial_load_s"] = time.perf_counter() - t
        app.query_one("#panels").active = f"tab-{args.tab}"  # type: ignore[attr-defined]
        await pilot.pause()
        result["nodes_at_start"] = len(app.view.state.nodes)

        counter = multiprocessing.get_context("fork").Value("l", 0)
        proc = multiprocessing.get_context("fork").Process(
            target=writer, args=(str(events_path), stream, args.rate, args.seconds, counter), daemon=True)
        applied0 = app.view.events_applied
        cpu0, wall0 = time.process_time(), time.perf_counter()
        proc.start()
        keys = itertools.cycle(["down", "down", "b", "down", "up"])
        next_key = wall0 + 1.0
        misses = 0
        while time.perf_counter() - wall0 < args.seconds:
            now = time.perf_counter()
            if now >= next_key and app.probe is None:
                key = next(keys)
                tree = app.run_tree
                if key == "b" and app.view.best_id is not None:
                    node_id = app.view.best_id
                else:
                    line = max(0, tree.cursor_line)
                    lines = tree._tree_lines
                    target_line = min(len(lines) - 1, line + 1) if key == "down" else max(0, line - 1)
                    node_id = lines[target_line].node.data
                app.probe = Probe(time.perf_counter(), key, node_id,
                                  lambda node_id=node_id: tree.cursor_node is not None and tree.cursor_node.data == node_id)
                _send_key(app, key)
                next_key = now + args.key_interval
            elif app.probe is not None and now - app.probe.t0 > 2.0:
                misses += 1  # a key whose effect never showed within 2 s
                app.probe = None
            await asyncio.sleep(0.005)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        proc.join(timeout=5)
        await asyncio.sleep(0.5)  # let the last batch fold
        written = counter.value
        result.update(
            wall_s=wall1 - wall0,
            cpu_share=(cpu1 - cpu0) / (wall1 - wall0),
            events_written=written,
            events_applied=app.view.events_applied - applied0,
            nodes_at_end=len(app.view.state.nodes),
            latencies=list(app.latencies),
            detail_latencies=list(app.detail_latencies),
            misses=misses,
        )
    return result


def _send_key(app: LooptreeApp, key: str) -> None:
    """Inject a key the way a terminal's input does (through the driver), without waiting for idle."""
    from textual import events

    event = events.Key(key, None)
    event.set_sender(app)
    assert app._driver is not None
    app._driver.send_message(event)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000, help="nodes already in the run when the dashboard starts")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second appended while measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to measure")
    parser.add_argument("--key-interval", type=float, default=0.5, help="seconds between key presses")
    parser.add_argument("--size", default="160x50", help="terminal size WxH")
    parser.add_argument("--tab", default="live", choices=["live", "plot", "gpu", "budget", "events"],
                        help="which bottom panel is shown while measuring")
    args = parser.parse_args(argv)
    r = asyncio.run(measure(args))
    lat = [x * 1000 for _, x in r["latencies"]]
    by_key: dict[str, list[float]] = {}
    for key, x in r["latencies"]:
        by_key.setdefault(key, []).append(x * 1000)
    rows = [
        ("nodes at start / end", f"{r['nodes_at_start']} / {r['nodes_at_end']}"),
        ("events preloaded", f"{r['preloaded_events']} (written in {r['preload_write_s']:.1f} s)"),
        ("initial load (read + fold + tree)", f"{r['initial_load_s']:.2f} s"),
        ("events written / folded live", f"{r['events_written']} / {r['events_applied']} "
                                          f"({r['events_written'] / r['wall_s']:.0f}/s target {args.rate:.0f}/s)"),
        ("keys measured (missed)", f"{len(lat)} ({r['misses']})"),
        ("key → repaint median", f"{statistics.median(lat):.1f} ms" if lat else "n/a"),
        ("key → repaint p95", f"{percentile(lat, 0.95):.1f} ms" if lat else "n/a"),
        ("key → repaint max", f"{max(lat):.1f} ms" if lat else "n/a"),
        ("dashboard CPU (one core)", f"{r['cpu_share'] * 100:.1f} %"),
    ]
    detail = [x * 1000 for x in r["detail_latencies"]]
    if detail:
        rows.insert(-1, ("key → detail panel median / p95", f"{statistics.median(detail):.1f} / "
                                                          f"{percentile(detail, 0.95):.1f} ms"))
    for key, values in sorted(by_key.items()):
        rows.append((f"  `{key}` median / p95 / max", f"{statistics.median(values):.1f} / "
                     f"{percentile(values, 0.95):.1f} / {max(values):.1f} ms (n={len(values)})"))
    width = max(len(name) for name, _ in rows)
    print(f"looptree dashboard benchmark  ({args.size}, {args.tab} tab, {args.seconds:.0f} s, "
          f"Python {sys.version.split()[0]})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    ok = bool(lat) and percentile(lat, 0.95) < 100 and r["cpu_share"] < 0.25
    print(f"  targets (p95 < 100 ms, CPU < 25%): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
