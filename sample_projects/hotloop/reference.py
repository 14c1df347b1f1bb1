"""Trusted reference results for solver.py: slow, short, and obviously right.

check.py compares solver.py against these functions. They are deliberately written in a
different shape from solver.py (comprehensions, itertools, a plain dict) so that a bug
copied into one is unlikely to be copied into the other. Do not optimize this file.
"""

from __future__ import annotations

import itertools
import re

_WORD = r"[a-z0-9']+"


def count_smaller_right(values: list[int]) -> list[int]:
    """Position by position, the number of strictly smaller values further right."""
    return [sum(1 for later in values[pos + 1 :] if later < value) for pos, value in enumerate(values)]


def count_close_pairs(points: list[tuple[int, int]], radius: int) -> int:
    """Unordered pairs at distance <= radius; integer coordinates keep this exact."""
    limit = radius * radius
    return sum(
        1
        for (ax, ay), (bx, by) in itertools.combinations(points, 2)
        if (ax - bx) * (ax - bx) + (ay - by) * (ay - by) <= limit
    )


def top_k_tokens(text: str, k: int) -> list[tuple[str, int]]:
    """(token, count) pairs, highest count first, equal counts in token order, at most k."""
    tally: dict[str, int] = {}
    for word in re.findall(_WORD, text.lower()):
        tally[word] = tally.get(word, 0) + 1
    ordered = sorted(tally.items(), key=lambda pair: (-pair[1], pair[0]))
    return ordered[:k]


def solve(
    values: list[int],
    points: list[tuple[int, int]],
    radius: int,
    text: str,
    k: int,
) -> dict[str, object]:
    """The same bundle solver.solve returns."""
    return {
        "smaller_right": count_smaller_right(values),
        "close_pairs": count_close_pairs(points, radius),
        "top_tokens": top_k_tokens(text, k),
    }
