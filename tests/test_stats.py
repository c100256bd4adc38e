"""tapework/stats.py against scipy.stats and hand-computed values on fixed inputs."""

import math

import pytest
import scipy.stats

from tapework import stats

# Test accuracies of 3 seeds per side, Fashion-MNIST-like spreads (fixed inputs, not measurements).
A = [0.8644, 0.8769, 0.8751]
B = [0.8712, 0.8801, 0.8843]
UNEQUAL = ([0.91, 0.93, 0.92, 0.95, 0.90], [0.97, 0.88])  # 5 against 2 values, different spreads


# Student's t quantiles in closed form: df = 1 is the Cauchy distribution, t = tan(pi (p - 1/2));
# df = 2 has t = (2p - 1) sqrt(2 / (4 p (1 - p))). Student's table gives 12.706 and 4.303.
T_975_DF1 = math.tan(math.pi * 0.475)
T_975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))


def test_summary_by_hand():
    summary = stats.summarize([1.0, 2.0, 3.0])
    assert (summary.n, summary.mean, summary.std) == (3, 2.0, 1.0)
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # t * s / sqrt(n)
    assert summary.ci95_low == pytest.approx(2.0 - half, rel=1e-12) and summary.ci95_high == pytest.approx(2.0 + half, rel=1e-12)
    two = stats.summarize([0.5, 0.7])  # mean 0.6, s = 0.1 * sqrt(2), half width = t(df 1) * 0.1
    assert two.std == pytest.approx(0.1 * math.sqrt(2), rel=1e-12)
    assert (two.ci95_low, two.ci95_high) == (pytest.approx(0.6 - 0.1 * T_975_DF1, rel=1e-12), pytest.approx(0.6 + 0.1 * T_975_DF1, rel=1e-12))


def test_t_quantiles_by_closed_form_and_table():
    assert stats.t_quantile(0.975, 1) == pytest.approx(T_975_DF1, rel=1e-12)
    assert stats.t_quantile(0.975, 2) == pytest.approx(T_975_DF2, rel=1e-12)
    for df, table in ((4, 2.776), (10, 2.228), (30, 2.042)):
        assert round(stats.t_quantile(0.975, df), 3) == table


@pytest.mark.parametrize("values", [A, B, UNEQUAL[0], UNEQUAL[1], [0.5, 0.5, 0.6, 0.55]])
def test_summary_matches_scipy(values):
    summary = stats.summarize(values)
    assert summary.mean == pytest.approx(scipy.stats.tmean(values), rel=1e-14)
    assert summary.std == pytest.approx(scipy.stats.tstd(values), rel=1e-12)
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=summary.mean, scale=scipy.stats.sem(values))
    assert (summary.ci95_low, summary.ci95_high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))


def test_single_value_has_no_spread_or_interval():
    summary = stats.summarize([0.87])
    assert (summary.n, summary.mean, summary.std, summary.ci95_low, summary.ci95_high) == (1, 0.87, None, None, None)
    assert summary.scalars() == {"n": 1, "mean": 0.87}
    assert set(stats.summarize(A).scalars()) == {"n", "mean", "std", "ci95_low", "ci95_high"}


@pytest.mark.parametrize(("a", "b"), [(A, B), (B, A), UNEQUAL, (UNEQUAL[1], UNEQUAL[0])])
def test_welch_matches_scipy(a, b):
    ours = stats.welch(a, b)
    theirs = scipy.stats.ttest_ind(b, a, equal_var=False)
    interval = theirs.confidence_interval(0.95)
    assert ours.test == "welch"
    assert ours.estimate == pytest.approx(sum(b) / len(b) - sum(a) / len(a), rel=1e-12)
    assert ours.t == pytest.approx(theirs.statistic, rel=1e-10)
    assert ours.df == pytest.approx(theirs.df, rel=1e-10)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)
    assert (ours.ci95_low, ours.ci95_high) == (pytest.approx(interval.low, rel=1e-9), pytest.approx(interval.high, rel=1e-9))
    assert ours.significant == (theirs.pvalue < 0.05)


def test_welch_satterthwaite_df_by_hand():
    # var 0.04 and 0.09 over 5 and 3 values: (0.008 + 0.03)^2 / (0.008^2/4 + 0.03^2/2) = 0.001444 / 0.000466
    assert stats.welch_df(0.04, 5, 0.09, 3) == pytest.approx(0.001444 / 0.000466, rel=1e-12)
    # Equal variances and sizes: df = 2n - 2, as for the pooled test.
    assert stats.welch_df(0.5, 6, 0.5, 6) == pytest.approx(10.0, rel=1e-12)


