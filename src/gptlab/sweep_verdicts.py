"""Verdicts of a sweep: each config against its baseline, paired by seed (the statistics: gptlab.verdict).

Each swept key has a baseline value (chosen, else its first value in the sweep's order: the order Hydra ran the
jobs in). Every config whose value of a key is not its baseline is compared with the config equal to it but for
that key = baseline (when the sweep has it), seed by seed: jobs that share a seed are paired (same data order, same
initialization), on the seeds completed in both; a seed failed, still running or missing on either side drops out
of that pair, and its verdict says which and why. Jobs whose seed is unknown cannot be paired. The metric is a
column of the sweep (gptlab.sweep_summary: METRICS, `final_val_loss/<source>`; val_loss and val_bpb for short) or
any numeric key of summary.json, final or at a token count (Job values: gptlab.sweep_summary.seed_value).
"""

from dataclasses import dataclass

from gptlab.errors import UserInputError
from gptlab.sweep_summary import (
    Config,
    Job,
    Sweep,
    as_number,
    group_configs,
    higher_is_better,
    logged_key,
    metric_column,
    seed_value,
    table,
)
from gptlab.verdict import TESTS, Comparison, format_p, paired
from gptlab.verdict import line as verdict_line

VERDICT_COLUMNS = [
    "comparison", "key", "value", "baseline", "context", "metric", "at_tokens", "test", "n", "seeds",
    "delta", "ci_low", "ci_high", "p", "noise_floor", "detectable_delta", "verdict", "left_out",
]  # fmt: skip


@dataclass
class Verdict:
    """One comparison: two configs equal but for `key`, `value` in the treatment and `baseline` in the other."""

    key: str
    value: str
    baseline: str
    context: dict[str, str]  # the other swept keys, the same in both configs
    seeds: list[int]  # the seeds paired, in order
    left_out: list[str]  # each seed not paired and why, e.g. "seed 3 (diverged in scheduler=wsd)"
    comparison: Comparison

    @property
    def label(self) -> str:
        """e.g. "scheduler=wsd vs cosine at optimizer.lr=1e-3"."""
        return f"{self.key}={self.value} vs {self.baseline_label}"

    @property
    def baseline_label(self) -> str:
        context = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return self.baseline + (f" at {context}" if context else "")


@dataclass
class Verdicts:
    """A sweep's comparisons on one metric, with one test."""

    metric: str  # a column of Job.value: final_val_loss, final_val_loss/<source>, a summary.json key, ...
    test: str  # "t" or "wilcoxon"
    at_tokens: int | None  # the metric at this many training tokens; None: at the end
    baselines: dict[str, str]  # swept key -> its baseline value
    items: list[Verdict]

    @property
    def name(self) -> str:
        """The metric as the lines say it: val_loss, val_loss/web, val_loss at 5,120 tokens."""
        short = self.metric.removeprefix("final_")
        return short if self.at_tokens is None else f"{short} at {self.at_tokens:,} tokens"

    @property
    def stem(self) -> str:
        """The metric in file names: val_loss, val_loss/web (made file-safe later), val_loss_at_5120_tokens."""
        short = self.metric.removeprefix("final_")
        return short if self.at_tokens is None else f"{short}_at_{self.at_tokens}_tokens"

    def lines(self) -> list[str]:
        """One sentence per comparison (gptlab.verdict.line), then the seeds left out, if any."""
        return [verdict_line(v.comparison, f"{v.key}={v.value}", v.baseline_label, self.name) + _left_out(v)
                for v in self.items]  # fmt: skip


