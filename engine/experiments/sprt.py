"""The sequential tests of an A/B experiment, looked at after every pair of runs.

Why sequential: a run of looptree costs real tokens and GPU time, so an experiment should stop
as soon as the evidence is enough, and looking after every pair must not inflate the error
rates. Two tests share the experiment's α (Bonferroni: α/2 each, so the experiment as a whole
calls a difference that is not there with probability at most α):

* **Success** (did a run find a node credited significantly better than its baseline?): Wald's
  SPRT on the *discordant* pairs (one arm succeeded, the other did not; concordant pairs carry no
  information about which arm is better). Under "no difference" the test arm wins a discordant
  pair with probability 1/2; the alternative is 1/2 + `min_effect`. It is two-sided as two
  one-sided SPRTs (Sobel and Wald), each at α/4 and β: "test" when the test arm's SPRT crosses its
  upper bound, "control" likewise, "none" once both have accepted their null. With α = 0.05,
  β = 0.10, min effect 0.15 the first verdict needs ⌈ln(0.9/0.0125)/ln(1.3)⌉ = 17 straight wins
  (12 for a single one-sided SPRT at the full α = 0.05).

* **Speed-up** (paired log ratios d = ln(test's credited speed-up) − ln(control's)): a mixture
  SPRT that needs no distributional assumption beyond the one the paired design gives for free:
  when the arms do not differ, the two runs of a pair are exchangeable, so d is symmetric about 0
  (exact zeros included; many pairs where neither arm improved give d = 0). Given |d|, the sign
  is then a fair coin, so for any λ in (−1, 1) the product Π(1 + λ·sign(dᵢ)·wᵢ), wᵢ = min(1,
  |dᵢ|/τ), is a nonnegative martingale with mean 1; averaging it over a uniform grid of λ (the
  mixture) keeps that, and Ville's inequality bounds the chance that it *ever* reaches 1/α_m by
  α_m, however often it is looked at. τ = ln(1 + min_effect): smaller differences count
  proportionally less, so benchmark noise barely moves the statistic. Straight wins of at least
  τ decide after 9 pairs at α_m = 0.025. The same martingale on dᵢ − μ, for every μ, gives an
  always-valid confidence sequence for the centre of d (the typical log speed-up of test over
  control): the μ whose statistic stays below 1/α_m.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LAMBDAS = (np.arange(-20, 20) + 0.5) / 20.0  # a uniform grid on (−1, 1): the mixing distribution


# --------------------------------------------------------------------------- success SPRT


@dataclass
class SuccessSPRT:
    """Two one-sided Wald SPRTs on discordant pairs (+1: the test arm won, −1: the control arm)."""

    alpha: float  # this test's share of the experiment's α, split evenly between the two sides
    beta: float
    min_effect: float
    wins: int = 0
    losses: int = 0
    llr_test: float = 0.0
    llr_control: float = 0.0
    side_test: str | None = None  # None (running), "accept" (no test advantage), "reject" (test better)
    side_control: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.min_effect < 0.5:
            raise ValueError("min_effect must be in (0, 0.5)")
        p1 = 0.5 + self.min_effect
        self.step_win = math.log(p1 / 0.5)
        self.step_loss = math.log((1 - p1) / 0.5)
        self.upper = math.log((1 - self.beta) / (self.alpha / 2))
        self.lower = math.log(self.beta / (1 - self.alpha / 2))

    def update(self, outcome: int) -> None:
        """One discordant pair: +1 the test arm succeeded alone, −1 the control arm did."""
        if outcome > 0:
            self.wins += 1
        elif outcome < 0:
            self.losses += 1
        else:
            return
        test_step = self.step_win if outcome > 0 else self.step_loss
        control_step = self.step_loss if outcome > 0 else self.step_win
        if self.side_test is None:
            self.llr_test += test_step
            self.side_test = "reject" if self.llr_test >= self.upper else "accept" if self.llr_test <= self.lower else None
        if self.side_control is None:
            self.llr_control += control_step
            self.side_control = ("reject" if self.llr_control >= self.upper
                                 else "accept" if self.llr_control <= self.lower else None)

    @property
    def decision(self) -> str | None:
        if self.side_test == "reject":
            return "test"
        if self.side_control == "reject":
            return "control"
        if self.side_test == "accept" and self.side_control == "accept":
            return "none"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"test": "paired SPRT on discordant pairs (two one-sided Wald SPRTs)", "alpha": self.alpha,
                "alpha_per_side": self.alpha / 2, "beta": self.beta, "min_effect": self.min_effect,
                "p0": 0.5, "p1": 0.5 + self.min_effect, "wins_test": self.wins, "wins_control": self.losses,
                "llr_test": round(self.llr_test, 6), "llr_control": round(self.llr_control, 6),
                "upper": round(self.upper, 6), "lower": round(self.lower, 6),
                "side_test": self.side_test, "side_control": self.side_control, "decision": self.decision}


# --------------------------------------------------------------------------- mixture SPRT


def _log_mixture(d: np.ndarray, tau: float) -> float:
    """log of the λ-mixture of Π(1 + λ·sign(d)·min(1, |d|/τ)) (0 for no data)."""
    if d.size == 0:
        return 0.0
    weights = np.sign(d) * np.minimum(1.0, np.abs(d) / tau)
    logs = np.log1p(np.outer(weights, LAMBDAS)).sum(axis=0)
    top = logs.max()
    return float(top + math.log(np.exp(logs - top).mean()))


@dataclass
class MixtureSPRT:
    """Always-valid test of "no difference" (d symmetric about 0) and a confidence sequence."""

    alpha: float  # this test's share of the experiment's α (two-sided)
    min_effect: float
    diffs: list[float] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return math.log1p(self.min_effect)

    @property
    def threshold(self) -> float:
        return 1.0 / self.alpha

    def update(self, d: float) -> None:
        if math.isfinite(d):
            self.diffs.append(float(d))

    def log_evidence(self, mu: float = 0.0) -> float:
        return _log_mixture(np.asarray(self.diffs, dtype=float) - mu, self.tau)

    @property
    def decision(self) -> str | None:
        if self.log_evidence() >= math.log(self.threshold):
            mean = sum(math.copysign(min(1.0, abs(x) / self.tau), x) for x in self.diffs)
            return "test" if mean > 0 else "control"
        return None

    def confidence_sequence(self, points: int = 241) -> tuple[float, float]:
        """The μ (log speed-up of test over control) not rejected at α; ±inf where unbounded."""
        if not self.diffs:
            return (-math.inf, math.inf)
        data = np.asarray(self.diffs, dtype=float)
        span = max(float(data.max() - data.min()), 4 * self.tau)
        grid = np.linspace(float(data.min()) - span, float(data.max()) + span, points)
        limit = math.log(self.threshold)
        shifted = data[None, :] - grid[:, None]  # (points, n): every μ at once
        weights = np.sign(shifted) * np.minimum(1.0, np.abs(shifted) / self.tau)
        logs = np.log1p(weights[:, :, None] * LAMBDAS[None, None, :]).sum(axis=1)  # (points, λ)
        top = logs.max(axis=1)
        evidence = top + np.log(np.exp(logs - top[:, None]).mean(axis=1))
        kept = grid[evidence < limit]
        if kept.size == 0:
            return (math.nan, math.nan)  # every μ rejected: the data cannot be symmetric about any point
        low, high = float(kept.min()), float(kept.max())
        return (-math.inf if low <= grid[0] else float(low), math.inf if high >= grid[-1] else float(high))

    def to_dict(self) -> dict[str, Any]:
        low, high = self.confidence_sequence()
        evidence = math.exp(min(self.log_evidence(), 700.0))
        return {"test": "mixture SPRT on paired log speed-ups (sign-weighted betting martingale, uniform λ mixture)",
                "alpha": self.alpha, "tau": round(self.tau, 6), "pairs": len(self.diffs),
                "evidence": round(evidence, 6), "threshold": self.threshold,
                "mean_log_speedup": round(sum(self.diffs) / len(self.diffs), 6) if self.diffs else None,
                "cs_log_low": _finite_or_none(low), "cs_log_high": _finite_or_none(high),
                "cs_ratio_low": _finite_or_none(math.exp(low) if math.isfinite(low) else low),
                "cs_ratio_high": _finite_or_none(math.exp(high) if math.isfinite(high) else high),
                "decision": self.decision}


def _finite_or_none(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


# --------------------------------------------------------------------------- the experiment


@dataclass
class PairOutcome:
    """What the tests need from one pair: each arm's success and credited speed-up (None: not measured)."""

    success_control: bool
    success_test: bool
    ratio_control: float | None
    ratio_test: float | None


