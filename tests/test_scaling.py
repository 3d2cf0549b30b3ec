"""The scaling ladder: the depth dial (nanochat's sizes), budgets in tokens per parameter and in FLOPs, the
IsoFLOP and Chinchilla fits (gptlab/scaling.py) on synthetic laws, and scripts/fit_scaling.py on a fake sweep."""

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gptlab.config import load_config
from gptlab.errors import ConfigError, DataError
from gptlab.flops import flops_per_token, non_embedding_params
from gptlab.model import GPT
from gptlab.model_config import GPTConfig, depth_sizes, gpt_config_from_record, gpt_config_record
from gptlab.scaling import Law, Run, fit_isoflop, fit_ladder, fit_law, markdown, plot, power_law, read_ladder
from tests.conftest import ROOT, compose_train, run_script
from tests.test_experiments import expand, sweep_params

# --- the depth dial -------------------------------------------------------------------------------------------


def nanochat_sizes(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> dict[str, int]:
    """nanochat's scripts/base_train.py, build_model_meta (github.com/karpathy/nanochat), as written there."""
    base_dim = depth * aspect_ratio
    model_dim = ((base_dim + head_dim - 1) // head_dim) * head_dim
    num_heads = model_dim // head_dim
    return {"n_layer": depth, "n_head": num_heads, "n_embd": model_dim}


def nanochat_first_release_sizes(depth: int) -> dict[str, int]:
    """nanochat's first scripts/base_train.py: model_dim = depth * 64, num_heads = max(1, (model_dim + 127) // 128)."""
    model_dim = depth * 64
    return {"n_layer": depth, "n_head": max(1, (model_dim + 127) // 128), "n_embd": model_dim}


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6, 7, 12, 20, 26, 32])
def test_depth_sizes_a_model_as_nanochat_does(depth):
    assert depth_sizes(depth, 64, 128) == nanochat_sizes(depth)
    assert depth_sizes(depth, 48, 64) == nanochat_sizes(depth, 48, 64)
    if depth % 2 == 0:  # the first release agrees wherever its width divides into whole heads
        assert depth_sizes(depth, 64, 128) == nanochat_first_release_sizes(depth)


def test_nanochats_reference_sizes():
    """d12: 768 wide, 6 heads of 128; d20 (the speedrun): 1280, 10 heads; with GPT-2's 64-wide heads d12 is GPT-2."""
    assert depth_sizes(12, 64, 128) == {"n_layer": 12, "n_head": 6, "n_embd": 768}
    assert depth_sizes(20, 64, 128) == {"n_layer": 20, "n_head": 10, "n_embd": 1280}
    assert depth_sizes(12, 64, 64) == {"n_layer": 12, "n_head": 12, "n_embd": 768}


def test_a_depth_model_builds_with_the_stated_shapes():
    """model=depth model.depth=3: 3 layers, 192 wide, 3 heads of 64; the same from Hydra, from code and from the
    checkpoint record."""
    overrides = ["model=depth", "model.depth=3"]
    cfg, _ = load_config(compose_train(overrides), overrides)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.head_size) == (3, 3, 192, 64)
    in_code = GPTConfig(depth=3, head_dim=64, n_layer=None, n_head=None, n_embd=None)
    assert in_code == cfg.model and gpt_config_from_record(gpt_config_record(cfg.model)) == cfg.model
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert len(model.transformer.h) == 3
    assert model.transformer.wte.weight.shape == (cfg.model.vocab_size, 192)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 192, 192)


def test_a_record_without_depth_reads_as_before():
    """Version-2 records (before the dial) have no depth, aspect_ratio or head_dim: their sizes as recorded."""
    old = {k: v for k, v in gpt_config_record(GPTConfig(n_layer=2, n_head=2, n_embd=32)).items()
           if k not in ("depth", "aspect_ratio", "head_dim")}  # fmt: skip
    config = gpt_config_from_record({**old, "version": 2})
    assert (config.depth, config.n_layer, config.n_head, config.n_embd) == (None, 2, 2, 32)


