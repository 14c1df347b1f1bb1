"""Correctness gate for solver.py: its results must equal reference.py's, exactly.

Runs every solver helper on seeded random inputs (compared with reference.py) and on the
held-out cases in hidden/holdout.json (compared with the answers stored there). Prints one
line per mismatch, with the case name and, for the seeded cases, the first differing position
(a held-out case only says that it failed, so its answers stay hidden), and exits 1 if there
is any; exits 0 when everything matches. A helper that raises counts as a mismatch.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import reference  # noqa: E402  (after the path tweak on purpose)

HOLDOUT = HERE / "hidden" / "holdout.json"
SEEDS = range(6)


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal here: JSON has no tuples."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _first_difference(expected: Any, got: Any) -> str:
    """A short description of where two results part ways."""
    if isinstance(expected, list) and isinstance(got, list):
        for index, (want, have) in enumerate(zip(expected, got)):
            if want != have:
                return f"index {index}: expected {want!r}, got {have!r}"
        return f"length: expected {len(expected)}, got {len(got)}"
    return f"expected {expected!r}, got {got!r}"


def _random_cases(seed: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(case name, helper name, kwargs) for one seed; sizes stay small so this runs fast."""
    rng = random.Random(seed)
    spread = rng.choice([5, 100, 10_000])
    values = [rng.randrange(-spread, spread) for _ in range(rng.randrange(0, 300))]
    field = rng.choice([20, 1_000, 100_000])
    points = [(rng.randrange(-field, field), rng.randrange(-field, field)) for _ in range(rng.randrange(0, 250))]
    radius = rng.choice([0, 1, 3, field // 10, field])
    vocabulary = ["alpha", "Beta", "gamma's", "delta", "x2", "omega", "it's", "Zeta"]
    words = [rng.choice(vocabulary[: rng.randint(1, len(vocabulary))]) for _ in range(rng.randrange(0, 400))]
    text = rng.choice([" ", ", ", "; ", "\n", " -- "]).join(words)
    k = rng.choice([0, 1, 3, 10])
    name = f"seed {seed}"
    return [
        (name, "count_smaller_right", {"values": values}),
        (name, "count_close_pairs", {"points": points, "radius": radius}),
        (name, "top_k_tokens", {"text": text, "k": k}),
        (name, "solve", {"values": values, "points": points, "radius": radius, "text": text, "k": k}),
    ]


def _holdout_cases() -> list[tuple[str, str, dict[str, Any], Any]]:
    """(case name, helper name, kwargs, stored answer) from the held-out file."""
    if not HOLDOUT.is_file():
        print(f"check: the held-out cases file {HOLDOUT.relative_to(HERE)} is missing", file=sys.stderr)
        sys.exit(2)
    cases = []
    for case in json.loads(HOLDOUT.read_text(encoding="utf-8")):
        kwargs = dict(case["args"])
        if "points" in kwargs:
            kwargs["points"] = [tuple(p) for p in kwargs["points"]]
        cases.append((f"holdout {case['name']}", case["function"], kwargs, case["expected"]))
    return cases


def _run(helper: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    """Call a solver helper on a private copy of its inputs; (ok, result or error text)."""
    private = json.loads(json.dumps(kwargs))  # the helper may not mutate what we compare with
    if "points" in private:
        private["points"] = [tuple(p) for p in private["points"]]
    try:
        return True, helper(**private)
    except Exception as exc:
        return False, f"raised {type(exc).__name__}: {exc}"


def main() -> int:
    try:
        import solver
    except Exception as exc:
        print(f"check: cannot import solver.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1

    failures: list[str] = []
    total = 0
    planned = [(n, f, kw, _plain(getattr(reference, f)(**kw))) for s in SEEDS for n, f, kw in _random_cases(s)]
    planned += _holdout_cases()
    for name, function, kwargs, expected in planned:
        total += 1
        helper = getattr(solver, function, None)
        if not callable(helper):
            failures.append(f"{function} [{name}]: solver.py has no function {function}")
            continue
        ok, got = _run(helper, kwargs)
        if not ok:
            failures.append(f"{function} [{name}]: {got}")
            continue
        got = _plain(got)
        if got != expected and name.startswith("holdout"):
            failures.append(f"{function} [{name}]: wrong result (held-out case; details withheld)")
        elif got != expected:
            lines = []
            if isinstance(expected, dict) and isinstance(got, dict):
                for key in sorted(set(expected) | set(got)):
                    if got.get(key) != expected.get(key):
                        detail = _first_difference(expected.get(key), got.get(key))
                        lines.append(f"{function} [{name}] key {key!r}: {detail}")
            failures.extend(lines or [f"{function} [{name}]: {_first_difference(expected, got)}"])

    for line in failures:
        print(f"MISMATCH {line}")
    if failures:
        print(f"check: {len(failures)} mismatch(es) in {total} cases")
        return 1
    print(f"check: all {total} cases match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
