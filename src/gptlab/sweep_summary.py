"""Summarize a sweep folder: one row per job, one per config (mean ± std over seeds), and plots.

A job is any folder under the sweep that holds `.hydra/overrides.yaml` or `summary.json` (Hydra's
<sweep>/<override_dirname>/ layout, or any deeper one). A job's config is its overrides minus `seed`; jobs
that share a config are its seeds. Only completed jobs enter the means: failed, running and unknown jobs
are listed with their status (and error) but left out. A job without summary.json is "running" while its
files still change, "unknown" once they have been still for STALE_S (killed by the OOM killer or a
cluster time limit, say).

The metrics are METRICS, plus, in a sweep of data mixtures (data.mixture), each source's final validation:
`final_val_loss/<source>` ("val loss <source>" in the tables) and `final_val_bpb/<source>` (CSV only, to keep the
tables readable), from summary.json's val_by_source, else the last val/loss/<source> (val/bpb/<source>) of
metrics.jsonl. Sweep.metrics lists a sweep's; a sweep without a mixture has METRICS alone.

Values of a job (`seed_value`): a metric's final value, or its value at a token count, read from metrics.jsonl:
the validation record at exactly that many tokens, else the linear interpolation between the two around it (see
value_at); a job that ended before has no value there. Higher is better for HIGHER_IS_BETTER, every hellaswag_* and
every *acc* metric (acc as a word: hellaswag_acc, val_acc, accuracy; not grad_accum), lower for the others.
Paired verdicts over seeds: gptlab.sweep_verdicts, which builds on this module.
"""

import bisect
import csv
import dataclasses
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gptlab.errors import UserInputError
from gptlab.verdict import ci_half_width

if TYPE_CHECKING:  # gptlab.sweep_verdicts builds on this module; summary.md and write_summary include its verdicts
    from gptlab.sweep_verdicts import Verdicts

STALE_S = 30 * 60  # a job with no summary.json and no file written for this long is "unknown", not "running"
METRICS = {  # summary column -> header
    "final_val_loss": "final val loss",
    "best_val_loss": "best val loss",
    "final_val_bpb": "final val bpb",  # bits per byte: comparable across tokenizers and vocabularies
    "hellaswag_acc_norm": "HellaSwag acc_norm",
    "tokens_per_s": "tokens/s",
}
DIGITS = {"final_val_loss": 4, "best_val_loss": 4, "final_val_bpb": 4, "hellaswag_acc_norm": 4, "tokens_per_s": 0}
HIGHER_IS_BETTER = {"hellaswag_acc_norm", "tokens_per_s", "samples_per_s", "mfu"}  # and see higher_is_better
ACCURACY = re.compile(r"(^|_)acc(uracy)?(_|$)")  # acc as a word: hellaswag_acc, val_acc, accuracy; not grad_accum
SOURCE_METRICS = {"final_val_loss": "val loss", "final_val_bpb": "val bpb"}  # <column>/<source> -> "<header> <source>"
SOURCE_IN_TABLES = {"final_val_loss"}  # per-source bpb is in the CSVs only, to keep the markdown tables readable
SOURCE_KEY = re.compile(r"val/(loss|bpb)/([A-Za-z0-9_.-]+)")  # a mixture source's metric in metrics.jsonl
METRIC_ALIASES = {"val_loss": "final_val_loss", "val_bpb": "final_val_bpb"}  # --metric names for short
LOGGED = {"final_val_loss": "val/loss", "final_val_bpb": "val/bpb", "hellaswag_acc_norm": "hellaswag/acc_norm"}
LOGGED_KEY = re.compile(r"(val|hellaswag)/.+")  # the metrics.jsonl keys a Job keeps by token count


@dataclass
class Job:
    name: str  # the folder, relative to the sweep
    overrides: dict[str, str]  # key -> value as given on the command line, seed excluded
    seed: int | None
    status: str
    error: str | None = None
    step: int | None = None
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    final_val_bpb: float | None = None
    hellaswag_acc_norm: float | None = None
    tokens_per_s: float | None = None
    by_source: dict[str, float] = field(default_factory=dict)  # e.g. "final_val_loss/<source>" -> value
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val loss)
    num: int | None = None  # Hydra's job number: the sweep's own order
    summary: dict = field(default_factory=dict, repr=False)  # summary.json as written
    logged: dict[str, list[tuple[float, float]]] = field(default_factory=dict, repr=False)  # see _logged_by_tokens

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def value(self, metric: str) -> float | None:
        """A metric of METRICS, a per-source one (`final_val_loss/<source>`), or a numeric key of summary.json."""
        if "/" in metric:
            return self.by_source.get(metric)
        if metric in METRICS:
            return getattr(self, metric)
        value = self.summary.get(metric)
        return float(value) if _finite(value) and not isinstance(value, bool) else None


