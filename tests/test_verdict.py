"""gptlab.verdict: paired comparisons checked against scipy.stats on the same numbers."""

import math
import statistics
import warnings

import pytest
from scipy import stats

from gptlab.verdict import NO_PAIRS, ONE_SEED, detectable_effect, line, paired

NOT = "no detectable difference"
BASELINE = [3.20, 3.31, 3.12, 3.25, 3.18]  # val loss of five seeds
TREATMENT = [3.19, 3.28, 3.115, 3.22, 3.17]  # the same seeds, each a little lower


def test_the_paired_t_test_matches_scipy():
    c = paired(BASELINE, TREATMENT, higher_is_better=False)
    diffs = [t - b for b, t in zip(BASELINE, TREATMENT)]
    mean, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(5)
    assert c.n == 5 and c.mean_diff == pytest.approx(mean)
    assert c.p == pytest.approx(stats.ttest_rel(TREATMENT, BASELINE).pvalue)
    assert (c.ci_low, c.ci_high) == pytest.approx(stats.t.interval(0.95, 4, loc=mean, scale=se))
    assert c.noise_floor == pytest.approx(statistics.stdev(BASELINE))
    assert c.p < 0.05 and c.verdict == "better"  # lower loss on every seed


def test_the_minimum_detectable_effect_is_the_t_quantile_sum_times_the_standard_error():
    diffs = [t - b for b, t in zip(BASELINE, TREATMENT)]
    direct = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * statistics.stdev(diffs) / math.sqrt(5)
    assert paired(BASELINE, TREATMENT, False).detectable == pytest.approx(direct)
    assert detectable_effect(0.02, 10, alpha=0.01) == pytest.approx(
        (stats.t.ppf(0.995, 9) + stats.t.ppf(0.8, 9)) * 0.02 / math.sqrt(10)
    )


@pytest.mark.parametrize(
    "baseline, treatment",
    [
        (BASELINE, TREATMENT),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.5, 2.5, 3.0, 4.25, 5.75, 5.5]),  # tied |differences| and a zero one
        ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 0.5]),  # two zero differences
    ],
)
def test_the_wilcoxon_test_matches_scipy_with_ties_and_zero_differences(baseline, treatment):
    c = paired(baseline, treatment, higher_is_better=False, test="wilcoxon")
    assert c.p == pytest.approx(stats.wilcoxon(treatment, baseline).pvalue)
    assert c.mean_diff == pytest.approx(statistics.fmean(t - b for b, t in zip(baseline, treatment)))
    assert c.n == len(baseline)  # pairs, zeros included (scipy drops the zero differences from its ranks)


def test_the_wilcoxon_test_cannot_reach_5_percent_with_five_seeds():
    c = paired(BASELINE, TREATMENT, higher_is_better=False, test="wilcoxon")
    assert c.p == pytest.approx(1 / 16) and c.verdict == "no detectable difference"  # 2 / 2^5: all 5 lower


def test_two_seeds_are_a_test_with_one_degree_of_freedom():
    c = paired([3.0, 3.2], [2.9, 3.0], higher_is_better=False)
    assert c.p == pytest.approx(stats.ttest_rel([2.9, 3.0], [3.0, 3.2]).pvalue)
    se = statistics.stdev([-0.1, -0.2]) / math.sqrt(2)
    assert (c.ci_low, c.ci_high) == pytest.approx(stats.t.interval(0.95, 1, loc=-0.15, scale=se))
    assert c.detectable == pytest.approx((stats.t.ppf(0.975, 1) + stats.t.ppf(0.8, 1)) * se)
    assert c.verdict == "no detectable difference"  # p = 0.205: one dof is a wide interval


def test_one_seed_or_none_is_no_test():
    one = paired([3.0], [2.9], higher_is_better=False)
    assert one.n == 1 and one.mean_diff == pytest.approx(-0.1) and one.verdict == ONE_SEED
    assert (one.ci_low, one.ci_high, one.p, one.noise_floor, one.detectable) == (None,) * 5 and not one.tested
    none = paired([], [], higher_is_better=False)
    assert none.n == 0 and none.mean_diff is None and none.p is None and none.verdict == NO_PAIRS


@pytest.mark.parametrize("test", ["t", "wilcoxon"])
def test_all_zero_differences_are_no_difference_without_a_warning(test):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = paired([3.0, 3.1, 3.2], [3.0, 3.1, 3.2], higher_is_better=False, test=test)
    assert (c.mean_diff, c.ci_low, c.ci_high, c.p, c.detectable) == (0.0, 0.0, 0.0, 1.0, 0.0)
    assert c.verdict == "no detectable difference"


def test_a_constant_difference_is_certain_for_the_t_test_and_ranked_by_scipy_for_wilcoxon():
    baseline, treatment = [3.0, 3.5, 4.0, 4.5, 5.0, 5.5], [3.25, 3.75, 4.25, 4.75, 5.25, 5.75]  # +0.25 each, exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = paired(baseline, treatment, higher_is_better=False)
        w = paired(baseline, treatment, higher_is_better=False, test="wilcoxon")
    assert (t.mean_diff, t.ci_low, t.ci_high, t.p, t.detectable) == (0.25, 0.25, 0.25, 0.0, 0.0)
    assert t.verdict == "worse"  # scipy's t = inf, p = 0 in the limit
    assert w.p == pytest.approx(stats.wilcoxon(treatment, baseline).pvalue) and w.p == pytest.approx(2 / 2**6)
    assert w.verdict == "worse"


