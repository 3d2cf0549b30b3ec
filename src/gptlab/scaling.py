"""Scaling laws from a compute-matched ladder of runs (experiment=scaling_ladder): how the loss-optimal model size
and token count grow with compute, fitted the two ways Hoffmann et al. (2022, "Chinchilla") fitted them.

- IsoFLOP profiles (their approach 2): at each FLOP budget C, a parabola of the final loss in ln N; its minimum is
  N_opt(C), and D_opt(C) the tokens that budget gives a model of that size. Then power laws N_opt = k C^a and
  D_opt = k C^b across the budgets (least squares in log-log).
- The parametric loss (approach 3): L(N, D) = E + A / N^alpha + B / D^beta, fitted as they fit it: the Huber loss
  (delta 1e-3) of log L, minimized by L-BFGS from a grid of starting points. Under C = 6ND its compute-optimal
  frontier is N_opt(C) = G (C/6)^(beta / (alpha + beta)), D_opt(C) = (C/6) / N_opt(C),
  G = (alpha A / (beta B))^(1 / (alpha + beta)).

N is every parameter but the position embedding (gptlab.flops.non_embedding_params: the N that the `flops` and
`tokens_per_param` budgets count); D the tokens trained on; C a run's tokens x FLOPs per token (6N + 12LHQT), the
count its `flops` budget was set in. The closed form counts C = 6ND, without attention's 12LHQT: where attention
is a sizeable share of a run's FLOPs (long sequences, narrow models), its N_opt and D_opt at a budget read a little
high.

The fits need numpy and scipy only; read_ladder, which counts N and FLOPs on the runs' models, loads torch.
"""

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp, softmax

from gptlab.errors import DataError

HUBER_DELTA = 1e-3  # Hoffmann et al.'s: residuals of log L above this count linearly (robust to outliers)
# Hoffmann et al.'s grid of starting points (appendix D.2) for (a, b, e, alpha, beta); A = e^a, B = e^b, E = e^e
GRID = np.array(
    list(itertools.product(range(0, 30, 5), range(0, 30, 5), np.arange(-1, 1.5, 0.5), *[np.arange(0, 2.5, 0.5)] * 2)),
    dtype=float,
)
# L-BFGS runs from the grid's best points only (the grid's objective is evaluated in one pass): from all 4,500 it
# would take minutes, and on Chinchilla-like data the best 10 already reached the optimum that the best 50 found
STARTS = 16
# alpha and beta: a loss that falls with N and with D (Chinchilla's: 0.34, 0.28). Runs that do not show it (at small
# budgets a larger model trains on too few tokens to win) would take them negative, where the frontier is undefined:
# the fit stops at the bound, and the report says the law is not identified.
EXPONENT_BOUNDS = (0.01, 3.0)
BOUNDS = [(None, None)] * 3 + [EXPONENT_BOUNDS] * 2  # for (a, b, e, alpha, beta)
# L-BFGS-B's default ftol is relative to max(|f|, 1): on an objective of ~1e-4 it would stop early
LBFGS_OPTIONS = {"ftol": 1e-12, "gtol": 1e-9, "maxiter": 1000}
FARTHEST_MINIMUM = math.log(10)  # an IsoFLOP minimum more than 10x beyond the sizes run is no minimum: a guess
BOOTSTRAP_SAMPLES = 200
INTERVAL = (5, 95)  # percentiles of the bootstrap: a 90% interval


@dataclass(frozen=True)
class Run:
    """One completed job of a ladder."""

    name: str  # its folder in the sweep
    params: int  # N
    tokens: int  # D, trained on
    flops: float  # C spent: tokens x FLOPs per token
    budget: float  # C it was given: its `flops` key
    loss: float  # final validation loss
    seed: int


