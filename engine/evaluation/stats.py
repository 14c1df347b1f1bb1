"""Is a candidate really better than its parent, or is it noise?

Why this shape: benchmark repeats are few (5–30), skewed and sometimes bimodal, so a rank test
decides *whether* there is a shift, and a bootstrap CI of the ratio of medians says *how big* it
is. The rank test is the one-sided Mann-Whitney U for two independent samples, or, when parent and
candidate were timed in back-to-back pairs, the one-sided Wilcoxon signed-rank test on the pairs'
log ratios, with the median ratio within a pair as the effect and its CI: shared machines drift
between fast and slow spells that last seconds, and pairing cancels them
(``benchmarks/noise_bench.py`` measures the difference). A candidate is "better" only if the shift is significant at the
one-sided level ``alpha`` AND the CI's bound on the better side clears 1 (or 1 ± a practical
margin). The CI is two-sided at 1 - 2·alpha, so each of its bounds is a one-sided bound at alpha,
the same level as the test: the two halves of the decision agree instead of one silently being
twice as strict. When the evaluator looks more than once, ``alpha`` is that look's nominal level
from ``engine.sequential``. Everything is seeded, so the same numbers always give the same
verdict (resume and replay must agree with the live run).

Pure numpy/scipy; no I/O, no torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import mannwhitneyu, wilcoxon

Label = Literal["better", "no significant change", "worse"]


@dataclass(frozen=True)
class Verdict:
    """The outcome of ``compare``. ``ratio`` is median(candidate) / median(parent)."""

    label: Label
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float  # one-sided, in the direction of improvement
    n_parent: int
    n_candidate: int
    p_value_worse: float = 1.0  # one-sided, in the direction of regression
    noise_floor: float = 0.0
    lower_is_better: bool = True
    ci_level: float = 0.90  # two-sided coverage of [ci_low, ci_high]: 1 - 2·alpha

    @property
    def improvement_bound(self) -> float:
        """The ratio the whole CI must clear to count as better (1 - floor or 1 + floor)."""
        return 1.0 - self.noise_floor if self.lower_is_better else 1.0 + self.noise_floor

    @property
    def regression_bound(self) -> float:
        return 1.0 + self.noise_floor if self.lower_is_better else 1.0 - self.noise_floor


def _clean(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError(f"{what}: no measurements")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: measurements contain NaN or inf")
    return arr


def iqr_filter(values: Sequence[float], k: float = 1.5) -> list[float]:
    """Drop values outside [Q1 - k·IQR, Q3 + k·IQR] (a stray slow run from a noisy neighbour).

    Never drops everything: identical values have IQR 0 and all survive.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size < 4:
        return arr.tolist()
    q1, q3 = np.percentile(arr, [25, 75])
    iqr = q3 - q1
    keep = arr[(arr >= q1 - k * iqr) & (arr <= q3 + k * iqr)]
    return (keep if keep.size else arr).tolist()


