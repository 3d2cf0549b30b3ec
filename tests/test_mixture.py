"""Data mixtures (gptlab.data.mixture): the schedule against sorting every due time, realised ratios per 100 steps,
disjoint ranks, exact resume, repeats and data.max_repeats, per-source validation, and the run's record of it."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from gptlab.config import load_config
from gptlab.data.config import DataConfig
from gptlab.data.datamodule import TokenDataModule
from gptlab.data.mixture import MixtureBatches, StrideSchedule
from gptlab.data.shards import write_manifest, write_shard
from gptlab.data.tokenizer import EOT, RANKS_SHA256
from gptlab.errors import ConfigError, DataError
from gptlab.module import GPTModule
from gptlab.schema import check
from gptlab.train import run
from tests.conftest import ROOT, compose_train, kill_once, read_metrics, run_script

SPAN = 1000  # source s's tokens are s * SPAN + (its document's number mod SPAN): each token names both


def write_source(folder: Path, source: int, doc_lengths, shard_tokens: int = 3000, val_docs: int = 12) -> Path:
    """A prepared dataset whose documents (each starting with <|endoftext|>) hold only tokens of `source`; train
    documents run on across shard ends. Validation: `val_docs` documents of 40 tokens."""
    folder.mkdir(parents=True, exist_ok=True)

    def stream(lengths):
        docs = [np.full(n, source * SPAN + d % SPAN, dtype=np.uint16) for d, n in enumerate(lengths)]
        for doc in docs:
            doc[0] = EOT
        starts = np.cumsum([0, *lengths])[:-1]
        return np.concatenate(docs), starts

    entries = []
    for split, lengths in (("train", doc_lengths), ("val", [40] * val_docs)):
        tokens, starts = stream(lengths)
        for index, base in enumerate(range(0, len(tokens), shard_tokens)):
            part = tokens[base : base + shard_tokens]
            local = starts[(starts >= base) & (starts < base + len(part))] - base
            name = f"{split}_{index:06d}.bin"
            sha = write_shard(folder / name, part, local)
            entries.append({"file": name, "split": split, "tokens": len(part), "documents": len(local), "sha256": sha})
    manifest = {"format": "test", "source": {"name": f"source{source}"}, "val_fraction": None, "shards": entries}
    write_manifest(folder, manifest | {"tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "eot": EOT}})
    return folder


def row_sources(x: torch.Tensor) -> np.ndarray:
    """The source of each row (its tokens other than <|endoftext|>; a row holds one source's only)."""
    rows = x.numpy()
    text = np.where(rows == EOT, -1, rows // SPAN)
    source = text.max(axis=1)
    assert ((text == source[:, None]) | (text == -1)).all(), "a row mixes sources"
    return source


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """Three sources: a small one (it runs out and repeats within a few hundred steps), two larger."""
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    sizes = (60, 400, 250)  # documents
    return [write_source(root / f"s{k}", k, rng.integers(20, 600, size=n)) for k, n in enumerate(sizes)]


# ---- the schedule


def sorted_due_times(weights: list[float], n: int) -> np.ndarray:
    """The reference: the first n sequences of the run by sorting every source's due times (j + 1/2) / w_k,
    ties in source order; how many of them each source supplies."""
    w = np.array(weights) / sum(weights)
    due = [((j + 0.5) / w[k], k) for k in range(len(w)) if w[k] > 0 for j in range(n + 1)]
    counts = np.zeros(len(w), dtype=np.int64)
    for _, k in sorted(due)[:n]:
        counts[k] += 1
    return counts


WEIGHTS = [[0.7, 0.3], [1, 1, 1], [0.5, 0.25, 0.25], [0.522, 0.267, 0.052, 0.042, 0.046, 0.038, 0.033], [1e-3, 1],
           [0, 2, 1]]  # fmt: skip  (the fourth: SlimPajama's seven sources, Soboleva et al. 2023)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_the_schedule_is_the_order_of_due_times_and_each_step_continues_it(weights):
    schedule = StrideSchedule(weights)
    for n in [0, 1, 2, 3, 7, 16, 99, 100, 257, 1000, 1601]:
        assert schedule.counts(n).tolist() == sorted_due_times(weights, n).tolist(), n
    total = np.zeros(len(weights), dtype=np.int64)
    for step in range(120):
        source, index = schedule.take(step * 16, 16)
        assert schedule.counts(step * 16).tolist() == total.tolist()
        for k in range(len(weights)):  # each source's next sequences, in order, none skipped or read twice
            assert index[source == k].tolist() == list(range(total[k], total[k] + (source == k).sum()))
        total += np.bincount(source, minlength=len(weights))
    w = np.array(weights) / sum(weights)
    assert np.abs(total - w * 120 * 16).max() < 1.5  # within about one sequence of the weights


def test_the_schedule_at_a_large_position_is_exact_and_fast():
    schedule = StrideSchedule([0.7, 0.2, 0.1])
    n = 10**12 + 12345  # a trillion sequences in: counts are computed, not replayed
    start = time.perf_counter()
    counts = schedule.counts(n)
    assert time.perf_counter() - start < 0.1
    assert counts.sum() == n and np.abs(counts - schedule.weights * n).max() < 1.5


# ---- the batches


@pytest.mark.parametrize("weights", [[0.7, 0.3, 0.0], [0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
def test_realised_token_ratios_are_within_1_percent_of_the_weights_over_every_100_steps(sources, weights):
    """At the default batch (16 sequences of 256 per optimizer step: micro-batch 8, 2 accumulation steps), over
    300 steps: in every window of 100 consecutive steps, each source's share of the training tokens."""
    batches = MixtureBatches(sources, weights, 256, 8, seed=0, accumulation=2)
    tokens = np.zeros((300, len(sources)))
    for i in range(600):
        x, y = batches[i]
        tokens[i // 2] += np.bincount(row_sources(x), minlength=len(sources)) * x.shape[1]
    w = np.array(weights) / sum(weights)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 100, axis=0).sum(axis=2)  # (201, sources)
    shares = windows / windows.sum(axis=1, keepdims=True)
    assert np.abs(shares - w).max() < 0.01
    assert batches.repeats(300)[0] >= 1  # the small source ran out on the way (and was read on)


def test_ranks_are_disjoint_and_together_read_the_single_process_batches(sources):
    """Any devices x micro-batch x accumulation with the same global batch (16 sequences) reads, step by step,
    the same sequences; the ranks' shares of a step do not overlap."""

    def steps(batch, world, accum):
        ranks = [MixtureBatches(sources, [0.5, 0.3, 0.2], 32, batch, 3, r, world, accumulation=accum)
                 for r in range(world)]  # fmt: skip
        return [sorted(tuple(row) for r in ranks for i in range(s * accum, (s + 1) * accum) for row in r[i][0].tolist())
                for s in range(30)]  # fmt: skip

    single = steps(16, 1, 1)
    assert all(len(step) == 16 for step in single)
    assert steps(4, 2, 2) == single and steps(8, 2, 1) == single and steps(2, 4, 2) == single


def test_item_i_depends_on_i_alone(sources):
    """A fresh (or unpickled) dataset, asked for items out of order, returns what a run reading in order got:
    across the small source's repeat, so resuming anywhere is exact."""
    weights = [0.6, 0.3, 0.1]
    reader = MixtureBatches(sources, weights, 64, 4, seed=5, accumulation=3)
    in_order = [reader[i] for i in range(240)]
    assert reader.repeats(80)[0] >= 1
    fresh = pickle.loads(pickle.dumps(MixtureBatches(sources, weights, 64, 4, seed=5, accumulation=3)))
    for i in [239, 0, 100, 101, 7, 150, 60]:
        x, y = fresh[i]
        assert torch.equal(x, in_order[i][0]) and torch.equal(y, in_order[i][1])
        assert torch.equal(x[:, 1:], y[:, :-1])
    other_seed = MixtureBatches(sources, weights, 64, 4, seed=6, accumulation=3)
    assert not torch.equal(other_seed[0][0], in_order[0][0])


def test_a_source_that_runs_out_is_read_again_in_a_new_order(sources):
    """Source 0 alone (weight 1 against a weight-0 source): every pass reads its documents, each pass in another
    order, and repeats() counts the passes begun after the first."""
    batches = MixtureBatches(sources[:2], [1.0, 0.0], 32, 4, seed=0)
    per_pass = batches.streams[0].num_sequences  # source 0's sequences per pass
    rows = np.concatenate([batches[i][0].numpy() for i in range(3 * per_pass // 4)])
    assert set(row_sources(torch.from_numpy(rows))) == {0}
    passes = [rows[p * per_pass : (p + 1) * per_pass] for p in range(3)]
    for again in passes[1:]:
        assert not np.array_equal(again[:, :8], passes[0][:, :8])  # re-permuted
    for p in passes:  # each pass reads all 60 documents (bar a short one cut off at its end, or a row at a step
        assert len(set(np.unique(p[p != EOT]).tolist())) >= 57  # that straddles two passes)
    assert batches.repeats(0) == [0, 0] and batches.repeats(per_pass // 4) == [0, 0]
    assert batches.repeats(per_pass // 4 + 1) == [1, 0] and batches.repeats(3 * per_pass // 4) == [2, 0]


# ---- the datamodule: max_repeats, validation per source, the record


def mixture_overrides(sources: list[Path], weights: list[float]) -> list[str]:
    added = [f"+data.mixture.s{k}={{dir: '{folder}', weight: {w}}}" for k, (folder, w) in
             enumerate(zip(sources, weights))]  # fmt: skip
    return ["data=mixture", "~data.mixture.fineweb_edu", "~data.mixture.slimpajama", *added]


def datamodule(overrides: list[str], world_size: int = 1) -> TokenDataModule:
    cfg, plan = load_config(compose_train(["debug=smoke", "logger=none", *overrides]))
    dm = TokenDataModule(cfg.data, cfg.eval, plan, cfg.seed)
    cpu = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(global_rank=0, world_size=world_size, global_step=0, strategy=cpu)  # as a Trainer
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_max_repeats_refuses_a_budget_that_reads_a_source_more_often(sources):
    base = mixture_overrides(sources, [0.5, 0.5, 0.0])
    steps = 400  # 8 sequences of 64 per step, 4 of source 0 (~19k tokens): it runs out every ~70 steps
    dm = datamodule([*base, "max_tokens=null", f"trainer.max_steps={steps}", "data.max_repeats=1"])
    with pytest.raises(ConfigError) as err:
        dm.train_dataloader()
    message = str(err.value)
    assert err.value.key == "data.max_repeats" and "\n" not in message
    runs_out = int(message.split("at step ")[1].split(":")[0].replace(",", ""))
    assert dm.mixture.repeats(runs_out - 1)[0] == 1 and dm.mixture.repeats(runs_out)[0] == 2
    report = dm.mixture_report(steps)["s0"]
    assert f"read {report['passes']:.2f} times" in message and report["repeats"] > 1
    datamodule([*base, "max_tokens=null", f"trainer.max_steps={runs_out - 1}", "data.max_repeats=1"]).train_dataloader()


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.mixture.s0.weight=-1", "data.mixture.s0.weight"),
        ("data.mixture.s0.weight=abc", "data.mixture.s0.weight"),
        ("+data.mixture.bad=3", "data.mixture.bad"),
        ("data.shuffle=false", "data.shuffle"),
    ],
)
def test_a_bad_mixture_is_a_config_error_naming_the_key(sources, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(compose_train([*mixture_overrides(sources, [1, 1, 0]), override]))
    assert err.value.key == key and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="data.mixture: needs a source with weight > 0"):
        load_config(compose_train(mixture_overrides(sources, [0, 0, 0])))
    with pytest.raises(ConfigError, match="data.mixture.a b: a name may hold"):  # names go into metric names
        check(DataConfig(name="mixture", source="-", mixture={"a b": {"dir": "x"}}), "data.")


def test_an_unprepared_source_names_its_key_and_the_command_that_prepares_it(sources, tmp_path):
    overrides = [*mixture_overrides(sources, [1, 1, 1]), f"+data.mixture.fineweb_edu={{dir: '{tmp_path / 'fw'}'}}"]
    with pytest.raises(DataError) as err:
        datamodule(overrides)
    assert str(err.value).startswith(f"data.mixture.fineweb_edu.dir={tmp_path / 'fw'} holds no prepared dataset")
    assert "python scripts/prepare_data.py data=fineweb_edu data.source=HuggingFaceFW/fineweb-edu data.dir=" in str(
        err.value)


def validate(overrides: list[str], data_dir: Path) -> dict[str, float]:
    """The validation metrics of the seed-0 initial model on the data of `overrides`."""
    cfg, plan = load_config(compose_train(["debug=smoke", "logger=none", "seed=0", *overrides], data_dir=data_dir))
    L.seed_everything(0, verbose=False)
    module = GPTModule(cfg, plan)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.validate(module, datamodule=TokenDataModule(cfg.data, cfg.eval, plan, cfg.seed), verbose=False)
    return module.val_metrics


def test_each_source_is_validated_as_if_it_were_the_only_dataset(data_dir, one_thread):
    """val/loss/<source> and val/bpb/<source> of a mixture equal val/loss and val/bpb of that dataset alone (the
    same model, the same windows); the pooled val/loss is their token-weighted mean."""
    mixed = validate(["data=sample_mixture"], data_dir)
    alone = {name: validate([f"data={name}"], data_dir) for name in ("sample", "sample_code")}
    for name, metrics in alone.items():
        for key in ("val/loss", "val/bpb"):
            assert mixed[f"{key}/{name}"] == pytest.approx(metrics[key], rel=1e-5)
    assert mixed["val/loss"] == pytest.approx((alone["sample"]["val/loss"] + alone["sample_code"]["val/loss"]) / 2,
                                              rel=1e-5)  # fmt: skip  (equal windows per source)
    assert alone["sample"]["val/loss"] != pytest.approx(alone["sample_code"]["val/loss"], rel=1e-3)


def test_a_mixture_run_records_weights_realised_shares_and_each_source(tmp_path, data_dir, one_thread, capsys):
    overrides = ["debug=smoke", "logger=none", "data=sample_mixture", "data.mixture.sample_code.weight=0.6"]
    summary = run(compose_train(overrides, tmp_path / "run", data_dir))
    out = capsys.readouterr().out
    assert summary["status"] == "completed"
    mixture = summary["data_mixture"]
    assert [mixture[name]["weight"] for name in ("sample", "sample_code")] == pytest.approx([0.625, 0.375])
    # 2 steps of 8 sequences: 10 of sample, 6 of sample_code
    assert mixture["sample"]["share"] == 10 / 16 and mixture["sample_code"]["tokens"] == 6 * 64
    assert set(summary["val_by_source"]) == {"sample", "sample_code"}
    assert "mixture of sample 0.625" in out and "sample_code      0.375 -> 0.3750" in out
    logged = {key for record in read_metrics(tmp_path / "run") for key in record}
    assert {"val/loss/sample", "val/bpb/sample_code", "data/repeats/sample", "val/loss"} <= logged


@pytest.mark.slow
def test_a_mixture_run_killed_mid_pass_resumes_exactly(tmp_path, data_dir):
    """SIGKILL once a step's checkpoint exists (both sources mid-pass); ckpt_path=<run folder> then ends like the
    uninterrupted run: the same losses, per-source validation included."""
    overrides = ["debug=smoke", "logger=none", "data=sample_mixture", "max_tokens=3072",
                 "callbacks.checkpoint.every_n_steps=1", "eval.every_n_steps=2"]  # fmt: skip
    expected = run(compose_train(overrides, tmp_path / "reference", data_dir))
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "GPTLAB_DATA_DIR": str(data_dir)}
    assert kill_once(cmd, env, tmp_path, run_dir / "checkpoints" / "step_000003.ckpt") == -signal.SIGKILL
    done = subprocess.run([*cmd, f"ckpt_path={run_dir}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("step", "train_loss", "val_loss", "val_by_source", "data_mixture"):
        assert summary[key] == expected[key], key


@pytest.mark.slow
def test_prepare_data_prepares_the_sources_named_after_data_options(tmp_path):
    done = run_script("prepare_data.py", "data=sample_mixture", f"paths.data_dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "sample" / "manifest.json").is_file() and (tmp_path / "sample_code" / "manifest.json").is_file()
    assert "data.mixture.sample:" in done.stdout and "data.mixture.sample_code:" in done.stdout
    other = run_script("prepare_data.py", "data=sample_mixture", f"paths.data_dir={tmp_path}",
                       f"+data.mixture.mine={{dir: '{tmp_path / 'mine'}'}}")  # fmt: skip
    assert other.returncode != 0 and not (tmp_path / "mine").exists()
    assert f"data.mixture.mine.dir={tmp_path / 'mine'} holds no prepared dataset" in other.stderr
