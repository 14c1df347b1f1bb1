"""Benchmark for solver.py: times the three report helpers on seeded, fixed-size inputs.

Usage: python bench.py [METRICS_CSV]   (default: $LOOPTREE_METRICS, else metrics.csv)

Each timing iteration builds fresh inputs from its own seed (so a result cached from an
earlier iteration cannot help), measures the CPU time of every helper once, and appends one
CSV row that is flushed at once, so a watcher can tail the file while the benchmark runs. The
columns follow looptree's metrics protocol: `iteration`, then metrics whose names say which
way is better; the leftmost, total_ms, is the one that matters most.

Correctness is check.py's job; this script only refuses to report a time for a helper that
raised, and then exits with status 1 and the helper's error on stderr.
"""

from __future__ import annotations

import csv
import gc
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

ITERATIONS = 3
NUM_VALUES = 2800          # count_smaller_right input length
VALUE_RANGE = 50_000       # small enough that values repeat
NUM_POINTS = 1400          # count_close_pairs input size
FIELD = 100_000            # points lie in [0, FIELD) x [0, FIELD)
RADIUS = 2500              # about three neighbours per point on average
NUM_WORDS = 10_000         # tokens in the operators' notes
VOCABULARY = 600           # distinct words, drawn with Zipf-like weights
TOP_K = 25

HEADER = [
    "iteration",
    "total_ms (lower is better)",
    "rank_ms (lower is better)",
    "pairs_ms (lower is better)",
    "tokens_ms (lower is better)",
    "throughput_kitems_s (higher is better)",
]

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "ph", "an", "el", "or"]


def _vocabulary(rng: random.Random) -> list[str]:
    """Pronounceable, distinct, deterministic words (a few with apostrophes or digits)."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < VOCABULARY:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.05:
            word += rng.choice(["'s", "2", "'d"])
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_inputs(seed: int) -> dict[str, object]:
    """The arguments for one timing iteration; the same seed always gives the same inputs."""
    rng = random.Random(seed)
    values = [rng.randrange(VALUE_RANGE) for _ in range(NUM_VALUES)]
    points = [(rng.randrange(FIELD), rng.randrange(FIELD)) for _ in range(NUM_POINTS)]
    words = _vocabulary(rng)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    chosen = rng.choices(words, weights=weights, k=NUM_WORDS)
    pieces: list[str] = []
    for index, word in enumerate(chosen):
        if index % 11 == 0:
            word = word.capitalize()
        pieces.append(word)
        pieces.append(". " if index % 13 == 12 else (", " if index % 7 == 6 else " "))
    return {"values": values, "points": points, "radius": RADIUS, "text": "".join(pieces), "k": TOP_K}


def _fail(what: str, exc: BaseException) -> NoReturn:
    """Report a solver error on stderr and stop with status 1."""
    print(f"bench: {what} raised {type(exc).__name__}: {exc}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr, limit=-3)
    sys.exit(1)


def _time_ms(name: str, call: Callable[[], object]) -> float:
    """CPU time of one call in milliseconds, with the collector quiet while it runs.

    CPU time of this process rather than wall time: the helpers are single-threaded and
    CPU-bound, and looptree may benchmark several candidates at once on a small machine,
    where wall time would mostly measure the neighbours.
    """
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        call()
        return (time.process_time() - start) * 1000.0
    except Exception as exc:  # any failure of the code under test ends the run
        _fail(f"solver.{name}", exc)
    finally:
        gc.enable()


def main(argv: list[str]) -> int:
    out_path = argv[1] if len(argv) > 1 else os.environ.get("LOOPTREE_METRICS", "metrics.csv")
    try:
        import solver
    except Exception as exc:
        _fail("import solver", exc)

    with open(out_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        handle.flush()
        for iteration in range(1, ITERATIONS + 1):
            args = build_inputs(seed=20240 + iteration)
            values, points, radius = args["values"], args["points"], args["radius"]
            text, k = args["text"], args["k"]
            rank_ms = _time_ms("count_smaller_right", lambda: solver.count_smaller_right(values))
            pairs_ms = _time_ms("count_close_pairs", lambda: solver.count_close_pairs(points, radius))
            tokens_ms = _time_ms("top_k_tokens", lambda: solver.top_k_tokens(text, k))
            total_ms = rank_ms + pairs_ms + tokens_ms
            items = NUM_VALUES + NUM_POINTS + NUM_WORDS
            throughput = items / max(total_ms, 1e-6)  # items per ms == thousands of items per s
            writer.writerow(
                [iteration]
                + [f"{x:.3f}" for x in (total_ms, rank_ms, pairs_ms, tokens_ms, throughput)]
            )
            handle.flush()
            print(
                f"iteration {iteration}: total {total_ms:.1f} ms "
                f"(rank {rank_ms:.1f}, pairs {pairs_ms:.1f}, tokens {tokens_ms:.1f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
