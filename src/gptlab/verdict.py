"""Paired verdicts: is a treatment better than its baseline, beyond seed noise? Pure statistics, no I/O.

Pairing. Runs of the baseline and of the treatment that share a seed share their data order and their
initialization, so most seed noise cancels in their difference. `paired` takes the two lists in seed order
(baseline[i] and treatment[i] ran with the same seed) and works on the differences d_i = treatment_i - baseline_i.

The tests (two-sided, at level alpha):
- "t": the paired t-test, scipy.stats.ttest_rel: t = mean(d) / (sd(d) / sqrt(n)) with n - 1 degrees of freedom.
- "wilcoxon": the Wilcoxon signed-rank test, scipy.stats.wilcoxon with its defaults, for differences that are
  not normal (one wild seed). As scipy does: zero differences are dropped (zero_method="wilcox"); without ties
  or zeros the p-value is exact for n <= 50; with ties or zeros it is an exhaustive permutation test for
  n <= 13 and the tie-corrected normal approximation beyond. Its smallest possible p is 2 / 2^n: 0.0625 at
  n = 5, so under 6 seeds it can never say "better" at alpha = 0.05.

What a Comparison reports, besides the p-value:
- the mean difference and its confidence interval at level 1 - alpha (95% by default): the t interval
  mean(d) ± t_{1-alpha/2, n-1} · sd(d) / sqrt(n), scipy.stats.t.interval's;
- the noise floor: the sample standard deviation of the baseline across seeds (how much a metric moves with
  the seed alone);
- the minimum detectable effect (MDE): the smallest true mean difference the two-sided paired t-test at this
  n detects with probability (power) 0.8, in the usual approximation by the central t distribution:
      MDE = (t_{1-alpha/2, n-1} + t_{power, n-1}) · sd(d) / sqrt(n).
  A "no detectable difference" with an MDE larger than the effect you care about means: run more seeds.

The verdict: "better" or "worse" when p < alpha (the direction: the sign of the mean difference for the t-test,
of the signed-rank sum for the Wilcoxon test, read with higher_is_better), else
"no detectable difference"; with one pair "no test possible with one seed", with none "no test possible: no
paired seeds" (no CI and no p-value in both).

Zero variance of the differences (every seed moved by the same amount), where scipy would divide by zero or
warn of catastrophic cancellation: the rule is scipy's limit, computed without calling it. Differences count as
equal when they are equal up to floating-point rounding (their spread within ROUNDING times the largest value
compared), and as zero when they are all zero up to rounding. All differences zero: p = 1 and "no detectable
difference" for both tests (scipy's t-test gives NaN, its Wilcoxon 1 for n <= 13). A constant nonzero difference
d: the CI is [d, d], the MDE 0, and p = 0 for the t-test (scipy's t = ±inf); the Wilcoxon test ranks it as any
all-same-sign sample, through scipy (p = 2 / 2^n).
"""

import math
import statistics
import sys
from dataclasses import dataclass

from scipy import stats

TESTS = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}
POWER = 0.8  # of the minimum detectable effect
ROUNDING = 32 * sys.float_info.epsilon  # relative rounding error a difference of two float64 values can carry
ONE_SEED = "no test possible with one seed"
NO_PAIRS = "no test possible: no paired seeds"


@dataclass(frozen=True)
class Comparison:
    n: int  # pairs (seeds run by both)
    mean_diff: float | None  # mean of treatment - baseline; None without pairs
    ci_low: float | None  # the (1 - alpha) t interval of mean_diff; None under 2 pairs
    ci_high: float | None
    p: float | None  # two-sided p-value of the test; None under 2 pairs
    noise_floor: float | None  # sample std of the baseline across seeds; None under 2 pairs
    detectable: float | None  # minimum detectable effect (see the module docstring); None under 2 pairs
    verdict: str  # "better", "worse", "no detectable difference", or why no test is possible
    test: str = "t"
    alpha: float = 0.05
    higher_is_better: bool = False

    @property
    def tested(self) -> bool:
        return self.p is not None


def paired(
    baseline: list[float], treatment: list[float], higher_is_better: bool, test: str = "t", alpha: float = 0.05
) -> Comparison:
    """Compare treatment with baseline, pair by pair (same index = same seed). See the module docstring."""
    if len(baseline) != len(treatment):
        raise ValueError(f"paired samples differ in length: {len(baseline)} baselines, {len(treatment)} treatments")
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}: one of {', '.join(TESTS)}")
    diffs = [t - b for b, t in zip(baseline, treatment)]
    untested = dict(test=test, alpha=alpha, higher_is_better=higher_is_better, ci_low=None, ci_high=None, p=None)
    if not diffs:
        return Comparison(0, None, noise_floor=None, detectable=None, verdict=NO_PAIRS, **untested)
    if len(diffs) == 1:
        return Comparison(1, diffs[0], noise_floor=None, detectable=None, verdict=ONE_SEED, **untested)
    mean, sd = statistics.fmean(diffs), diff_sd(baseline, treatment)
    half = t_half_width(sd, len(diffs), 1 - alpha)
    p = p_value(baseline, treatment, test)
    return Comparison(
        n=len(diffs),
        mean_diff=mean,
        ci_low=mean - half,
        ci_high=mean + half,
        p=p,
        noise_floor=statistics.stdev(baseline),
        detectable=detectable_effect(sd, len(diffs), alpha),
        verdict=verdict_word(direction(diffs, test), p, alpha, higher_is_better),
        test=test,
        alpha=alpha,
        higher_is_better=higher_is_better,
    )