def compare(
    sweep: Sweep,
    metric: str = "final_val_loss",
    baselines: dict[str, str] | None = None,
    test: str = "t",
    at_tokens: int | None = None,
) -> Verdicts:
    """Each config against the config equal to it but for one swept key at its baseline, seed by seed (see the
    module docstring). baselines: swept key -> value; each key not given has its first value in the sweep."""
    if test not in TESTS:
        raise UserInputError(f"unknown test {test!r}: one of {', '.join(TESTS)}")
    column = checked_metric(sweep, metric, at_tokens)
    chosen = baseline_values(sweep, baselines or {})
    configs = group_configs(sweep.jobs, sweep.swept)  # the sweep's order, however the tables are ranked
    items = [
        compare_configs(treatment, baseline, key, column, test, at_tokens)
        for key, value in chosen.items()
        for treatment, baseline in config_pairs(configs, key, value)
    ]
    return Verdicts(column, test, at_tokens, chosen, items)


def checked_metric(sweep: Sweep, metric: str, at_tokens: int | None) -> str:
    """The column `metric` names, or a one-line error that says what is allowed."""
    column = metric_column(metric)
    if column not in sweep.metrics and all(job.value(column) is None for job in sweep.jobs):
        raise UserInputError(
            f"cannot compare by {metric!r}: one of {', '.join(sweep.metrics)} (val_loss, val_bpb for short), "
            "or a key of summary.json with a number"
        )
    if at_tokens is not None and logged_key(column) is None:
        raise UserInputError(
            f"--at-tokens reads metrics.jsonl, which has no {metric!r}: use final_val_loss, final_val_bpb, "
            "hellaswag_acc_norm, final_val_loss/<source> or final_val_bpb/<source>"
        )
    return column


def baseline_values(sweep: Sweep, chosen: dict[str, str]) -> dict[str, str]:
    """Each swept key's baseline: the value chosen for it (as written in the overrides, or the same number), else
    its first value in the sweep's order (the order Hydra ran the jobs in)."""
    values = {key: list(dict.fromkeys(j.overrides.get(key, "default") for j in sweep.jobs)) for key in sweep.swept}
    for key, value in chosen.items():
        if key not in values:
            swept = ", ".join(sweep.swept) or "none (only seeds differ)"
            raise UserInputError(f"--baseline {key}={value}: {key!r} is not a swept key; swept keys: {swept}")
        if _matching(value, values[key]) is None:
            raise UserInputError(f"--baseline {key}={value}: {key} takes the values {', '.join(values[key])}")
    return {key: _matching(chosen[key], options) if key in chosen else options[0] for key, options in values.items()}


def _matching(value: str, options: list[str]) -> str | None:
    """The option that is `value`, as text or as a number (1e-3 matches 0.001)."""
    if value in options:
        return value
    number = as_number(value)
    return next((o for o in options if number is not None and as_number(o) == number), None)


def config_pairs(configs: list[Config], key: str, baseline: str) -> list[tuple[Config, Config]]:
    """(treatment, baseline config) for each config whose `key` is not `baseline` and whose twin with
    key = baseline (equal in every other swept key) is in the sweep."""
    by_values = {tuple(c.values.items()): c for c in configs}
    pairs = []
    for config in configs:
        twin = by_values.get(tuple((config.values | {key: baseline}).items()))
        if config.values[key] != baseline and twin is not None:
            pairs.append((config, twin))
    return pairs


def compare_configs(
    treatment: Config, baseline: Config, key: str, metric: str, test: str, at_tokens: int | None
) -> Verdict:
    """The paired comparison of two configs on the seeds completed in both (and with the metric)."""
    treatment_jobs, baseline_jobs = _jobs_by_seed(treatment), _jobs_by_seed(baseline)
    seeds, treated, based, left_out = [], [], [], []
    for seed in sorted(treatment_jobs.keys() | baseline_jobs.keys()):
        t, why_t = seed_value(treatment_jobs.get(seed), metric, at_tokens)
        b, why_b = seed_value(baseline_jobs.get(seed), metric, at_tokens)
        if t is None or b is None:
            left_out.append(_why_left_out(seed, key, [(treatment, t, why_t), (baseline, b, why_b)]))
            continue
        seeds.append(seed)
        treated.append(t)
        based.append(b)
    comparison = paired(based, treated, higher_is_better(metric), test)
    context = {k: v for k, v in treatment.values.items() if k != key}
    return Verdict(key, treatment.values[key], baseline.values[key], context, seeds, left_out, comparison)