@dataclass
class Config:
    label: str  # the overrides that differ between configs, e.g. "optimizer.lr=3e-4, scheduler=wsd"
    values: dict[str, str]  # swept key -> this config's value
    jobs: list[Job]

    def stats(self, metric: str) -> tuple[float | None, float | None, int]:
        """Mean, sample std (ddof=1; None for one seed) and count over completed seeds that have the metric."""
        xs = [j.value(metric) for j in self.jobs if j.completed and j.value(metric) is not None]
        if not xs:
            return None, None, 0
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)

    @property
    def n_seeds(self) -> int:
        return sum(j.completed for j in self.jobs)

    @property
    def status(self) -> str:
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: kv[0] != "completed"))


@dataclass
class Sweep:
    folder: Path
    jobs: list[Job]
    swept: list[str]  # keys whose value differs between jobs (seed excluded)
    common: dict[str, str]  # overrides every job shares
    configs: list[Config]
    metrics: dict[str, str] = field(default_factory=lambda: dict(METRICS))  # column -> header: METRICS + per source

    @property
    def shown(self) -> list[str]:
        """The metric columns of the markdown tables: METRICS and each source's final val loss."""
        return [m for m in self.metrics if "/" not in m or m.split("/")[0] in SOURCE_IN_TABLES]


# --- reading ------------------------------------------------------------------------------------------------


def load_sweep(folder: Path, now: float | None = None, stale_s: float = STALE_S) -> Sweep:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"no such sweep folder: {folder}")
    dirs = find_jobs(folder)
    if not dirs:
        raise UserInputError(f"no job folders (with .hydra/overrides.yaml or summary.json) under {folder}")
    now = time.time() if now is None else now
    jobs = sorted((read_job(d, folder, now, stale_s) for d in dirs), key=_order)
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    common = {k: v for k, v in jobs[0].overrides.items() if k not in swept}
    return Sweep(folder, jobs, swept, common, group_configs(jobs, swept), sweep_metrics(jobs))


def sweep_metrics(jobs: list[Job]) -> dict[str, str]:
    """METRICS, then per source (in the order the jobs name them) its columns: column -> header."""
    sources = dict.fromkeys(m.split("/", 1)[1] for j in jobs for m in j.by_source)
    per_source = {f"{column}/{s}": f"{header} {s}" for s in sources for column, header in SOURCE_METRICS.items()}
    return METRICS | per_source


def find_jobs(folder: Path) -> list[Path]:
    """Job folders under `folder` (or `folder` itself, a single run); hidden folders are not searched."""
    if _is_job(folder):
        return [folder]
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += find_jobs(child)
    return found


def _is_job(folder: Path) -> bool:
    return (folder / ".hydra" / "overrides.yaml").is_file() or (folder / "summary.json").is_file()


def read_job(folder: Path, sweep: Path, now: float, stale_s: float = STALE_S) -> Job:
    overrides = _read_overrides(folder / ".hydra" / "overrides.yaml")
    seed_override = overrides.pop("seed", None)
    summary = _read_json(folder / "summary.json")
    records = read_metrics(folder / "metrics.jsonl")
    curve = [(int(r["step"]), float(r["val/loss"])) for r in records if _finite(r.get("val/loss"))]
    job = Job(
        name=str(folder.relative_to(sweep)) if folder != sweep else folder.name,
        overrides=overrides,
        seed=_first(summary.get("seed"), _config_seed(folder), _int_or_none(seed_override)),
        status=summary.get("status") or ("running" if _last_write(folder) > now - stale_s else "unknown"),
        error=summary.get("error"),
        step=_first(summary.get("step"), records[-1].get("step") if records else None),
        final_val_loss=_first(summary.get("val_loss"), curve[-1][1] if curve else None),
        best_val_loss=min(_finite_values([v for _, v in curve] + [summary.get("val_loss")]), default=None),
        final_val_bpb=_first(summary.get("val_bpb"), _last(records, "val/bpb")),
        hellaswag_acc_norm=_first(summary.get("hellaswag_acc_norm"), _last(records, "hellaswag/acc_norm")),
        tokens_per_s=_first(summary.get("tokens_per_s"), _last(records, "tokens_per_s")),
        by_source=_by_source(summary, records),
        curve=curve,
        num=_job_num(folder),
        summary=summary,
        logged=_logged_by_tokens(records, summary),
    )
    if job.status == "running" and summary and _last_write(folder) <= now - stale_s:
        job.status = "unknown"  # a summary written at start says "running", but nothing moved for a long time
    return job


