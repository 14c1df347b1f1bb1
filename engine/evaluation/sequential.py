"""How strict each look at the data must be when the evaluator may stop early.

Why this exists: the evaluator looks at a candidate after ``bench.repeats`` pairs and, if the call
is close, again after more pairs, up to ``bench.max_repeats``. Testing at the full alpha at every
look would call noise "better" more often than alpha; splitting alpha evenly over the looks
(Bonferroni) keeps the error rate but throws power away where it matters most, at the last look,
which is where close calls are decided.

The standard answer is a group-sequential design with an alpha-spending function (Lan & DeMets,
1983). We use the O'Brien-Fleming-type spending function

    spent(t) = 2 - 2 * Phi(z_{1 - alpha/2} / sqrt(t)),   t = pairs so far / max pairs,

which spends almost nothing at early looks (stopping early needs overwhelming evidence) and
leaves nearly all of alpha for the final look. The nominal per-look thresholds follow from the
joint law of the standardised statistic at the looks (a Brownian motion observed at the
information fractions), which is integrated numerically on a fixed grid: deterministic, no
Monte Carlo, a few milliseconds, cached.

The look schedule is the evaluator's own: the first look at ``repeats`` pairs, then the sample
doubles, clipped to the cap (``adaptive_repeats`` in ``engine.stats``).

Pure numpy/scipy; no I/O.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from scipy.stats import norm

_GRID = 401  # points per look; the boundaries' error in alpha is below 1e-6 (checked against 4001)


def _normal_tail(b: float, *, s: float) -> float:
    return float(norm.sf(b / s))


def _mixture_tail(b: float, *, g: np.ndarray, w: np.ndarray, s: float) -> float:
    return float(np.dot(w, norm.sf((b - g) / s)))


def look_schedule(first: int, cap: int) -> tuple[int, ...]:
    """Pairs at each look: ``first``, then doubling, clipped to ``cap`` (which is always the last)."""
    first = max(1, int(first))
    cap = max(first, int(cap))
    looks = [first]
    while looks[-1] < cap:
        looks.append(min(cap, 2 * looks[-1]))
    return tuple(looks)


def spent(t: float, alpha: float) -> float:
    """O'Brien-Fleming-type alpha spent by information fraction ``t`` (0 < t ≤ 1); alpha at t = 1."""
    if t >= 1.0:
        return alpha
    return float(2.0 - 2.0 * norm.cdf(norm.ppf(1.0 - alpha / 2.0) / math.sqrt(t)))


@lru_cache(maxsize=256)
def nominal_levels(looks: tuple[int, ...], alpha: float) -> tuple[float, ...]:
    """One-sided nominal p-value threshold for each look, so that the chance of ever crossing is alpha.

    ``looks`` are the cumulative sample sizes at each look (increasing); the last is the maximum.
    """
    if not looks or any(b <= a for a, b in zip(looks, looks[1:])) or looks[0] <= 0:
        raise ValueError(f"looks must be positive and increasing, got {looks}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    fractions = [n / looks[-1] for n in looks]
    levels: list[float] = []
    # Sub-density of the score S(t) (a standard Brownian motion under "no change") over paths
    # that have not crossed yet, on a grid; starts as a point mass at 0 before the first look.
    grid: np.ndarray | None = None
    density: np.ndarray | None = None
    previous_t = 0.0
    already_spent = 0.0
    for t in fractions:
        target = spent(t, alpha) - already_spent
        step_sd = math.sqrt(t - previous_t)
        tail: Callable[[float], float]
        if grid is None:  # the first look: the statistic is still a plain normal
            tail = functools.partial(_normal_tail, s=step_sd)
        else:  # later looks: the surviving density, moved on by one more normal step
            tail = functools.partial(_mixture_tail, g=grid, w=_trapezoid(grid) * density, s=step_sd)
        bound = _solve_bound(tail, target, scale=math.sqrt(t))
        levels.append(float(norm.sf(bound / math.sqrt(t))))
        already_spent += tail(bound)
        # Propagate the not-yet-crossed mass to this look: S_t on (-8 sqrt(t), bound).
        new_grid = np.linspace(-8.0 * math.sqrt(t), bound, _GRID)
        if grid is None:
            new_density = norm.pdf(new_grid / step_sd) / step_sd
        else:
            kernel = norm.pdf((new_grid[:, None] - grid[None, :]) / step_sd) / step_sd
            new_density = kernel @ (_trapezoid(grid) * density)
        grid, density, previous_t = new_grid, new_density, t
    return tuple(levels)


def plan(first: int, cap: int, alpha: float,
         min_p: Callable[[int], float] | None = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The looks of the schedule ``first`` → ``cap`` and the nominal one-sided level of each.

    ``min_p(n)`` is the smallest p-value the test can give at ``n`` pairs (a rank test on 5 pairs
    cannot go below 1/32). A look where even that cannot reach its level is taken out of the plan
    before any data is seen, so it spends no alpha and the later looks get it; at such a look the
    level returned is ``min_p(n)`` (at most the final level), which no result can get below.
    Fixed in advance, the plan keeps the overall chance of a false "better" at alpha.
    """
    looks = look_schedule(first, cap)
    active = list(looks)
    while True:
        levels = dict(zip(active, nominal_levels(tuple(active), alpha)))
        dead = [n for n in active if min_p is not None and min_p(n) >= levels[n]]
        if not dead or len(dead) == len(active):
            break
        active = [n for n in active if n not in dead]
    final = levels[active[-1]]

    def level(n: int) -> float:
        if min_p is None or (n in levels and min_p(n) < levels[n]):
            return levels[n]
        return min(min_p(n), final)  # out of the plan: a level no result can get below

    return looks, tuple(level(n) for n in looks)


def level_at(n: int, first: int, cap: int, alpha: float, min_p: Callable[[int], float] | None = None) -> float:
    """The nominal one-sided level for a look at ``n`` pairs under the schedule ``first`` → ``cap``.

    A look off the schedule (the config changed between a run and its resume) is judged at the
    strictest level among scheduled looks at or below ``n``, which never spends more than alpha.
    """
    looks, levels = plan(first, cap, alpha, min_p)
    if n in looks:
        return levels[looks.index(n)]
    if n >= looks[-1]:
        return levels[-1]
    eligible = [lvl for k, lvl in zip(looks, levels) if k <= n]
    return min(eligible) if eligible else levels[0]


def look_level(n: int, first: int, cap: int, alpha: float, *, paired: bool) -> float:
    """The level the evaluator tests at after ``n`` pairs, for the rank test it uses."""
    from looptree.engine.evaluation.stats import (
        smallest_p,  # local: stats is the consumer's module, keep this one leaf-like
    )

    return level_at(n, first, cap, alpha, min_p=lambda k: smallest_p(k, k, paired=paired))


def _trapezoid(grid: np.ndarray) -> np.ndarray:
    """Trapezoid-rule weights for an evenly spaced grid."""
    h = grid[1] - grid[0]
    w = np.full(grid.size, h)
    w[0] = w[-1] = h / 2.0
    return w


def _solve_bound(tail: Callable[[float], float], target: float, *, scale: float) -> float:
    """The score value b with tail(b) = target, by bisection (tail is decreasing in b)."""
    if target <= 0.0:
        return 12.0 * scale
    lo, hi = -8.0 * scale, 12.0 * scale
    for _ in range(80):
        mid = (lo + hi) / 2.0
        if tail(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0