def bootstrap_ratio_ci(
    parent: np.ndarray, candidate: np.ndarray, *, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of median(candidate) / median(parent), seeded."""
    rng = np.random.default_rng(seed)
    p_idx = rng.integers(0, parent.size, size=(n_boot, parent.size))
    c_idx = rng.integers(0, candidate.size, size=(n_boot, candidate.size))
    p_med = np.median(parent[p_idx], axis=1)
    c_med = np.median(candidate[c_idx], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = c_med / p_med
    ratios = ratios[np.isfinite(ratios)]
    if ratios.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(ratios, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def _one_sided_p(x: np.ndarray, y: np.ndarray, alternative: str) -> float:
    """P-value that x is stochastically less/greater than y; 1.0 when the test cannot run."""
    if np.all(x == x[0]) and np.all(y == y[0]) and x[0] == y[0]:
        return 1.0  # identical constants: no evidence either way (scipy would warn)
    p = float(mannwhitneyu(x, y, alternative=alternative, method="auto").pvalue)
    return max(p, smallest_p(y.size, x.size, paired=False))  # the normal approximation can undershoot


def paired_differences(parent: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per pair, log(candidate / parent); plain differences when a value is not positive.

    Log ratios because machine noise is multiplicative: a slow spell that makes both runs of a
    pair 30 % slower leaves their log ratio unchanged.
    """
    if np.all(parent > 0) and np.all(candidate > 0):
        return np.log(candidate / parent)
    return candidate - parent


def paired_ratio_ci(parent: np.ndarray, candidate: np.ndarray, *, alpha: float = 0.05, n_boot: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """The typical ratio within a pair and its percentile bootstrap (1 - alpha) CI, seeded.

    The estimate is the median of the pairs' ratios (exp of the median log ratio), the effect the
    signed-rank test is about; pairs are resampled whole. A ratio of the two sides' medians would
    let a slow spell that hit parent and candidate alike widen the interval again. With values
    that are not all positive, the median difference is expressed relative to the parent's median.
    """
    d = paired_differences(parent, candidate)
    rng = np.random.default_rng(seed)
    meds = np.median(d[rng.integers(0, d.size, size=(n_boot, d.size))], axis=1)
    lo, hi = np.percentile(meds, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    if np.all(parent > 0) and np.all(candidate > 0):
        return float(np.exp(np.median(d))), float(np.exp(lo)), float(np.exp(hi))
    scale = abs(float(np.median(parent)))
    if scale == 0:
        return math.nan, math.nan, math.nan
    return 1.0 + float(np.median(d)) / scale, 1.0 + float(lo) / scale, 1.0 + float(hi) / scale


def _signed_rank_p(d: np.ndarray, alternative: str) -> float:
    """One-sided Wilcoxon signed-rank p-value that the differences are less/greater than 0."""
    if np.all(d == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties or zeros: scipy switches to its normal approximation
        p = float(wilcoxon(d, alternative=alternative, zero_method="wilcox", method="auto").pvalue)
    return max(p, 0.5 ** int(np.count_nonzero(d)))  # the normal approximation can undershoot


def smallest_p(n_parent: int, n_candidate: int, *, paired: bool) -> float:
    """The smallest one-sided p-value the test can give at these sizes (all ranks on one side)."""
    if paired:
        return 0.5 ** min(n_parent, n_candidate)
    return 1.0 / math.comb(n_parent + n_candidate, n_parent)


def compare(
    parent: Sequence[float],
    candidate: Sequence[float],
    *,
    lower_is_better: bool = True,
    alpha: float = 0.05,
    noise_floor: float | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    filter_outliers: bool = False,
    paired: bool = False,
) -> Verdict:
    """Decide better / no significant change / worse for one metric (see module doc).

    ``alpha`` is the one-sided level of this look. ``noise_floor`` is a relative margin
    (0.02 = 2 %) the CI must also clear; ``None`` means 0. With ``filter_outliers`` both samples
    go through ``iqr_filter`` first (not with ``paired``: it would break the pairs).

    ``paired``: ``parent[i]`` and ``candidate[i]`` were timed back to back, so the test is the
    Wilcoxon signed-rank test on the pairs' log ratios, ``ratio`` is the median ratio within a
    pair, and the bootstrap resamples pairs (``paired_ratio_ci``). Noise
    that drifts over seconds (a neighbour's job, clocks, thermals) then cancels within each pair
    instead of swamping the comparison, as it does for the unpaired Mann-Whitney test.
    """
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    p = _clean(parent, "parent")
    c = _clean(candidate, "candidate")
    if paired and p.size != c.size:
        raise ValueError(f"paired comparison needs as many parent as candidate runs ({p.size} vs {c.size})")
    if filter_outliers and not paired:
        p, c = np.asarray(iqr_filter(p.tolist())), np.asarray(iqr_filter(c.tolist()))
    floor = 0.0 if noise_floor is None else max(0.0, float(noise_floor))
    better_alt, worse_alt = ("less", "greater") if lower_is_better else ("greater", "less")
    if paired:
        d = paired_differences(p, c)
        p_better, p_worse = _signed_rank_p(d, better_alt), _signed_rank_p(d, worse_alt)
    else:
        p_better = _one_sided_p(c, p, better_alt)
        p_worse = _one_sided_p(c, p, worse_alt)
    if paired:
        ratio, ci_low, ci_high = paired_ratio_ci(p, c, alpha=2.0 * alpha, n_boot=n_boot, seed=seed)
    else:
        med_p = float(np.median(p))
        ratio = float(np.median(c)) / med_p if med_p != 0 else math.nan
        ci_low, ci_high = bootstrap_ratio_ci(p, c, alpha=2.0 * alpha, n_boot=n_boot, seed=seed)

    label: Label = "no significant change"
    ci_known = not (math.isnan(ci_low) or math.isnan(ci_high))
    if lower_is_better:
        clears_better = ci_known and ci_high < 1.0 - floor
        clears_worse = ci_known and ci_low > 1.0 + floor
    else:
        clears_better = ci_known and ci_low > 1.0 + floor
        clears_worse = ci_known and ci_high < 1.0 - floor
    if p_better < alpha and clears_better:
        label = "better"
    elif p_worse < alpha and clears_worse:
        label = "worse"
    return Verdict(
        label=label,
        ratio=ratio,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=p_better,
        n_parent=int(p.size),
        n_candidate=int(c.size),
        p_value_worse=p_worse,
        noise_floor=floor,
        lower_is_better=lower_is_better,
        ci_level=1.0 - 2.0 * alpha,
    )


def noise_floor(a1: Sequence[float], a2: Sequence[float], *, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> float:
    """Relative noise from an A/A measurement (the parent timed twice).

    The largest distance from 1 that the A/A ratio CI reaches: any real change must be bigger
    than what the same code shows against itself.
    """
    x = _clean(a1, "A/A first run")
    y = _clean(a2, "A/A second run")
    lo, hi = bootstrap_ratio_ci(x, y, alpha=alpha, n_boot=n_boot, seed=seed)
    if math.isnan(lo) or math.isnan(hi):
        return 0.0
    return float(max(abs(1.0 - lo), abs(hi - 1.0)))


def adaptive_repeats(verdict: Verdict, *, max_repeats: int, step: int | None = None) -> int:
    """How many more repeats of the candidate (and parent) to run; 0 means decide now.

    More repeats only for a close call: no significant verdict yet, the CI still reaches past
    the noise floor on some side (so more data could settle it), and the cap is not reached.
    A CI entirely inside ±floor is settled as "no significant change". ``step`` defaults to
    doubling the sample, clipped to the cap.
    """
    n = verdict.n_candidate
    if verdict.label != "no significant change" or n >= max_repeats:
        return 0
    if math.isnan(verdict.ci_low) or math.isnan(verdict.ci_high):
        return 0
    floor = verdict.noise_floor
    inside = 1.0 - floor <= verdict.ci_low and verdict.ci_high <= 1.0 + floor
    if inside and floor > 0:
        return 0
    more = step if step is not None else max(1, n)
    return max(0, min(more, max_repeats - n))