def _by_source(summary: dict, records: list[dict]) -> dict[str, float]:
    """A mixture's final validation per source: summary.json's val_by_source, else metrics.jsonl's last
    val/loss/<source> (val/bpb/<source>); {} for a single dataset."""
    found: dict[str, float] = {}
    for record in records:  # later records overwrite earlier ones: the last value of each
        for key, value in record.items():
            match = SOURCE_KEY.fullmatch(key)
            if match and _finite(value):
                found[f"final_val_{match[1]}/{match[2]}"] = float(value)
    for source, values in (summary.get("val_by_source") or {}).items():  # {"<source>": {"loss": .., "bpb": ..}}
        for key, value in (values or {}).items():
            if f"final_val_{key}" in SOURCE_METRICS and isinstance(value, (int, float)):
                found[f"final_val_{key}/{source}"] = float(value)
    return found


def _logged_by_tokens(records: list[dict], summary: dict) -> dict[str, list[tuple[float, float]]]:
    """Each validation metric of metrics.jsonl (val/..., hellaswag/...) as (tokens, value) points in token order.
    Validation records carry "step" alone: they are placed at step x tokens per step (which is constant)."""
    per_step = _tokens_per_step(records, summary)
    by_key: dict[str, dict[float, float]] = {}
    for record in records:
        tokens = _record_tokens(record, per_step)
        for key, value in record.items():
            if tokens is not None and LOGGED_KEY.fullmatch(key) and _finite(value):
                by_key.setdefault(key, {})[tokens] = float(value)  # a step logged twice: the last value
    return {key: sorted(points.items()) for key, points in by_key.items()}


def _record_tokens(record: dict, per_step: float | None) -> float | None:
    """The training tokens a record was logged at: its "tokens", else step x tokens per step."""
    if _finite(record.get("tokens")):
        return float(record["tokens"])
    return float(record["step"] * per_step) if per_step is not None and _finite(record["step"]) else None


def _tokens_per_step(records: list[dict], summary: dict) -> float | None:
    """tokens / step of the first training record that logs both, else of summary.json."""
    for source in [*records, summary]:
        tokens, step = source.get("tokens"), source.get("step")
        if _finite(tokens) and _finite(step) and step > 0:
            return tokens / step
    return None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short (a job still writing, or killed) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") is not None:
            records.append(record)
    return records


def _read_overrides(path: Path) -> dict[str, str]:
    """`key=value` strings -> {key: value}; Hydra's +, ++ and ~ prefixes are dropped from the key."""
    if not path.is_file():
        return {}
    overrides = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"status": "unknown", "error": "summary.json is not valid JSON"}


def _config_seed(folder: Path) -> int | None:
    path = folder / ".hydra" / "config.yaml"
    seed = (yaml.safe_load(path.read_text()) or {}).get("seed") if path.is_file() else None
    return seed if isinstance(seed, int) else None


