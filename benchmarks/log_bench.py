"""How reading a run's log scales: `tree`, the fold, and what `resume` reads, on a 1,000,000-event run.

    python benchmarks/log_bench.py [--events 1000000] [--gpus 8] [--layout split|legacy] [--keep DIR]

The synthetic run is app.synthetic's large-run generator (interleaved nodes, ~1 in 7 failing)
plus GPU telemetry at one sample per device per simulated second, which is what dominates a real
log: a 10-hour run on 8 GPUs samples 288,000 times but evaluates a few thousand nodes.
`--layout legacy` writes every sample into events.jsonl (run directories written before the
telemetry file); `--layout split` writes them to telemetry.jsonl beside it, as the engine now does.
The total number of records is the same either way.

Each operation runs in a fresh interpreter, which reports its own wall time and peak RSS:
- `fold`: RunState.load(run_dir) (what tree/show/ctl/attach do first);
- `tree`: `python -m looptree.engine.cli tree RUN --json`, end to end;
- `resume-read`: what Engine.reopen reads before it does any work (the fold, the event count
  for the writer, the last control offset).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from looptree.app.synthetic import gpu_fields, stream_events

PROBE = {
    "fold": """
from looptree.engine.core.state import RunState
state = RunState.load(run_dir)
assert state.run is not None
""",
    "resume-read": """
from looptree.engine.core.state import RunState
from looptree.engine.core.events import EventLog
state = RunState.load(run_dir)
log = EventLog(run_dir)
offset = state.control_offset
log.close()
""",
}

LEGACY_PROBE = {  # the same operations as the engine made them before the streaming reader
    # (read_events is still a list of every event; iter_events used to be one too)
    "fold": """
from looptree.engine.core.events import read_events
from looptree.engine.core.state import RunState
state = RunState.from_events(read_events(run_dir / "events.jsonl"))
""",
    "resume-read": """
from looptree.engine.core.events import read_events, EventLog
from looptree.engine.core.state import RunState
state = RunState.from_events(read_events(run_dir / "events.jsonl"))
seq = len(read_events(run_dir / "events.jsonl"))  # the writer counted events by parsing them
offset = max((int(e["control_offset"]) for e in read_events(run_dir / "events.jsonl")
              if "control_offset" in e), default=0)
""",
}

WRAP = """
import resource, sys, time
from pathlib import Path
run_dir = Path(sys.argv[1])
t0 = time.perf_counter()
{body}
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

TREE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "looptree.engine.cli", "tree", sys.argv[1], "--json"],
               stdout=subprocess.DEVNULL, check=True)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def write_run(run_dir: Path, total: int, gpus: int, layout: str) -> tuple[int, int]:
    """Write about `total` records; returns (events in events.jsonl, samples in telemetry.jsonl)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    per_node = 26  # events a node's life takes in the generator, on average
    samples_per_event = gpus * 0.6  # ~0.6 s of run time per node event at 8 workers
    nodes = max(10, 2 * int(total / (per_node * (1 + samples_per_event))))  # stops at total
    n_events = n_samples = 0
    seq = 0
    owed = 0.0
    with open(run_dir / "events.jsonl", "w") as events, open(run_dir / "telemetry.jsonl", "w") as telemetry:
        for event in stream_events(nodes, gpus=0):
            if event["type"] == "run_finished":
                continue
            event["seq"] = seq
            seq += 1
            events.write(json.dumps(event, separators=(",", ":")) + "\n")
            n_events += 1
            owed += samples_per_event
            while gpus and owed >= gpus and n_events + n_samples < total:
                owed -= gpus
                for device in range(gpus):
                    sample = {"ts": event["ts"], "type": "gpu_sample", "device": device,
                              "fields": gpu_fields(device, n_samples)}
                    if layout == "legacy":
                        sample["seq"] = seq
                        seq += 1
                        events.write(json.dumps(sample, separators=(",", ":")) + "\n")
                    else:
                        telemetry.write(json.dumps(sample, separators=(",", ":")) + "\n")
                    n_samples += 1
            if n_events + n_samples >= total:
                break
    if layout == "legacy":
        (run_dir / "telemetry.jsonl").unlink()
    return n_events, n_samples


def measure(script: str, run_dir: Path, repeats: int) -> tuple[float, float]:
    times, peaks = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", script, str(run_dir)], capture_output=True, text=True,
                             check=True, timeout=1800)
        seconds, peak = (float(x) for x in out.stdout.split())
        times.append(seconds)
        peaks.append(peak)
    return statistics.median(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="records in the run (events + samples)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--layout", choices=["split", "legacy"], default="split")
    parser.add_argument("--legacy-calls", action="store_true",
                        help="measure through the calls the engine made before the streaming reader")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="write the run here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="looptree-logbench-"))
    run_dir = root / ".looptree" / "runs" / "7"
    try:
        n_events, n_samples = write_run(run_dir, args.events, args.gpus, args.layout)
        sizes = {p.name: p.stat().st_size for p in run_dir.glob("*.jsonl")}
        print(f"layout={args.layout}: {n_events:,} events + {n_samples:,} GPU samples; "
              + ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sizes.items()))
        probes = LEGACY_PROBE if args.legacy_calls else PROBE
        print(f"{'operation':<12} {'median s':>9} {'peak RSS MiB':>13}   ({args.repeats} runs each)")
        for name, body in probes.items():
            seconds, peak = measure(WRAP.format(body=body), run_dir, args.repeats)
            print(f"{name:<12} {seconds:>9.2f} {peak:>13.0f}")
        seconds, peak = measure(TREE, run_dir, args.repeats)
        print(f"{'tree':<12} {seconds:>9.2f} {peak:>13.0f}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