@dataclass(frozen=True)
class IsoFLOP:
    """The parabola loss = c2 (ln N)^2 + c1 ln N + c0 through the runs of one budget, and its minimum."""

    budget: float
    coefficients: tuple[float, float, float]  # c2, c1, c0
    sizes: tuple[int, ...]  # the model sizes N that ran at this budget
    n_opt: float | None  # None: the parabola opens downward, or its minimum lies far beyond the sizes run
    d_opt: float | None
    loss_opt: float | None

    def loss(self, params: np.ndarray) -> np.ndarray:
        return np.polyval(self.coefficients, np.log(params))

    @property
    def inside(self) -> bool:
        """Is N_opt among the sizes that ran (an interpolation), not beyond them (an extrapolation)?"""
        return self.n_opt is not None and min(self.sizes) <= self.n_opt <= max(self.sizes)


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta, with its compute-optimal frontier under C = 6ND."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params, tokens):
        return self.E + self.A / np.power(params, self.alpha) + self.B / np.power(tokens, self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    def n_opt(self, flops):
        return self.G * np.power(np.asarray(flops) / 6, self.beta / (self.alpha + self.beta))

    def d_opt(self, flops):
        return np.asarray(flops) / 6 / self.n_opt(flops)

    def tokens_per_param(self, flops):
        return self.d_opt(flops) / self.n_opt(flops)

    def frontier(self, flops):
        """The lowest loss a budget C can buy."""
        return self.loss(self.n_opt(flops), self.d_opt(flops))

    @property
    def at_bound(self) -> list[str]:
        """The exponents the fit left at a bound of EXPONENT_BOUNDS: the runs do not determine them."""
        return [name for name in ("alpha", "beta") if min(abs(getattr(self, name) - b) for b in EXPONENT_BOUNDS) < 1e-6]


@dataclass(frozen=True)
class Bootstrap:
    """The parametric fit redone on resamples of the seeds: each row one resample."""

    alpha: np.ndarray
    beta: np.ndarray
    tokens_per_param: np.ndarray  # resample x budget

    @staticmethod
    def interval(values: np.ndarray) -> np.ndarray:
        return np.percentile(values, INTERVAL, axis=0)


@dataclass(frozen=True)
class LadderFit:
    runs: list[Run]
    budgets: list[float]
    isoflops: list[IsoFLOP]
    n_exponent: float | None  # a of N_opt = k C^a from the IsoFLOP minima; None: fewer than 2 minima
    d_exponent: float | None
    law: Law
    bootstrap: Bootstrap | None  # None: one seed per config, nothing to resample


# --- reading a sweep --------------------------------------------------------------------------------------------


def read_ladder(sweep: Path) -> tuple[list[Run], list[str]]:
    """The completed jobs of a sweep folder, and the others as "<folder> (<status>)". N and FLOPs per token are
    counted on each job's model (its .hydra/config.yaml) by gptlab.flops, as its budget was."""
    from omegaconf import OmegaConf

    from gptlab.flops import flops_per_token, non_embedding_params
    from gptlab.model_config import gpt_config_from_record
    from gptlab.summary import read_summary
    from gptlab.sweep import job_statuses

    runs, skipped = [], []
    for folder, status in job_statuses(sweep).items():
        summary = read_summary(sweep / folder) or {}
        if status != "completed" or summary.get("val_loss") is None:
            skipped.append(f"{folder} ({status if status != 'completed' else 'no val_loss'})")
            continue
        config_file = sweep / folder / ".hydra" / "config.yaml"
        config = OmegaConf.load(config_file)
        if config.get("flops") is None:
            raise DataError(
                f"{folder} was not budgeted in FLOPs: fit_scaling.py reads a compute-matched ladder, jobs that "
                "set flops=<C> (experiment=scaling_ladder or scaling_ladder_cpu)"
            )
        model = gpt_config_from_record(OmegaConf.to_container(config.model, resolve=True), str(config_file))
        per_token = flops_per_token(model, config.data.seq_len)
        tokens, budget = summary["tokens"], float(config.flops)
        if not budget - config.global_batch_tokens * per_token < tokens * per_token <= budget:
            raise DataError(
                f"{folder} spent {tokens * per_token:.3g} FLOPs, not its flops budget {budget:.3g} to within a step: "
                "another budget key on its command line (max_tokens, trainer.max_steps, tokens_per_param) set its "
                "length, or it stopped early"
            )
        runs.append(Run(folder, non_embedding_params(model), tokens, tokens * per_token, budget, summary["val_loss"],
                        summary["seed"]))  # fmt: skip
    if not runs:
        raise DataError(f"{sweep} holds no completed job with a val_loss (a sweep folder of scripts/train.py -m)")
    return runs, skipped


# --- fitting ----------------------------------------------------------------------------------------------------


def fit_ladder(runs: list[Run], bootstrap_samples: int = BOOTSTRAP_SAMPLES) -> LadderFit:
    """Both fits on a ladder's runs: at least 2 budgets, each with 3 or more model sizes."""
    budgets = sorted({r.budget for r in runs})
    if len(budgets) < 2:
        raise DataError(
            f"the runs have 1 FLOP budget (C={budgets[0]:.3g}); a scaling law needs 2 or more, each with 3 or more "
            "model sizes"
        )
    isoflops = []
    for budget in budgets:
        at = [r for r in runs if r.budget == budget]
        isoflops.append(fit_isoflop(budget, *_columns(at, "params", "tokens", "loss")))
    minima = [f for f in isoflops if f.n_opt is not None]
    n_exponent = d_exponent = None
    if len(minima) >= 2:
        c = [f.budget for f in minima]
        n_exponent, d_exponent = power_law(c, [f.n_opt for f in minima])[0], power_law(c, [f.d_opt for f in minima])[0]
    law = fit_law(*_columns(runs, "params", "tokens", "loss"))
    resampled = bootstrap(runs, law, budgets, bootstrap_samples) if bootstrap_samples else None
    return LadderFit(runs, budgets, isoflops, n_exponent, d_exponent, law, resampled)


def fit_isoflop(budget: float, params, tokens, losses) -> IsoFLOP:
    """The parabola of loss in ln N through one budget's runs (every seed a point) and its minimum. D_opt is read
    off the budget's own runs: ln D is close to linear in ln N at a fixed budget (D = C / FLOPs per token)."""
    params, tokens, losses = map(np.asarray, (params, tokens, losses))
    sizes = tuple(int(n) for n in np.unique(params))
    if len(sizes) < 3:
        raise DataError(
            f"budget C={budget:.3g} has results for {len(sizes)} model size(s); an IsoFLOP parabola needs 3 or more"
        )
    x = np.log(params)
    c2, c1, c0 = np.polyfit(x, losses, 2)
    x_opt = -c1 / (2 * c2) if c2 > 0 else math.inf
    if not x.min() - FARTHEST_MINIMUM <= x_opt <= x.max() + FARTHEST_MINIMUM:  # opens downward, or near straight
        return IsoFLOP(budget, (c2, c1, c0), sizes, None, None, None)
    ln_d = np.polyval(np.polyfit(x, np.log(tokens), 1), x_opt)
    return IsoFLOP(budget, (c2, c1, c0), sizes, math.exp(x_opt), math.exp(ln_d), c0 - c1**2 / (4 * c2))


def power_law(flops, values) -> tuple[float, float]:
    """a and k of values = k C^a, least squares in log-log."""
    a, ln_k = np.polyfit(np.log(flops), np.log(values), 1)
    return float(a), math.exp(ln_k)


def fit_law(params, tokens, losses, start: Law | None = None) -> Law:
    """L(N, D) = E + A / N^alpha + B / D^beta by Hoffmann et al.'s method: minimize the summed Huber loss of
    log L - LSE(a - alpha ln N, b - beta ln D, e) with L-BFGS, from the best STARTS points of GRID (or from
    `start`, a fit of similar data, as the bootstrap does); the best optimum wins."""
    points = len(set(zip(np.asarray(params).tolist(), np.asarray(tokens).tolist())))
    if points < 6:
        raise DataError(f"the runs have {points} distinct (N, D); the parametric fit of 5 constants needs 6 or more")
    objective = HuberObjective(params, tokens, losses)
    if start is None:
        starts = GRID[np.argsort(objective.values(GRID))[:STARTS]]
    else:
        starts = [np.log([start.A, start.B, start.E]).tolist() + [start.alpha, start.beta]]
    starts = np.clip(starts, [b[0] if b[0] is not None else -np.inf for b in BOUNDS], np.inf)  # the grid has 0
    fits = [minimize(objective, x, jac=True, method="L-BFGS-B", bounds=BOUNDS, options=LBFGS_OPTIONS) for x in starts]
    a, b, e, alpha, beta = min(fits, key=lambda f: f.fun).x
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


class HuberObjective:
    """Summed Huber loss of the log-loss residuals, for theta = (a, b, e, alpha, beta), with its gradient."""

    def __init__(self, params, tokens, losses):
        self.ln_n, self.ln_d, self.ln_l = (np.log(np.asarray(v, dtype=float)) for v in (params, tokens, losses))

    def terms(self, thetas: np.ndarray) -> np.ndarray:
        """The logs of A / N^alpha, B / D^beta and E for each theta (rows) and run: shape (thetas, 3, runs)."""
        a, b, e, alpha, beta = (thetas[:, i, None] for i in range(5))
        e = np.broadcast_to(e, (len(thetas), len(self.ln_n)))
        return np.stack([a - alpha * self.ln_n, b - beta * self.ln_d, e], axis=1)

    def values(self, thetas: np.ndarray) -> np.ndarray:
        residuals = logsumexp(self.terms(thetas), axis=1) - self.ln_l
        return huber(HUBER_DELTA, residuals).sum(axis=1)

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        terms = self.terms(theta[None])[0]
        residuals = logsumexp(terms, axis=0) - self.ln_l
        slope = np.clip(residuals, -HUBER_DELTA, HUBER_DELTA)  # d huber / d residual
        weights = slope * softmax(terms, axis=0)  # d residual / d term: each term's share of the sum
        grad = [weights[0].sum(), weights[1].sum(), weights[2].sum(), -weights[0] @ self.ln_n, -weights[1] @ self.ln_d]
        return float(huber(HUBER_DELTA, residuals).sum()), np.array(grad)


def bootstrap(runs: list[Run], law: Law, budgets: list[float], samples: int, seed: int = 0) -> Bootstrap | None:
    """The parametric fit on `samples` resamples of the seeds: each config (a model size at a budget) draws as
    many runs as it has seeds, with replacement. None when every config has one seed: there is nothing to draw."""
    configs: dict[tuple[int, float], list[int]] = {}
    for i, r in enumerate(runs):
        configs.setdefault((r.params, r.budget), []).append(i)
    if all(len(members) == 1 for members in configs.values()):
        return None
    rng = np.random.default_rng(seed)
    params, tokens, losses = _columns(runs, "params", "tokens", "loss")
    fits = []
    for _ in range(samples):
        drawn = np.concatenate([rng.choice(members, len(members)) for members in configs.values()])
        fits.append(fit_law(params[drawn], tokens[drawn], losses[drawn], start=law))
    return Bootstrap(
        alpha=np.array([f.alpha for f in fits]),
        beta=np.array([f.beta for f in fits]),
        tokens_per_param=np.array([f.tokens_per_param(budgets) for f in fits]),
    )


def _columns(runs: list[Run], *names: str) -> list[np.ndarray]:
    return [np.array([getattr(r, name) for r in runs], dtype=float) for name in names]


# --- the report -------------------------------------------------------------------------------------------------


def markdown(fit: LadderFit, title: str, skipped: list[str] = ()) -> str:
    """The text report: the runs, the IsoFLOP minima and power laws, the parametric fit and its frontier."""
    law, seeds = fit.law, sorted({r.seed for r in fit.runs})
    sizes = sorted({r.params for r in fit.runs})
    lines = [
        f"# Scaling fit: {title}",
        "",
        f"{len(fit.runs)} runs: {len(fit.budgets)} FLOP budgets x {len(sizes)} model sizes "
        f"({_si(sizes[0])} to {_si(sizes[-1])} parameters), seeds {', '.join(map(str, seeds))}. N: parameters "
        "without the position embedding; C: tokens x FLOPs per token (6N + 12LHQT), as the flops budget counts.",
        *([f"Left out (not completed): {', '.join(skipped)}."] if skipped else []),
        "",
        "## IsoFLOP profiles (Hoffmann et al. 2022, approach 2): loss = parabola in ln N at each budget",
        "",
        "| budget C | sizes N | N_opt | D_opt | D_opt / N_opt | loss at N_opt |",
        "|---|---|---|---|---|---|",
        *[_isoflop_row(f) for f in fit.isoflops],
        "",
        _power_laws(fit),
        "",
        "## Parametric fit (approach 3): L(N, D) = E + A / N^alpha + B / D^beta",
        "",
        f"E = {law.E:.4g}, A = {law.A:.4g}, B = {law.B:.4g}, alpha = {law.alpha:.4f}, beta = {law.beta:.4f} "
        f"(Huber loss, delta {HUBER_DELTA:g}, of log L; L-BFGS from the best {STARTS} points of Hoffmann et al.'s "
        f"grid; {len(fit.runs)} runs).",
        "",
        *(_unidentified(law) if law.at_bound else _frontier(fit)),
        _uncertainty(fit),
    ]
    return "\n".join(lines) + "\n"


def _frontier(fit: LadderFit) -> list[str]:
    law = fit.law
    return [
        f"Compute-optimal under C = 6ND: N_opt ~ C^{_ratio(law.beta, law)}, D_opt ~ C^{_ratio(law.alpha, law)}, "
        f"G = {law.G:.4g}; at the sweep's budgets:",
        "",
        *_optimum_table(fit),
        "",
    ]


def _unidentified(law: Law) -> list[str]:
    """Why there is no compute-optimal frontier: the fit left an exponent at its bound."""
    names = " and ".join(law.at_bound)
    return [
        f"Not identified: {names} stopped at a bound of {EXPONENT_BOUNDS}: in these runs the loss does not fall with "
        f"{' and '.join({'alpha': 'N', 'beta': 'D'}[n] for n in law.at_bound)} as the law needs (at small budgets a "
        "larger model trains on too few tokens to win), so the law gives no compute-optimal frontier. Add budgets, "
        "or smaller models, until the IsoFLOP minima fall inside the sizes run.",
        "",
    ]


def _isoflop_row(f: IsoFLOP) -> str:
    sizes = f"{_si(f.sizes[0])}-{_si(f.sizes[-1])} ({len(f.sizes)})"
    if f.n_opt is None:
        return (f"| {f.budget:.3g} | {sizes} | none within 10x of the sizes run: the loss does not turn in ln N; add "
                "sizes around the best | | | |")
    where = "" if f.inside else " (beyond the sizes run)"
    return (f"| {f.budget:.3g} | {sizes} | {_si(f.n_opt)}{where} | {_si(f.d_opt)} | {f.d_opt / f.n_opt:.3g} | "
            f"{f.loss_opt:.4f} |")  # fmt: skip


def _power_laws(fit: LadderFit) -> str:
    if fit.n_exponent is None:
        return "Power laws: need the minima of 2 or more budgets."
    count = sum(f.n_opt is not None for f in fit.isoflops)
    return (f"Power laws over {count} budgets: N_opt ~ C^{fit.n_exponent:.3f}, D_opt ~ C^{fit.d_exponent:.3f} "
            "(Hoffmann et al.: 0.49 and 0.51).")  # fmt: skip


def _optimum_table(fit: LadderFit) -> list[str]:
    law, ratios = fit.law, fit.law.tokens_per_param(fit.budgets)
    interval = Bootstrap.interval(fit.bootstrap.tokens_per_param) if fit.bootstrap else None
    rows = ["| budget C | N_opt | D_opt | tokens per parameter | 90% interval |", "|---|---|---|---|---|"]
    for i, c in enumerate(fit.budgets):
        spread = f"{interval[0][i]:.3g}-{interval[1][i]:.3g}" if interval is not None else "n/a"
        rows.append(f"| {c:.3g} | {_si(law.n_opt(c))} | {_si(law.d_opt(c))} | {ratios[i]:.3g} | {spread} |")
    return rows


def _uncertainty(fit: LadderFit) -> str:
    if fit.bootstrap is None:
        return ("Uncertainty: none: each config (model size x budget) ran one seed, so there are no seeds to "
                "resample; sweep seed=0,1,2 for a bootstrap interval.")  # fmt: skip
    b = fit.bootstrap
    (alpha_lo, beta_lo), (alpha_hi, beta_hi) = np.percentile(np.stack([b.alpha, b.beta], 1), INTERVAL, axis=0)
    return (f"Uncertainty: bootstrap over seeds ({len(b.alpha)} resamples: each config draws its seeds with "
            f"replacement, then the parametric fit is redone): alpha {alpha_lo:.3f}-{alpha_hi:.3f}, "
            f"beta {beta_lo:.3f}-{beta_hi:.3f} (90% intervals).")  # fmt: skip


def _ratio(exponent: float, law: Law) -> str:
    return f"{exponent / (law.alpha + law.beta):.3f}"


def _si(x: float) -> str:
    """1234567 -> 1.23M."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# --- the figure -------------------------------------------------------------------------------------------------


def plot(fit: LadderFit):
    """Left: each run's loss against its FLOPs, coloured by size, with the parametric fit's frontier. Right: the
    IsoFLOP profiles, loss against N at each budget, with their parabolas and minima."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    by_flops, by_size = figure.subplots(1, 2)
    params, flops, losses = _columns(fit.runs, "params", "flops", "loss")
    dots = by_flops.scatter(flops, losses, c=np.log10(params), cmap="viridis", zorder=3)
    figure.colorbar(dots, ax=by_flops, label="log10 N")
    if not fit.law.at_bound:  # else the law has no frontier (see markdown)
        c = np.geomspace(flops.min() / 2, flops.max() * 2, 200)
        by_flops.plot(c, fit.law.frontier(c), "k--", label="parametric fit: compute-optimal frontier (C = 6ND)")
        by_flops.legend(fontsize=8)
    by_flops.set(xscale="log", xlabel="training FLOPs C", ylabel="final val loss", title="loss vs compute")
    by_flops.set_xticks(fit.budgets, [f"{c:.3g}" for c in fit.budgets])
    for i, f in enumerate(fit.isoflops):
        colour = f"C{i}"
        at = [r for r in fit.runs if r.budget == f.budget]
        by_size.scatter([r.params for r in at], [r.loss for r in at], color=colour, zorder=3)
        shown = [*f.sizes, *([f.n_opt] if f.n_opt is not None else [])]
        n = np.geomspace(min(shown) / 1.5, max(shown) * 1.5, 100)
        by_size.plot(n, f.loss(n), color=colour, label=f"C = {f.budget:.3g}")
        if f.n_opt is not None:
            by_size.plot([f.n_opt], [f.loss_opt], "*", color=colour, markersize=12, markeredgecolor="k")
    by_size.set(xscale="log", xlabel="parameters N", ylabel="final val loss", title="IsoFLOP profiles (* N_opt)")
    by_size.legend(fontsize=8)
    for axes in (by_flops, by_size):
        axes.xaxis.set_minor_formatter(NullFormatter())  # labels at the powers of ten only: no overlaps
    return figure
