"""Hot paths of the nightly sensor-quality report.

The report scores a day of readings in three ways: how out of order each reading is
(`count_smaller_right`), how many sensor sites sit close enough to interfere
(`count_close_pairs`), and which words dominate the operators' free-text notes
(`top_k_tokens`). Each helper is written the obvious way, which was fine for a few hundred
rows and is now the slowest part of the job. `solve` runs all three and is what the
report calls; its results must not change.
"""

from __future__ import annotations

import math
import re


def count_smaller_right(values: list[int]) -> list[int]:
    """For every position i, how many values after position i are strictly smaller."""
    n = len(values)
    counts = [0] * n
    for i in range(n):
        current = values[i]
        smaller = 0
        for j in range(i + 1, n):
            if values[j] < current:
                smaller += 1
        counts[i] = smaller
    return counts


def count_close_pairs(points: list[tuple[int, int]], radius: int) -> int:
    """How many unordered pairs of points lie at Euclidean distance <= radius."""
    total = 0
    n = len(points)
    for i in range(n):
        x1, y1 = points[i]
        for j in range(i + 1, n):
            x2, y2 = points[j]
            if math.sqrt((x1 - x2) ** 2 + (y1 - y2) ** 2) <= radius:
                total += 1
    return total


def _tokenize(text: str) -> list[str]:
    """Lower-cased words: maximal runs of letters, digits and apostrophes."""
    return re.findall(r"[a-z0-9']+", text.lower())


def top_k_tokens(text: str, k: int) -> list[tuple[str, int]]:
    """The k most frequent tokens as (token, count): most frequent first, ties by token."""
    tokens = _tokenize(text)
    ranked = []
    for token in set(tokens):
        ranked.append((token, tokens.count(token)))
    ranked.sort(key=lambda item: (-item[1], item[0]))
    return ranked[:k]


def solve(
    values: list[int],
    points: list[tuple[int, int]],
    radius: int,
    text: str,
    k: int,
) -> dict[str, object]:
    """Everything the report needs, in one call."""
    return {
        "smaller_right": count_smaller_right(values),
        "close_pairs": count_close_pairs(points, radius),
        "top_tokens": top_k_tokens(text, k),
    }