def _int_or_none(text: str | None) -> int | None:
    """A seed given on the command line ("seed=3") as the int the other sources give."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _job_num(folder: Path) -> int | None:
    path = folder / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    num = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("job", {}).get("num")
    return num if isinstance(num, int) else None


def _last_write(folder: Path) -> float:
    files = [folder, folder / "metrics.jsonl", folder / "train.log", folder / "summary.json"]
    return max(p.stat().st_mtime for p in files if p.exists())


def _order(job: Job) -> tuple:
    return (job.num is None, job.num or 0, job.name)


def _first(*values):
    return next((v for v in values if v is not None), None)


def _last(records: list[dict], key: str) -> float | None:
    return next((float(r[key]) for r in reversed(records) if _finite(r.get(key))), None)


def _finite_values(xs: list) -> list[float]:
    return [float(x) for x in xs if _finite(x)]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def group_configs(jobs: list[Job], swept: list[str]) -> list[Config]:
    """Jobs grouped by their swept values, in the order of each config's first job."""
    configs: dict[tuple, Config] = {}
    for job in jobs:
        values = {k: job.overrides.get(k, "default") for k in swept}
        key = tuple(values.items())
        if key not in configs:
            label = ", ".join(f"{k}={v}" for k, v in values.items()) or "all jobs"
            configs[key] = Config(label, values, [])
        configs[key].jobs.append(job)
    return list(configs.values())


# --- values of a job: a metric, final or at a token count -------------------------------------------------


def metric_column(metric: str) -> str:
    """The column a --metric names: val_loss -> final_val_loss, val_bpb -> final_val_bpb (per source too)."""
    head, slash, source = metric.partition("/")
    return METRIC_ALIASES.get(head, head) + slash + source


def higher_is_better(metric: str) -> bool:
    """HIGHER_IS_BETTER, hellaswag_* and *acc* metrics (see ACCURACY) are better higher; the others lower."""
    name = metric.split("/")[0]
    return name in HIGHER_IS_BETTER or name.startswith("hellaswag_") or bool(ACCURACY.search(name))


def logged_key(column: str) -> str | None:
    """The metrics.jsonl key of a column (final_val_loss -> val/loss, final_val_bpb/<s> -> val/bpb/<s>), or None."""
    head, _, source = column.partition("/")
    if head not in LOGGED or (source and head not in SOURCE_METRICS):
        return None
    return f"{LOGGED[head]}/{source}" if source else LOGGED[head]


def seed_value(job: Job | None, metric: str, at_tokens: int | None = None) -> tuple[float | None, str]:
    """A job's value of the metric (at `at_tokens` tokens, or final), or None and why it has none."""
    if job is None:
        return None, "no job"
    if not job.completed:
        return None, job.status
    if at_tokens is None:
        return job.value(metric), f"no {metric}"
    key = logged_key(metric)
    points = job.logged.get(key, [])
    if points and points[-1][0] < at_tokens:
        return None, f"ended before {at_tokens:,} tokens, at {points[-1][0]:,.0f}"
    return value_at(points, at_tokens), f"no {key} at {at_tokens:,} tokens"


def seed_values(config: Config, metric: str, at_tokens: int | None = None) -> list[float]:
    """The metric of each completed job of a config that has it."""
    values = (seed_value(job, metric, at_tokens)[0] for job in config.jobs if job.completed)
    return [v for v in values if v is not None]