def _why_left_out(seed: int, key: str, sides: list[tuple[Config, float | None, str]]) -> str:
    """e.g. "seed 3 (diverged in scheduler=wsd; no job in scheduler=cosine)": each side without a value, and why."""
    whys = [f"{why} in {key}={config.values[key]}" for config, value, why in sides if value is None]
    return f"seed {seed} ({'; '.join(whys)})"


def _jobs_by_seed(config: Config) -> dict[int, Job]:
    """seed -> its job: the first completed one (a seed run twice), else the first; jobs without a seed left out."""
    by_seed: dict[int, Job] = {}
    for job in sorted(config.jobs, key=lambda j: not j.completed):
        if job.seed is not None:
            by_seed.setdefault(job.seed, job)
    return by_seed


def _left_out(verdict: Verdict) -> str:
    return f"; left out: {', '.join(verdict.left_out)}" if verdict.left_out else ""


def verdict_section(verdicts: Verdicts) -> list[str]:
    """The Verdicts section of summary.md: how to read it, one line per comparison, and the table."""
    at = "" if verdicts.at_tokens is None else f" at {verdicts.at_tokens:,} tokens"
    better = "higher" if higher_is_better(verdicts.metric) else "lower"
    baselines = ", ".join(f"{k}={v}" for k, v in verdicts.baselines.items())
    lines = [
        f"## Verdicts ({verdicts.metric}{at}, {TESTS[verdicts.test]} over seeds)",
        "",
        f"Each config against the config equal to it but for one swept key, at its baseline ({baselines}), on the "
        f"seeds completed in both: Δ = config − baseline ({better} is better), a 95% CI, p < 0.05 for a verdict. "
        "Noise floor: the baseline's std across seeds. Detectable Δ: the smallest Δ this many seeds detect "
        "(power 0.8).",
        "",
    ]
    if not verdicts.items:
        return lines + ["No two configs differ in one swept key alone: nothing to compare."]
    lines += [f"- {text}" for text in verdicts.lines()]
    return lines + ["", *_verdict_table(verdicts)]


def _verdict_table(verdicts: Verdicts) -> list[str]:
    header = ["comparison", "Δ", "CI low", "CI high", "p", "n", "noise floor", "detectable Δ", "verdict"]
    rows = []
    for v in verdicts.items:
        c = v.comparison
        numbers = [_fmt_g(x) for x in (c.mean_diff, c.ci_low, c.ci_high)]
        p = "—" if c.p is None else format_p(c.p).removeprefix("= ")
        rows.append([v.label, *numbers, p, str(c.n), _fmt_g(c.noise_floor), _fmt_g(c.detectable), c.verdict])
    return table(header, rows)


def _fmt_g(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def verdict_rows(verdicts: Verdicts) -> list[dict]:
    """One row per comparison (numbers, not text) for verdicts.csv."""
    return [
        {"comparison": v.label, "key": v.key, "value": v.value, "baseline": v.baseline,
         "context": ", ".join(f"{k}={x}" for k, x in v.context.items()), "metric": verdicts.metric,
         "at_tokens": verdicts.at_tokens, "test": verdicts.test, "n": v.comparison.n,
         "seeds": " ".join(map(str, v.seeds)), "delta": v.comparison.mean_diff, "ci_low": v.comparison.ci_low,
         "ci_high": v.comparison.ci_high, "p": v.comparison.p, "noise_floor": v.comparison.noise_floor,
         "detectable_delta": v.comparison.detectable, "verdict": v.comparison.verdict,
         "left_out": ", ".join(v.left_out)}
        for v in verdicts.items
    ]  # fmt: skip