@dataclass
class Sequential:
    """Both tests with α split evenly (Bonferroni), fed pair by pair."""

    alpha: float = 0.05
    beta: float = 0.10
    min_effect: float = 0.15
    pairs: int = 0
    success: SuccessSPRT = field(init=False)
    speedup: MixtureSPRT = field(init=False)

    def __post_init__(self) -> None:
        self.success = SuccessSPRT(self.alpha / 2, self.beta, self.min_effect)
        self.speedup = MixtureSPRT(self.alpha / 2, self.min_effect)

    def update(self, pair: PairOutcome) -> None:
        self.pairs += 1
        if pair.success_test != pair.success_control:
            self.success.update(1 if pair.success_test else -1)
        if (pair.ratio_control is not None and pair.ratio_test is not None
                and _usable(pair.ratio_control) and _usable(pair.ratio_test)):
            self.speedup.update(math.log(pair.ratio_test) - math.log(pair.ratio_control))

    def feed(self, pairs: Iterable[PairOutcome]) -> Sequential:
        for pair in pairs:
            self.update(pair)
        return self

    @property
    def decision(self) -> str | None:
        """"test" / "control" as soon as either test calls a difference; "none" when the SPRT accepts no difference."""
        for verdict in (self.success.decision, self.speedup.decision):
            if verdict in ("test", "control"):
                return verdict
        return self.success.decision  # "none" or None

    @property
    def decided_by(self) -> str | None:
        if self.success.decision in ("test", "control"):
            return "success"
        if self.speedup.decision in ("test", "control"):
            return "speedup"
        return "success" if self.success.decision == "none" else None

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "min_effect": self.min_effect,
                "alpha_split": "Bonferroni: alpha/2 to the success SPRT (alpha/4 per side), alpha/2 to the mixture SPRT",
                "pairs": self.pairs, "decision": self.decision, "decided_by": self.decided_by,
                "success": self.success.to_dict(), "speedup": self.speedup.to_dict()}


def _usable(ratio: float | None) -> bool:
    return ratio is not None and math.isfinite(ratio) and ratio > 0


def straight_wins_needed(alpha: float, beta: float, min_effect: float) -> int:
    """How many consecutive discordant wins the success SPRT needs for its first verdict."""
    sprt = SuccessSPRT(alpha, beta, min_effect)
    return math.ceil(sprt.upper / sprt.step_win - 1e-12)


def fixed_sample_size(alpha_one_sided: float, beta: float, min_effect: float) -> int:
    """Discordant pairs a fixed-sample one-sided binomial (normal approximation) test would need."""
    from statistics import NormalDist

    z_a, z_b = NormalDist().inv_cdf(1 - alpha_one_sided), NormalDist().inv_cdf(1 - beta)
    p1 = 0.5 + min_effect
    return math.ceil(((z_a * 0.5 + z_b * math.sqrt(p1 * (1 - p1))) / min_effect) ** 2)


__all__: Sequence[str] = [
    "MixtureSPRT",
    "PairOutcome",
    "Sequential",
    "SuccessSPRT",
    "fixed_sample_size",
    "straight_wins_needed",
]
