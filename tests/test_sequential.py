"""Alpha spending over the evaluator's looks: the published boundaries, and an error rate that holds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from looptree.engine.evaluation.sequential import level_at, look_schedule, nominal_levels, spent


def test_schedule_doubles_up_to_the_cap() -> None:
    assert look_schedule(5, 10) == (5, 10)
    assert look_schedule(4, 10) == (4, 8, 10)
    assert look_schedule(10, 10) == (10,)
    assert look_schedule(6, 4) == (6,)  # a cap below the first look means one look


def test_one_look_is_plain_alpha() -> None:
    assert nominal_levels((10,), 0.05) == pytest.approx((0.05,))


def test_matches_the_published_obrien_fleming_boundaries() -> None:
    # Lan-DeMets O'Brien-Fleming-type spending, two equally spaced looks, one-sided 0.025:
    # z = 2.963 then 1.969 (the values every group-sequential table gives).
    z = [norm.isf(p) for p in nominal_levels((5, 10), 0.025)]
    assert z == pytest.approx([2.963, 1.969], abs=2e-3)


def test_spending_is_cumulative_and_ends_at_alpha() -> None:
    assert spent(1.0, 0.05) == 0.05
    assert 0 < spent(0.25, 0.05) < spent(0.5, 0.05) < spent(0.9, 0.05) < 0.05


@pytest.mark.parametrize("looks", [(5, 10), (4, 8, 10), (4, 6), (3, 6, 12, 20)])
def test_the_chance_of_ever_crossing_is_alpha(looks: tuple[int, ...]) -> None:
    """Monte Carlo of the standardised statistic at the looks (a random walk of i.i.d. steps)."""
    alpha = 0.05
    levels = np.array(nominal_levels(looks, alpha))
    rng = np.random.default_rng(7)
    steps = rng.standard_normal((200_000, looks[-1]))
    walk = np.cumsum(steps, axis=1)
    z = np.stack([walk[:, n - 1] / np.sqrt(n) for n in looks], axis=1)
    crossed = (z > norm.isf(levels)).any(axis=1).mean()
    assert crossed == pytest.approx(alpha, abs=0.003)
    # ... and the last look keeps most of alpha, unlike splitting it evenly.
    assert levels[-1] > alpha / len(looks)
    assert list(levels) == sorted(levels)


def test_level_for_a_look_off_the_schedule_is_never_laxer() -> None:
    levels = nominal_levels((4, 8, 10), 0.05)
    assert level_at(4, 4, 10, 0.05) == levels[0]
    assert level_at(8, 4, 10, 0.05) == levels[1]
    assert level_at(10, 4, 10, 0.05) == levels[2]
    assert level_at(12, 4, 10, 0.05) == levels[2]
    assert level_at(9, 4, 10, 0.05) == levels[0]  # off schedule: the strictest look so far
    assert level_at(2, 4, 10, 0.05) == levels[0]


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError):
        nominal_levels((5, 5), 0.05)
    with pytest.raises(ValueError):
        nominal_levels((5, 10), 1.5)