@pytest.mark.parametrize(
    "overrides, error",
    [
        (
            ["model=gpt2_tiny", "model.depth=6"],
            r"model.n_layer: depth=6 sets n_layer=6, n_head=3, n_embd=384, "
            r"not n_layer=4, n_head=4, n_embd=128 .*n_embd to null",
        ),
        (["model=depth", "model.n_embd=512"], r"model.n_embd: depth=12 sets n_embd=768, not n_embd=512"),
        (["model=depth", "model.depth=null"], r"model.n_layer: is null: give it, or set depth"),
        (["model=depth", "model.head_dim=0"], r"model.head_dim: must be >= 1 \(got 0\)"),
    ],
    ids=["sizes_beside_depth", "one_size_beside_depth", "no_size_at_all", "bad_head_dim"],
)
def test_sizes_that_do_not_add_up_are_one_line_config_errors(overrides, error):
    with pytest.raises(ConfigError, match=error):
        load_config(compose_train(overrides), overrides)


# --- budgets in tokens per parameter and in FLOPs --------------------------------------------------------------

SMALL = ["model=depth", "model.depth=2", "data.seq_len=128", "global_batch_tokens=1024"]  # 128 wide, 2 heads
V, D_MODEL, LAYERS, HEADS, T = 50304, 128, 2, 2, 128
# GPT-2's block: ln_1, c_attn, c_proj, ln_2, c_fc, c_proj = 12 d^2 + 13 d; the tied token embedding; ln_f
N_SMALL = V * D_MODEL + LAYERS * (12 * D_MODEL**2 + 13 * D_MODEL) + 2 * D_MODEL
FLOPS_PER_TOKEN_SMALL = 6 * N_SMALL + 12 * LAYERS * HEADS * (D_MODEL // HEADS) * T  # PaLM's 6N + 12LHQT


def budget(*overrides: str):
    return load_config(compose_train([*SMALL, *overrides]), list(overrides))


def test_the_counts_the_budgets_use():
    cfg, _ = budget("max_tokens=16384")
    assert non_embedding_params(cfg.model) == N_SMALL == 6_835_712
    assert flops_per_token(cfg.model, 128) == FLOPS_PER_TOKEN_SMALL


def test_tokens_per_param_is_tokens_per_parameter_in_whole_steps():
    cfg, plan = budget("tokens_per_param=0.1")
    tokens = int(0.1 * N_SMALL)  # 683,571
    assert plan.total_steps == tokens // 1024 == 667 and plan.total_tokens == 667 * 1024
    assert plan.budget == f"tokens_per_param=0.1 (command line) -> {tokens:,} tokens (N = {N_SMALL:,} parameters)"
    assert cfg.tokens_per_param == 0.1 and cfg.max_tokens is None and cfg.flops is None


def test_flops_is_flops_over_flops_per_token_in_whole_steps():
    cfg, plan = budget("flops=1e12")
    tokens = int(1e12 // FLOPS_PER_TOKEN_SMALL)  # 24,150
    assert plan.total_steps == tokens // 1024 == 23
    assert plan.budget == (f"flops=1e+12 (command line) -> {tokens:,} tokens ({FLOPS_PER_TOKEN_SMALL:,} FLOPs per "
                           f"token = 6N + 12LHQT, N = {N_SMALL:,} parameters)")  # fmt: skip
    assert cfg.flops == 1e12 and cfg.max_tokens is None and cfg.trainer.max_steps is None


@pytest.mark.parametrize(
    "overrides, command_line, error",
    [
        (
            ["flops=1e12", "tokens_per_param=1"],
            None,
            r"^flops: and tokens_per_param are both on the command line "
            r"\(tokens_per_param=1, flops=1e\+12\): give one of them",
        ),
        (["flops=1e12", "trainer.max_steps=5"], None, r"^flops: and trainer.max_steps are both on the command line"),
        (
            ["flops=1e12"],
            [],
            r"^flops: and max_tokens both set a budget in the config \(max_tokens=196608, "
            r"flops=1e\+12\): set all but one of them to null",
        ),
        (
            ["tokens_per_param=1e-4"],
            None,
            r"^tokens_per_param: must come to at least one step of "
            r"global_batch_tokens=1024 \(got tokens_per_param=0.0001 -> 683 tokens",
        ),
        (["flops=1e10"], None, r"^flops: must come to at least one step"),
        (["flops=-1"], None, r"^flops: must be null or > 0"),
        (
            ["max_tokens=null"],
            None,
            r"^max_tokens: no budget: set max_tokens=<tokens> or trainer.max_steps=<steps> "
            r"\(or tokens_per_param=<tokens per parameter>, flops=<training FLOPs>\)$",
        ),
    ],
    ids=["two_new_keys", "flops_and_steps", "two_in_config", "too_few_tokens", "too_few_flops", "negative", "none"],
)
def test_one_budget_and_one_line_errors_naming_the_keys(overrides, command_line, error):
    with pytest.raises(ConfigError, match=error) as e:
        load_config(compose_train([*SMALL, *overrides]), overrides if command_line is None else command_line)
    assert "\n" not in str(e.value)


def test_a_budget_given_on_the_command_line_wins_over_the_configs():
    """experiment=scaling_ladder_cpu sets flops; max_tokens or trainer.max_steps on the command line replaces it."""
    overrides = ["max_tokens=16384"]
    _, plan = load_config(compose_train(["experiment=scaling_ladder_cpu", *overrides]), overrides)
    assert plan.total_steps == 16 and plan.budget == "max_tokens=16384 (command line)"


def test_config_checks_load_no_torch_unless_a_budget_needs_the_model():
    code = ("import sys; from tests.conftest import compose_train; from gptlab.config import load_config; "
            "load_config(compose_train(['experiment=cpu_ablation']), []); print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "False"


# --- the ladders ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment, depths, budgets", [
    ("scaling_ladder_cpu", ["2", "4", "6"], ["4e12", "8e12", "1.6e13"]),
    ("scaling_ladder", ["4", "6", "8", "10", "12", "14"], ["1e17", "3e17", "1e18"]),
])  # fmt: skip
def test_a_ladder_is_compute_matched(experiment, depths, budgets):
    """Every job is valid and spends its budget, to within one step, whatever its size: the same compute."""
    params = sweep_params(experiment)
    assert set(params) == {"model.depth", "flops"}
    assert params["model.depth"].split(",") == depths and params["flops"].split(",") == budgets
    for job in expand(params):
        cfg, plan = load_config(compose_train([f"experiment={experiment}", *job]), job)
        spent = plan.total_tokens * flops_per_token(cfg.model, cfg.data.seq_len)
        step = plan.tokens_per_step * flops_per_token(cfg.model, cfg.data.seq_len)
        assert cfg.flops - step < spent <= cfg.flops and experiment in cfg.tags
        assert plan.total_steps > cfg.scheduler.warmup_steps


# --- fits -------------------------------------------------------------------------------------------------------

CHINCHILLA = Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10
SIZES = np.geomspace(1e7, 1e9, 7)
BUDGETS = [1e17, 1e18, 1e19, 1e20]


def chinchilla_runs(seeds: int = 3, noise: float = 1e-3) -> list[Run]:
    """7 sizes x 4 budgets x `seeds`, each loss the law's times e^(noise x a standard normal), D = C / 6N."""
    rng = np.random.default_rng(0)
    runs = []
    for budget, n, seed in itertools.product(BUDGETS, SIZES, range(seeds)):
        d = budget / (6 * n)
        loss = float(CHINCHILLA.loss(n, d)) * math.exp(noise * rng.standard_normal())
        runs.append(Run(f"{budget:g}/{n:g}/{seed}", int(n), int(d), budget, budget, loss, seed))
    return runs


def test_the_parametric_fit_recovers_a_chinchilla_law():
    runs = chinchilla_runs()
    law = fit_law(*(np.array([getattr(r, k) for r in runs], dtype=float) for k in ("params", "tokens", "loss")))
    assert law.alpha == pytest.approx(CHINCHILLA.alpha, rel=0.05)
    assert law.beta == pytest.approx(CHINCHILLA.beta, rel=0.05)
    for c in BUDGETS:
        assert law.tokens_per_param(c) == pytest.approx(CHINCHILLA.tokens_per_param(c), rel=0.05)


def test_runs_where_larger_models_lose_leave_the_law_unidentified_not_nan(recwarn):
    """Small budgets, where every larger model is worse (the CPU ladder here): the exponents stop at their bounds,
    nothing is NaN, and the report says the frontier is not identified."""
    def loss(c, n):  # up with N, down with C
        return 5.0 + 0.3 * math.log(n / 1e6) - 0.1 * math.log(c / 1e12)

    grid = itertools.product([4e12, 8e12, 1.6e13], [6.8e6, 1.6e7, 3e7])
    runs = [Run(f"{c:g}/{n:g}", int(n), int(c / (6 * n)), c, c, loss(c, n), 0) for c, n in grid]
    fit = fit_ladder(runs, bootstrap_samples=0)
    assert fit.law.at_bound and all(math.isfinite(x) for x in (fit.law.alpha, fit.law.beta, fit.law.G))
    assert "Not identified: " in markdown(fit, "cpu") and plot(fit) is not None
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert not fit_law(*(np.array([getattr(r, k) for r in chinchilla_runs()], dtype=float)
                         for k in ("params", "tokens", "loss"))).at_bound  # fmt: skip


def test_the_closed_form_frontier_is_the_lowest_loss_of_a_budget():
    """N_opt(C) = G (C/6)^(beta/(alpha+beta)) minimizes L(N, C/6N): checked against a fine grid of N."""
    n = np.geomspace(1e6, 1e12, 200_001)
    for c in BUDGETS:
        best = n[np.argmin(CHINCHILLA.loss(n, c / (6 * n)))]
        assert CHINCHILLA.n_opt(c) == pytest.approx(best, rel=1e-3)
        assert CHINCHILLA.d_opt(c) * CHINCHILLA.n_opt(c) * 6 == pytest.approx(c)


def test_the_bootstrap_resamples_seeds_and_brackets_the_fit():
    fit = fit_ladder(chinchilla_runs(), bootstrap_samples=8)
    lo, hi = fit.bootstrap.interval(fit.bootstrap.tokens_per_param)
    assert fit.bootstrap.tokens_per_param.shape == (8, len(BUDGETS))
    assert np.all(lo <= hi) and np.all(lo > 0)
    assert fit_ladder(chinchilla_runs(seeds=1), bootstrap_samples=8).bootstrap is None  # one seed: nothing to draw


def test_isoflop_parabolas_find_the_minima_of_noiseless_profiles():
    """Losses exactly parabolic in ln N around N_opt = 0.1 C^0.5, D = C / 6N: the fits recover each N_opt and
    D_opt, and the power laws their exponents (0.5 both)."""
    fits = []
    for c in BUDGETS:
        n_opt = 0.1 * c**0.5
        n = n_opt * np.geomspace(0.2, 3, 5)  # not centred on the minimum
        loss = 2 + 5 / np.log(c) + 0.03 * (np.log(n) - np.log(n_opt)) ** 2
        fit = fit_isoflop(c, n, c / (6 * n), loss)
        assert fit.n_opt == pytest.approx(n_opt, rel=1e-9) and fit.inside
        assert fit.d_opt == pytest.approx(c / (6 * n_opt), rel=1e-9)
        assert fit.loss_opt == pytest.approx(2 + 5 / np.log(c), rel=1e-9)
        fits.append(fit)
    assert power_law(BUDGETS, [f.n_opt for f in fits]) == pytest.approx((0.5, 0.1), rel=1e-9)
    assert power_law(BUDGETS, [f.d_opt for f in fits])[0] == pytest.approx(0.5, rel=1e-9)


def test_a_profile_without_a_minimum_is_reported_not_fitted():
    n = np.array([1e7, 3e7, 1e8])
    fit = fit_isoflop(1e18, n, 1e18 / (6 * n), [3.0, 3.2, 3.1])  # curves down
    assert fit.n_opt is None and not fit.inside


def test_too_few_budgets_or_sizes_are_one_line_errors():
    runs = chinchilla_runs(seeds=1)
    with pytest.raises(DataError, match=r"^the runs have 1 FLOP budget \(C=1e\+17\); a scaling law needs 2 or more"):
        fit_ladder([r for r in runs if r.budget == 1e17])
    two_sizes = [r for r in runs if r.params in (int(SIZES[0]), int(SIZES[1]))]
    with pytest.raises(
        DataError,
        match=r"^budget C=1e\+17 has results for 2 model size\(s\); an IsoFLOP parabola "
        r"needs 3 or more$",
    ):
        fit_ladder(two_sizes)


# --- scripts/fit_scaling.py -------------------------------------------------------------------------------------


def fake_sweep(folder, depths=(2, 4, 6), budgets=("4e12", "1.6e13")) -> None:
    """Job folders as `scripts/train.py -m experiment=scaling_ladder_cpu` writes them (.hydra/config.yaml,
    summary.json), their losses from the Chinchilla law at the N and D each config gets: no training."""
    for depth, c in itertools.product(depths, budgets):
        job = [f"model.depth={depth}", f"flops={c}"]
        cfg = compose_train(["experiment=scaling_ladder_cpu", *job])
        checked, plan = load_config(cfg, job)
        n = non_embedding_params(checked.model)
        run_dir = folder / ",".join(job) / "seed=1337"
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        loss = float(CHINCHILLA.loss(n, plan.total_tokens))
        summary = {"status": "completed", "tokens": plan.total_tokens, "val_loss": loss, "seed": 1337}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    failed = folder / "model.depth=8,flops=4e12" / "seed=1337"  # a failed job is left out, and listed
    (failed / ".hydra").mkdir(parents=True)
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "tokens": 0, "val_loss": None}))