def value_at(points: list[tuple[float, float]], x: float) -> float | None:
    """The value at x of points (x, value) in x order: a point's value at exactly x, else the linear interpolation
    between the points on either side; None outside the points."""
    if not points or not points[0][0] <= x <= points[-1][0]:
        return None
    i = bisect.bisect_left(points, x, key=lambda point: point[0])
    (x1, y1) = points[i]
    if x1 == x:
        return y1
    (x0, y0) = points[i - 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# --- tables -------------------------------------------------------------------------------------------------


def config_rows(sweep: Sweep) -> list[dict]:
    """One row per config (numbers, not text): the swept values, seeds, mean and std of each metric, status."""
    rows = []
    for config in sweep.configs:
        row = {"config": config.label, **config.values, "n_seeds": config.n_seeds}
        for metric in sweep.metrics:
            row[f"{metric}_mean"], row[f"{metric}_std"], _ = config.stats(metric)
        rows.append(row | {"status": config.status})
    return rows


def job_rows(sweep: Sweep) -> list[dict]:
    return [
        {"job": j.name, "config": c.label, **c.values, "seed": j.seed, "status": j.status, "step": j.step}
        | {m: j.value(m) for m in sweep.metrics}
        | {"error": j.error}
        for c in sweep.configs
        for j in c.jobs
    ]


def ranked(sweep: Sweep, metric: str) -> Sweep:
    """The sweep with its configs best first by the mean of `metric` (configs without it last)."""
    if metric not in sweep.metrics:
        raise UserInputError(f"cannot rank by {metric!r}: one of {', '.join(sweep.metrics)}")
    sign = -1 if higher_is_better(metric) else 1

    def key(config: Config) -> tuple:
        mean = config.stats(metric)[0]
        return (mean is None, sign * mean if mean is not None else 0.0)

    return dataclasses.replace(sweep, configs=sorted(sweep.configs, key=key))


def markdown(sweep: Sweep, by_seed: bool = True, by_config: bool = True, verdicts: "Verdicts | None" = None) -> str:
    """The tables; with `verdicts` (of a sweep with a swept key), the Verdicts section last."""
    n = len(sweep.jobs)
    done = sum(j.completed for j in sweep.jobs)
    counts = f"{n} jobs: {done} completed, {n - done} not completed (left out of means)."
    lines = [f"# Sweep {sweep.folder.name}", "", counts]
    if sweep.common:
        lines.append("Common overrides: " + " ".join(f"{k}={v}" for k, v in sweep.common.items()))
    if by_config:
        lines += ["", "## Per config (mean ± std over completed seeds)", "", *_config_table(sweep)]
    if by_seed:
        lines += ["", "## Per job", "", *_job_table(sweep)]
    if verdicts is not None and sweep.swept:
        from gptlab.sweep_verdicts import verdict_section

        lines += ["", *verdict_section(verdicts)]
    return "\n".join(lines) + "\n"


def _config_table(sweep: Sweep) -> list[str]:
    header = ["config", "seeds", *(sweep.metrics[m] for m in sweep.shown), "status"]
    rows = []
    for c in sweep.configs:
        cells = [_fmt_mean_std(*c.stats(m)[:2], _digits(m)) for m in sweep.shown]
        rows.append([c.label, str(c.n_seeds), *cells, c.status])
    return table(header, rows)


def _job_table(sweep: Sweep) -> list[str]:
    header = ["job", "seed", "status", "step", *(sweep.metrics[m] for m in sweep.shown), "error"]
    rows = [
        [j.name, _fmt(j.seed), j.status, _fmt(j.step), *(_fmt(j.value(m), _digits(m)) for m in sweep.shown),
         _short(j.error)]
        for c in sweep.configs for j in c.jobs
    ]  # fmt: skip
    return table(header, rows)


def _digits(metric: str) -> int:
    return DIGITS[metric.split("/")[0]]  # a per-source column as its pooled one


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def _fmt(x, digits: int = 0) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _fmt_mean_std(mean: float | None, std: float | None, digits: int) -> str:
    return _fmt(mean, digits) + ("" if std is None else f" ± {std:.{digits}f}")


def _short(text: str | None, width: int = 80) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    """Empty cells for missing values, so pandas reads NaN. Columns: those given, else the rows' keys."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


# --- plots --------------------------------------------------------------------------------------------------


def mean_curve(curves: Iterable[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, and per step the mean, min and max over the curves that reached it."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    cols = [by_step[s] for s in steps]
    return steps, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot_curves(sweep: Sweep) -> Figure:
    """Val loss vs step per config: the mean over completed seeds, a min-max band, unfinished jobs dashed."""
    fig, ax = _figure()
    for i, config in enumerate(sweep.configs):
        color = f"C{i % 10}"
        done = [j.curve for j in config.jobs if j.completed and j.curve]
        if done:
            steps, mean, low, high = mean_curve(done)
            ax.plot(steps, mean, color=color, label=f"{config.label} (n={len(done)})")
            if len(done) > 1:
                ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        for job in config.jobs:
            if not job.completed and job.curve:
                steps, values = zip(*job.curve)
                label = f"{config.label} seed={job.seed} ({job.status})"
                ax.plot(steps, values, color=color, linestyle="--", alpha=0.6, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.set_title("val loss: mean over seeds, band = min-max; dashed = not completed", fontsize=9)
    _legend(ax)
    return fig


def plot_vs_key(sweep: Sweep, key: str, metric: str = "final_val_loss", at_tokens: int | None = None) -> Figure:
    """The metric (at `at_tokens` tokens, or final) vs one swept key: per config the mean over completed seeds
    with its 95% CI (the t interval, n - 1 dof; no bar for one seed), each seed a dot; one series per value of the
    other swept keys. Numeric values on a numeric axis (log when they span 100x), others as categories."""
    fig, ax = _figure()
    values = list(dict.fromkeys(c.values[key] for c in sweep.configs))
    numbers = _as_numbers(values)
    position = numbers or {v: i for i, v in enumerate(values)}
    series: dict[str, list[Config]] = {}
    for config in sweep.configs:
        rest = ", ".join(f"{k}={v}" for k, v in config.values.items() if k != key)
        series.setdefault(rest, []).append(config)
    width = 0.6 / max(len(series), 1)
    for i, (rest, configs) in enumerate(series.items()):
        configs = sorted(configs, key=lambda c: position[c.values[key]])
        offset = 0 if numbers else (i - (len(series) - 1) / 2) * width
        xs, means, errors = [], [], []
        for config in configs:
            x = position[config.values[key]] + offset
            seeds = seed_values(config, metric, at_tokens)
            ax.scatter([x] * len(seeds), seeds, color=f"C{i % 10}", s=12, alpha=0.5)
            if seeds:
                xs.append(x), means.append(statistics.fmean(seeds))
                errors.append(ci_half_width(seeds) if len(seeds) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, means, yerr=errors, color=f"C{i % 10}", marker="o", capsize=3,
                        linestyle="-" if numbers else "none", label=rest or None)  # fmt: skip
    if numbers:
        xs = list(numbers.values())
        if min(xs) > 0 and max(xs) >= 100 * min(xs):
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(values)), values)
    name = sweep.metrics.get(metric, metric) + ("" if at_tokens is None else f" at {at_tokens:,} tokens")
    ax.set_xlabel(key)
    ax.set_ylabel(name)
    ax.set_title(f"{name} vs {key} (mean ± 95% CI over completed seeds)", fontsize=9)
    if len(series) > 1:
        _legend(ax)
    return fig


def _as_numbers(values: list[str]) -> dict[str, float] | None:
    try:
        numbers = {v: float(v) for v in values}
    except ValueError:
        return None
    return numbers if all(math.isfinite(x) for x in numbers.values()) else None


def as_number(text: str) -> float | None:
    numbers = _as_numbers([text])
    return numbers[text] if numbers else None


def _figure():
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)  # the Agg backend: a PNG file, no display and no pyplot state
    return fig, fig.add_subplot()


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


# --- everything at once -------------------------------------------------------------------------------------


def write_summary(sweep: Sweep, out: Path, verdicts: "Verdicts | None" = None) -> list[Path]:
    """summary.md (both tables and the verdicts), summary.csv (per config), jobs.csv (per job), verdicts.csv and
    the PNGs, into `out`. Verdicts: those given, else compare(sweep)'s (final val loss, paired t-test)."""
    from gptlab.sweep_verdicts import VERDICT_COLUMNS, compare, verdict_rows

    verdicts = compare(sweep) if verdicts is None else verdicts
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown(sweep, verdicts=verdicts))
    write_csv(config_rows(sweep), out / "summary.csv")
    write_csv(job_rows(sweep), out / "jobs.csv")
    write_csv(verdict_rows(verdicts), out / "verdicts.csv", VERDICT_COLUMNS)
    figures = _figures(sweep, verdicts)
    for name, make in figures.items():
        fig = make()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
    tables = ["summary.md", "summary.csv", "jobs.csv", "verdicts.csv"]
    return [out / name for name in [*tables, *figures]]


def _figures(sweep: Sweep, verdicts: "Verdicts") -> dict[str, Callable[[], Figure]]:
    """PNG name -> its plot: the curves, val_loss_vs_<key> per swept key, and <metric>_vs_<key> for a verdict
    metric other than the final val loss (e.g. val_bpb_vs_<key>, val_loss_at_<N>_tokens_vs_<key>)."""
    figures: dict[str, Callable[[], Figure]] = {"val_loss_curves.png": lambda: plot_curves(sweep)}
    for key in sweep.swept:
        figures[f"val_loss_vs_{_file_safe(key)}.png"] = lambda key=key: plot_vs_key(sweep, key)
        if (verdicts.metric, verdicts.at_tokens) != ("final_val_loss", None):
            name = f"{_file_safe(verdicts.stem)}_vs_{_file_safe(key)}.png"
            figures[name] = lambda key=key: plot_vs_key(sweep, key, verdicts.metric, verdicts.at_tokens)
    return figures


def _file_safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