@pytest.mark.parametrize(("a", "b"), [(A, B), (B, A), ([1.0, 2.0, 4.0, 7.0], [1.5, 2.1, 4.4, 7.0])])
def test_paired_matches_scipy(a, b):
    ours = stats.paired(a, b)
    theirs = scipy.stats.ttest_rel(b, a)
    interval = theirs.confidence_interval(0.95)
    assert (ours.test, ours.df) == ("paired", len(a) - 1)
    assert ours.t == pytest.approx(theirs.statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)
    assert (ours.ci95_low, ours.ci95_high) == (pytest.approx(interval.low, rel=1e-9), pytest.approx(interval.high, rel=1e-9))


def test_pairing_removes_the_shared_seed_effect():
    # Each seed shifts both sides alike: Welch sees the large seed spread, the paired test only the shift.
    a = [0.80, 0.85, 0.90]
    b = [0.81, 0.861, 0.909]
    assert not stats.welch(a, b).significant
    assert stats.paired(a, b).significant


def test_no_spread_follows_scipy():
    constant = stats.paired([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])  # every difference 0.5
    assert constant.t == math.inf and constant.p_value == 0.0 and constant.significant
    assert (constant.ci95_low, constant.ci95_high) == (0.5, 0.5)
    with pytest.warns(RuntimeWarning):  # scipy warns of the zero variance, and still reports p = 0
        assert scipy.stats.ttest_rel([1.5, 2.5, 3.5], [1.0, 2.0, 3.0]).pvalue == 0.0
    same = stats.welch([0.9, 0.9], [0.9, 0.9])
    assert math.isnan(same.p_value) and not same.significant


def test_tests_refuse_too_few_values():
    with pytest.raises(ValueError):
        stats.welch([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0], [1.0])


# Seeds per side for 80 % power at the two-sided 5 % level, by standardised effect: Cohen (1988)
# Table 2.4.1 / G*Power for two independent samples, and for the paired (one-sample) t-test.
TWO_SAMPLE = {0.2: 394, 0.5: 64, 0.8: 26, 1.0: 17, 2.0: 6}
PAIRED = {0.5: 34, 0.8: 15, 1.0: 10}


@pytest.mark.parametrize(("effect", "n"), sorted(TWO_SAMPLE.items()))
def test_seeds_needed_two_samples_matches_the_power_tables(effect, n):
    assert stats.seeds_needed(effect * 0.004, 0.004, paired_design=False) == n
    assert stats.seeds_needed(-effect, 1.0, paired_design=False) == n  # the sign does not matter


@pytest.mark.parametrize(("effect", "n"), sorted(PAIRED.items()))
def test_seeds_needed_paired_matches_the_power_tables(effect, n):
    assert stats.seeds_needed(effect, 1.0, paired_design=True) == n


def test_seeds_needed_is_the_smallest_n_with_enough_power():
    """The definition, checked with scipy's noncentral t: power at n reaches 80 %, at n - 1 it does not."""
    for effect in (0.3, 0.7, 1.3):
        n = stats.seeds_needed(effect, 1.0, paired_design=False)
        for size, enough in ((n, True), (n - 1, False)):
            df, noncentrality = 2 * size - 2, effect * math.sqrt(size / 2)
            critical = scipy.stats.t.ppf(0.975, df)
            power = scipy.stats.nct.sf(critical, df, noncentrality) + scipy.stats.nct.cdf(-critical, df, noncentrality)
            assert bool(power >= 0.8) == enough, (effect, size, power)
    # Close to the normal approximation n = 2 (z_.975 + z_.8)^2 / d^2, which it exceeds slightly.
    z = scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)
    assert 0 <= stats.seeds_needed(0.5, 1.0, paired_design=False) - 2 * z**2 / 0.25 <= 2


def test_seeds_needed_without_a_difference_or_a_spread():
    assert stats.seeds_needed(0.0, 0.01, paired_design=False) is None
    assert stats.seeds_needed(0.01, 0.0, paired_design=True) is None
    assert stats.seeds_needed(1e-9, 1.0, paired_design=False) is None  # beyond MAX_SEEDS
    assert stats.seeds_needed(50.0, 1.0, paired_design=False) == 2  # the fewest that give a spread