def test_fit_scaling_end_to_end_on_a_sweep_folder(tmp_path):
    fake_sweep(tmp_path)
    proc = run_script("fit_scaling.py", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "scaling.md").read_text()
    assert report in proc.stdout and (tmp_path / "scaling.png").stat().st_size > 10_000
    assert "6 runs: 2 FLOP budgets x 3 model sizes" in report
    assert "Left out (not completed): model.depth=8,flops=4e12/seed=1337 (failed)" in report
    assert "| 4e+12 | " in report and "| 1.6e+13 | " in report and "alpha = " in report
    assert "Uncertainty: none: each config (model size x budget) ran one seed" in report


def test_fit_scaling_says_what_a_sweep_lacks(tmp_path):
    fake_sweep(tmp_path, budgets=("4e12",))
    proc = run_script("fit_scaling.py", str(tmp_path), timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "Data error: the runs have 1 FLOP budget (C=4e+12); a scaling law needs 2 or more, each with 3 or more "
        "model sizes\n"
    )


def test_a_run_that_did_not_spend_its_flops_budget_is_refused(tmp_path):
    """A job whose length another budget key set (trainer.max_steps=30 on its command line) keeps the preset's
    flops in its .hydra/config.yaml: its spent FLOPs tell, and the fit would put it at the wrong budget."""
    fake_sweep(tmp_path)
    summary_file = tmp_path / "model.depth=2,flops=4e12" / "seed=1337" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps(summary | {"tokens": 30 * 1024}))
    with pytest.raises(
        DataError,
        match=r"^model.depth=2,flops=4e12/seed=1337 spent 1.27e\+12 FLOPs, not its flops "
        r"budget 4e\+12 to within a step: another budget key",
    ):
        read_ladder(tmp_path)