@pytest.mark.parametrize("test", ["t", "wilcoxon"])
def test_differences_equal_up_to_rounding_are_equal(test):
    baseline, treatment = [3.0, 3.2, 3.1], [3.7, 3.9, 3.8]  # +0.7 each in decimal; 0.7 ± 3e-16 in binary
    assert len({t - b for b, t in zip(baseline, treatment)}) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy would warn of catastrophic cancellation
        c = paired(baseline, treatment, higher_is_better=False, test=test)
        same = paired(baseline, [b + 1e-16 * i for i, b in enumerate(baseline)], higher_is_better=False, test=test)
    assert c.ci_low == c.ci_high == c.mean_diff == pytest.approx(0.7) and c.detectable == 0.0
    assert c.p == (0.0 if test == "t" else pytest.approx(0.25)) and c.verdict == ("worse" if test == "t" else NOT)
    assert same.p == 1.0 and same.verdict == NOT  # zero up to rounding: no difference


def test_the_verdict_reads_the_sign_with_higher_is_better():
    accuracy_before, accuracy_after = [0.30, 0.31, 0.29, 0.30], [0.32, 0.33, 0.30, 0.325]
    assert paired(accuracy_before, accuracy_after, higher_is_better=True).verdict == "better"
    assert paired(accuracy_before, accuracy_after, higher_is_better=False).verdict == "worse"
    assert paired(accuracy_after, accuracy_before, higher_is_better=True).verdict == "worse"
    noisy = paired([3.0, 3.2, 3.1], [3.1, 3.0, 3.15], higher_is_better=False)
    assert noisy.p > 0.05 and noisy.verdict == "no detectable difference"


def test_a_wilcoxon_verdict_follows_the_signed_ranks_not_the_mean():
    baseline = [3.0] * 12
    treatment = [3.0 - 0.1 - 0.01 * i for i in range(11)] + [8.0]  # 11 seeds a little lower, one far higher
    c = paired(baseline, treatment, higher_is_better=False, test="wilcoxon")
    assert c.mean_diff > 0 and c.p == pytest.approx(stats.wilcoxon(treatment, baseline).pvalue) and c.p < 0.05
    assert c.verdict == "better"  # W- = 66 > W+ = 12: the test saw the treatment lower


def test_the_confidence_level_follows_alpha():
    c = paired(BASELINE, TREATMENT, higher_is_better=False, alpha=0.01)
    mean = c.mean_diff
    se = statistics.stdev([t - b for b, t in zip(BASELINE, TREATMENT)]) / math.sqrt(5)
    assert (c.ci_low, c.ci_high) == pytest.approx(stats.t.interval(0.99, 4, loc=mean, scale=se))
    assert "(99% CI)" in line(c, "x=1", "0", "val_loss")


def test_a_line_says_delta_interval_p_n_and_verdict():
    c = paired([3.0, 3.1, 3.2, 3.3, 3.4], [2.99, 3.08, 3.19, 3.285, 3.39], higher_is_better=False)
    # differences -0.01, -0.02, -0.01, -0.015, -0.01: mean -0.013, sd 0.00447, se 0.002, t_{0.975, 4} = 2.776
    assert line(c, "scheduler=wsd", "cosine", "val_loss") == (
        "scheduler=wsd vs cosine: Δval_loss = -0.0130 [-0.0186, -0.0074] (95% CI), p = 0.003, n = 5 — better"
    )
    wilcoxon = paired([1000.0, 1100.0, 1200.0], [1150.0, 1300.0, 1330.0], higher_is_better=True, test="wilcoxon")
    assert line(wilcoxon, "compile=true", "false", "tokens_per_s") == (
        "compile=true vs false: Δtokens_per_s = +160 [+70, +250] (95% CI), p = 0.250 (Wilcoxon), n = 3 "
        "— no detectable difference"
    )
    tiny = paired([3.0, 3.5, 4.0], [2.0, 2.5, 3.0], higher_is_better=False)
    assert "p < 0.001" in line(tiny, "a=1", "0", "val_loss")


def test_a_line_without_a_test_says_why():
    assert line(paired([3.0], [2.9], False), "scheduler=wsd", "cosine", "val_loss") == (
        "scheduler=wsd vs cosine: Δval_loss = -0.10, n = 1 — no test possible with one seed"
    )
    assert line(paired([], [], False), "scheduler=wsd", "cosine", "val_loss") == (
        "scheduler=wsd vs cosine: n = 0 — no test possible: no paired seeds"
    )


def test_unpaired_lengths_and_unknown_tests_are_errors():
    with pytest.raises(ValueError, match="differ in length"):
        paired([1.0, 2.0], [1.0], higher_is_better=False)
    with pytest.raises(ValueError, match="unknown test 'z'"):
        paired([1.0, 2.0], [1.0, 2.0], higher_is_better=False, test="z")