def ci_half_width(xs: list[float], confidence: float = 0.95) -> float:
    """Half the width of the t confidence interval of the mean of xs (two or more)."""
    return t_half_width(statistics.stdev(xs), len(xs), confidence)


def t_half_width(sd: float, n: int, confidence: float = 0.95) -> float:
    """t_{(1+c)/2, n-1} · sd / sqrt(n): half the t interval of a mean, scipy.stats.t.interval's; 0 for sd = 0
    (where t.interval, with scale 0, gives NaN)."""
    if sd == 0:
        return 0.0
    return float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)


def diff_sd(baseline: list[float], treatment: list[float]) -> float:
    """The sample std of the differences; 0 when they are equal up to rounding (see the module docstring)."""
    diffs = [t - b for b, t in zip(baseline, treatment)]
    mean = statistics.fmean(diffs)
    if max(abs(d - mean) for d in diffs) <= _rounding(baseline, treatment):
        return 0.0
    return statistics.stdev(diffs)


def p_value(baseline: list[float], treatment: list[float], test: str) -> float:
    """The two-sided p-value of the paired test; the zero-variance rule of the module docstring."""
    if max(abs(t - b) for b, t in zip(baseline, treatment)) <= _rounding(baseline, treatment):
        return 1.0  # all differences zero
    if test == "wilcoxon":
        return float(stats.wilcoxon(treatment, baseline).pvalue)
    if diff_sd(baseline, treatment) == 0:
        return 0.0  # a constant nonzero difference: t = ±inf
    return float(stats.ttest_rel(treatment, baseline).pvalue)


def _rounding(baseline: list[float], treatment: list[float]) -> float:
    """How far differences of these values can move by floating-point rounding alone."""
    return ROUNDING * max(abs(x) for x in [*baseline, *treatment])


def detectable_effect(sd_diff: float, n: int, alpha: float = 0.05, power: float = POWER) -> float:
    """The minimum detectable effect of the two-sided paired t-test with n pairs whose differences have sample
    std sd_diff: (t_{1-alpha/2, n-1} + t_{power, n-1}) · sd_diff / sqrt(n)."""
    t_sum = float(stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1))
    return t_sum * sd_diff / math.sqrt(n)


def direction(diffs: list[float], test: str) -> float:
    """Which way the treatment moved the metric, as the test sees it: the mean difference for the t-test, the
    signed-rank sum W+ - W- (zeros dropped) for the Wilcoxon test. Only its sign matters."""
    if test != "wilcoxon":
        return statistics.fmean(diffs)
    nonzero = [d for d in diffs if d != 0]
    ranks = stats.rankdata([abs(d) for d in nonzero])
    return float(sum(math.copysign(r, d) for r, d in zip(ranks, nonzero)))


def verdict_word(direction: float, p: float, alpha: float, higher_is_better: bool) -> str:
    """The verdict word: when p < alpha, "better" if the direction is up and higher is better (or down and lower
    is better), else "worse"; "no detectable difference" when p >= alpha."""
    if p >= alpha or direction == 0:
        return "no detectable difference"
    return "better" if (direction > 0) == higher_is_better else "worse"


def line(comparison: Comparison, label: str, baseline_label: str, metric: str) -> str:
    """One sentence, e.g. `scheduler=wsd vs cosine: Δval_loss = -0.012 [-0.019, -0.005] (95% CI), p = 0.004,
    n = 5 — better`. Δ and the CI are shown to two significant digits of the CI's half-width."""
    c = comparison
    head = f"{label} vs {baseline_label}: "
    if c.mean_diff is None:
        return head + f"n = 0 — {c.verdict}"
    if not c.tested:
        return head + f"Δ{metric} = {_signed(c.mean_diff, _decimals(c.mean_diff))}, n = {c.n} — {c.verdict}"
    decimals = _decimals(c.ci_high - c.mean_diff or c.mean_diff)
    interval = f"[{_signed(c.ci_low, decimals)}, {_signed(c.ci_high, decimals)}] ({100 * (1 - c.alpha):g}% CI)"
    p = f"p {format_p(c.p)}" + (" (Wilcoxon)" if c.test == "wilcoxon" else "")
    return head + f"Δ{metric} = {_signed(c.mean_diff, decimals)} {interval}, {p}, n = {c.n} — {c.verdict}"


def format_p(p: float) -> str:
    """`= 0.004`, or `< 0.001` below that."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _decimals(scale: float, significant: int = 2) -> int:
    """Decimals that show `significant` significant digits of scale (3 for 0)."""
    if scale == 0 or not math.isfinite(scale):
        return 3
    return max(0, significant - 1 - math.floor(math.log10(abs(scale))))


def _signed(x: float, decimals: int) -> str:
    """With its sign: +0.012, -0.012; 0.000 for what rounds to zero."""
    text = f"{x:+.{decimals}f}"
    return text[1:] if float(text) == 0 else text
