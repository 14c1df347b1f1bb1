"""Operating characteristics of `looptree ab`'s sequential tests, by seeded simulation.

Why simulation: the error rates are the product's promise ("stops early, keeps α and β"), and
they depend on every boundary and every split; only many simulated experiments show them. Each
check allows three Monte Carlo standard errors around the nominal rate (the published operating
characteristics: Wald 1945 for the SPRT, Ville's inequality for the mixture martingale).
"""

from __future__ import annotations

import math

import numpy as np

from looptree.engine.experiments.sprt import (
    MixtureSPRT,
    PairOutcome,
    Sequential,
    SuccessSPRT,
    fixed_sample_size,
    straight_wins_needed,
)

ALPHA, BETA, EFFECT = 0.05, 0.10, 0.15


def mc_slack(p: float, n: int) -> float:
    return 3 * math.sqrt(p * (1 - p) / n)


def run_sprt(rng: np.random.Generator, p: float, alpha: float, max_steps: int = 3000) -> tuple[str | None, int]:
    sprt = SuccessSPRT(alpha, BETA, EFFECT)
    for step, win in enumerate(rng.random(max_steps) < p, start=1):
        sprt.update(1 if win else -1)
        if sprt.decision is not None:
            return sprt.decision, step
    return None, max_steps


def test_success_sprt_type_one_error_and_power_match_wald() -> None:
    rng = np.random.default_rng(20260601)
    sims = 2000
    alpha = ALPHA / 2  # the success test's share in an experiment
    null = [run_sprt(rng, 0.5, alpha)[0] for _ in range(sims)]
    false_calls = sum(v in ("test", "control") for v in null) / sims
    assert false_calls <= alpha + mc_slack(alpha, sims), false_calls
    assert sum(v is None for v in null) == 0, "the SPRT ends with probability one"

    runs = [run_sprt(rng, 0.5 + EFFECT, alpha) for _ in range(sims)]
    power = sum(v == "test" for v, _ in runs) / sims
    assert power >= (1 - BETA) - mc_slack(1 - BETA, sims), power
    assert sum(v == "control" for v, _ in runs) / sims <= alpha / 2 + mc_slack(alpha / 2, sims)
    # The point of a sequential test: on average far fewer discordant pairs than a fixed sample
    # with the same error rates (the framework's promise: 30–50% fewer).
    mean_n = sum(n for _, n in runs) / sims
    fixed = fixed_sample_size(alpha / 2, BETA, EFFECT)
    assert mean_n <= 0.75 * fixed, (mean_n, fixed)


def test_straight_wins_needed_matches_the_seed_parameters() -> None:
    # One one-sided SPRT at the full α = 0.05 (the framework's statement): 12 straight wins.
    assert straight_wins_needed(0.05 * 2, BETA, EFFECT) == 12
    # In an experiment: α/2 to this test, split over two sides.
    assert straight_wins_needed(ALPHA / 2, BETA, EFFECT) == 17
    sprt = SuccessSPRT(ALPHA / 2, BETA, EFFECT)
    for _ in range(16):
        sprt.update(1)
    assert sprt.decision is None
    sprt.update(1)
    assert sprt.decision == "test"


def test_mixture_sprt_is_always_valid_under_optional_stopping() -> None:
    """Look after every pair, stop at the first crossing: still at most α false calls (Ville)."""
    rng = np.random.default_rng(7)
    sims, horizon, alpha = 1500, 60, 0.05
    false_calls = 0
    for i in range(sims):
        # Symmetric, heavy-tailed and discrete all at once: a third exact zeros (neither arm improved),
        # the rest a scale mixture of Laplace noise with random signs.
        raw = rng.laplace(0, rng.choice([0.02, 0.2, 1.0]), horizon)
        d = np.where(rng.random(horizon) < 1 / 3, 0.0, raw)
        test = MixtureSPRT(alpha, EFFECT)
        for x in d:
            test.update(float(x))
            if test.decision is not None:
                false_calls += 1
                break
    rate = false_calls / sims
    assert rate <= alpha + mc_slack(alpha, sims), rate


def test_mixture_confidence_sequence_covers_the_centre_at_every_look() -> None:
    rng = np.random.default_rng(11)
    sims, horizon, alpha, centre = 300, 30, 0.1, math.log(1.3)
    missed = 0
    for _ in range(sims):
        test = MixtureSPRT(alpha, EFFECT)
        for x in centre + rng.normal(0, 0.3, horizon):
            test.update(float(x))
            low, high = test.confidence_sequence(points=81)
            if not low <= centre <= high:
                missed += 1
                break
    assert missed / sims <= alpha + mc_slack(alpha, sims), missed / sims


def test_mixture_decides_a_clear_speedup_within_nine_pairs() -> None:
    test = MixtureSPRT(ALPHA / 2, EFFECT)
    for n in range(1, 10):
        test.update(math.log(1.5))
        assert (test.decision == "test") == (n == 9), n
    low, high = test.confidence_sequence()
    assert 0 < low <= math.log(1.5) <= high


def test_experiment_as_a_whole_keeps_alpha_and_stops_early_under_a_real_difference() -> None:
    rng = np.random.default_rng(3)
    sims, horizon = 600, 80

    def pair(p_control: float, p_test: float) -> PairOutcome:
        sc, st = rng.random() < p_control, rng.random() < p_test
        rc = math.exp(abs(rng.normal(0.3, 0.2))) if sc else 1.0
        rt = math.exp(abs(rng.normal(0.3, 0.2))) if st else 1.0
        return PairOutcome(sc, st, rc, rt)

    false_calls = 0
    for _ in range(sims):
        seq = Sequential(ALPHA, BETA, EFFECT)
        for _ in range(horizon):
            seq.update(pair(0.4, 0.4))
            if seq.decision is not None:
                break
        false_calls += seq.decision in ("test", "control")
    assert false_calls / sims <= ALPHA + mc_slack(ALPHA, sims), false_calls / sims

    # The held-out scenario: control never improves anything, the test arm usually does.
    stops = []
    for _ in range(200):
        seq = Sequential(ALPHA, BETA, EFFECT)
        for _ in range(horizon):
            seq.update(pair(0.0, 0.8))
            if seq.decision is not None:
                break
        assert seq.decision == "test"
        stops.append(seq.pairs)
    assert np.median(stops) <= 12, np.median(stops)
