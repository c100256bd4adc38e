"""Statistics over repeated runs: summaries with Student-t intervals, Welch's and the paired t-test,
and how many seeds a difference needs. Pure functions on plain numbers (no TensorFlow, no files).

Every interval is two-sided at 95 %. Differences are always `b - a`: the second side minus the
first, as `dvc metrics diff` prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import special

LEVEL = 0.95  # confidence level of every interval here
ALPHA = 1.0 - LEVEL  # two-sided significance level of the tests
POWER = 0.8  # power that `seeds_needed` asks for
MAX_SEEDS = 100_000  # `seeds_needed` gives up beyond this many seeds per side


def t_quantile(probability: float, df: float) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom."""
    return float(special.stdtrit(df, probability))


def _two_sided_p(t: float, df: float) -> float:
    return float(2.0 * special.stdtr(df, -abs(t)))


def mean(values: Sequence[float]) -> float:
    # fsum: exactly rounded, so the result does not depend on the order of the values.
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (n - 1); needs two values or more."""
    if len(values) < 2:
        raise ValueError("a sample standard deviation needs at least two values")
    centre = mean(values)
    return math.sqrt(math.fsum((value - centre) ** 2 for value in values) / (len(values) - 1))


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and the 95 % Student-t interval of the mean; std and interval are None for n = 1."""

    n: int
    mean: float
    std: float | None
    ci95_low: float | None
    ci95_high: float | None

    def scalars(self) -> dict[str, float | int]:
        """The fields as a flat dict of scalars (DVC drops list values), leaving out the undefined ones."""
        fields = {"n": self.n, "mean": self.mean, "std": self.std, "ci95_low": self.ci95_low, "ci95_high": self.ci95_high}
        return {key: value for key, value in fields.items() if value is not None}


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("nothing to summarize")
    centre = mean(values)
    if len(values) < 2:
        return Summary(1, centre, None, None, None)
    std = sample_std(values)
    half = t_quantile(1.0 - ALPHA / 2, len(values) - 1) * std / math.sqrt(len(values))
    return Summary(len(values), centre, std, centre - half, centre + half)


@dataclass(frozen=True)
class Difference:
    """`b - a` with its 95 % interval and the t-test behind it."""

    test: str  # "welch" or "paired"
    estimate: float
    ci95_low: float
    ci95_high: float
    t: float
    df: float
    p_value: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (p < 0.05). False when the test is undefined (no spread at all)."""
        return not math.isnan(self.p_value) and self.p_value < ALPHA


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom for the difference of two means with unequal variances."""
    share_a, share_b = var_a / n_a, var_b / n_b
    denominator = share_a**2 / (n_a - 1) + share_b**2 / (n_b - 1)
    return (share_a + share_b) ** 2 / denominator if denominator > 0 else math.nan


def _difference(test: str, estimate: float, standard_error: float, df: float) -> Difference:
    if standard_error == 0.0:
        # No spread on either side: the t statistic is infinite (or 0/0), as scipy.stats reports it.
        t = math.copysign(math.inf, estimate) if estimate else math.nan
        return Difference(test, estimate, estimate, estimate, t, df, 0.0 if estimate else math.nan)
    t = estimate / standard_error
    half = t_quantile(1.0 - ALPHA / 2, df) * standard_error
    return Difference(test, estimate, estimate - half, estimate + half, t, df, _two_sided_p(t, df))


def welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Welch's t-test for mean(b) - mean(a): two independent samples, variances not assumed equal."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least two values on each side")
    var_a, var_b = sample_std(a) ** 2, sample_std(b) ** 2
    standard_error = math.sqrt(var_a / len(a) + var_b / len(b))
    return _difference("welch", mean(b) - mean(a), standard_error, welch_df(var_a, len(a), var_b, len(b)))


def paired(a: Sequence[float], b: Sequence[float]) -> Difference:
    """The paired t-test for mean(b - a): `a[i]` and `b[i]` ran with the same seed."""
    if len(a) != len(b):
        raise ValueError("a paired test needs one value per seed on each side")
    if len(a) < 2:
        raise ValueError("a paired test needs at least two seeds")
    differences = [y - x for x, y in zip(a, b)]
    return _difference("paired", mean(differences), sample_std(differences) / math.sqrt(len(differences)), len(differences) - 1)


def power(effect: float, n: int, paired_design: bool) -> float:
    """Power of the two-sided 5 % t-test to detect `effect` (difference / standard deviation) with n seeds per side.

    Two independent samples of n (the spread is the standard deviation of one run), or n pairs
    (the spread is that of a per-seed difference). The t statistic then follows a noncentral t.
    """
    df = n - 1 if paired_design else 2 * n - 2
    noncentrality = abs(effect) * math.sqrt(n if paired_design else n / 2)
    critical = t_quantile(1.0 - ALPHA / 2, df)
    return float(1.0 - special.nctdtr(df, noncentrality, critical) + special.nctdtr(df, noncentrality, -critical))


def seeds_needed(difference: float, spread: float, paired_design: bool) -> int | None:
    """The fewest seeds per side at which the t-test finds `difference` with 80 % power at the 5 % level.

    `spread` is the standard deviation of one run's metric (pooled over both sides) for two
    independent samples, or of the per-seed difference for a paired design. None when no number
    of seeds would do: no difference, no spread to scale it by, or more than MAX_SEEDS.
    """
    if difference == 0.0 or spread == 0.0 or not math.isfinite(difference / spread):
        return None
    effect = difference / spread
    low = 2
    if power(effect, low, paired_design) >= POWER:
        return low
    high = low
    while power(effect, high, paired_design) < POWER:  # power grows with n: double, then bisect
        low, high = high, high * 2
        if high > MAX_SEEDS:
            return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if power(effect, middle, paired_design) >= POWER else (middle, high)
    return high


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float:
    """sqrt of the mean of both sample variances: the spread of one run, for equal seeds per side."""
    return math.sqrt((sample_std(a) ** 2 + sample_std(b) ** 2) / 2)
