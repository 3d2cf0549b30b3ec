"""The LightningDataModule: checks the prepared dataset(s), then serves train and validation batches.

Training batches come from a map-style dataset whose item i is micro-batch i of this rank, so the
loader's position is just the number of micro-batches consumed. It is saved in every checkpoint and
resuming starts the sampler there: the run continues with exactly the batch it would have seen.

A run reads one prepared dataset (data.dir) or a mixture of several (data.mixture, gptlab.data.mixture): its
sources. Validation covers the first eval.val_tokens of each source's validation split; each validation batch
says which source each of its windows comes from, for val/loss/<source>.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.config import RunPlan
from gptlab.console import say
from gptlab.data import index
from gptlab.data.commands import prepare_command, quoted, source_config, token_shards_in
from gptlab.data.config import DataConfig, Source, data_sources
from gptlab.data.loader import RangeSampler, SequentialBatches, TokenWindows, ValidationBatches
from gptlab.data.mixture import MixtureBatches
from gptlab.data.prepare import PREPARE_FILE, foreign_files, prepare_dataset, shown
from gptlab.data.sample_corpus import BUILT_IN
from gptlab.data.shards import MANIFEST, ShardError, check_dataset, read_manifest
from gptlab.data.shuffle import ShuffledBatches
from gptlab.data.tokenizer import RANKS_SHA256
from gptlab.errors import ConfigError, UserInputError
from gptlab.eval.config import EvalConfig
from gptlab.locks import FolderInUse

AUTO_PREPARED = set(BUILT_IN)  # the built-in corpora are small enough to prepare on first use



class TokenDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, eval_cfg: EvalConfig, plan: RunPlan, seed: int):
        super().__init__()
        self.cfg, self.eval_cfg, self.plan = cfg, eval_cfg, plan
        self.shuffle_seed = seed if cfg.shuffle_seed is None else cfg.shuffle_seed
        self.folder = Path(cfg.dir)
        self.sources = data_sources(cfg)
        self.mixture: MixtureBatches | None = None  # this rank's training batches, when data.mixture is set
        self._resumed_state: dict | None = None

    def prepare_data(self) -> None:
        """Once per node, before setup: prepare the sample corpora on first use, then check the shards."""
        for source in self.sources:
            cfg = source_config(source.name, source.folder) if self.cfg.mixture else self.cfg
            if not (source.folder / MANIFEST).is_file():
                error = unprepared_error(cfg, source.folder, self.folder_key(source))
                if error is not None:
                    raise error
                prepare_when_free(cfg)
            manifest = check_dataset(source.folder, RANKS_SHA256, self.cfg.verify_checksums)
        prepared_fraction = manifest.get("val_fraction")  # None: the val split came with the shards
        if self.cfg.mixture or self.cfg.val_source is not None or prepared_fraction in (None, self.cfg.val_fraction):
            return
        raise ConfigError(
            "data.val_fraction",
            f"{self.folder} was prepared with val_fraction={prepared_fraction}; "
            f"set data.val_fraction={prepared_fraction} or prepare again into another data.dir",
        )

    def folder_key(self, source: Source) -> str:
        return f"data.mixture.{source.name}.dir" if self.cfg.mixture else "data.dir"

    def setup(self, stage: str) -> None:
        shards = {s.name: [(Path(e["file"]).name, e["sha256"]) for e in read_manifest(s.folder)["shards"]]
                  for s in self.sources}  # fmt: skip
        record = shards if self.cfg.mixture else shards[self.sources[0].name]
        self.dataset_fingerprint = hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]
        self.val_windows = [TokenWindows(s.folder, "val", self.cfg.seq_len) for s in self.sources]
        self.num_val_windows = self.eval_cfg.val_tokens // self.cfg.seq_len  # from each source
        for source, windows in zip(self.sources, self.val_windows):
            if not 1 <= self.num_val_windows <= len(windows):
                raise ConfigError(
                    "eval.val_tokens",
                    f"must cover 1 to {len(windows)} sequences of data.seq_len={self.cfg.seq_len} "
                    f"(the validation split of {source.folder} has {len(windows) * self.cfg.seq_len} "
                    f"tokens in whole sequences; got {self.eval_cfg.val_tokens})",
                )

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        B, T, accum = self.cfg.micro_batch_size, self.cfg.seq_len, self.plan.grad_accum
        align = self.cfg.align_to_documents
        if self.cfg.mixture:
            batches = self.mixture_batches()
            self.check_repeats()
            if rank == 0:
                say(describe_mixture(self.mixture_report(self.plan.total_steps), self.plan.total_steps))
        elif self.cfg.shuffle:
            batches = ShuffledBatches(self.folder, T, B, self.shuffle_seed, rank, world, align, accumulation=accum)
        else:
            batches = SequentialBatches(TokenWindows(self.folder, "train", T), B, rank, world, accumulation=accum)
        if self.cfg.overfit_batches:
            batches = FirstBatches(batches, self.cfg.overfit_batches)
        stop = self.plan.total_steps * self.plan.grad_accum
        return self._loader(batches, RangeSampler(self._start_batch(), stop))

    def val_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = ValidationBatches(self.val_windows, self.num_val_windows, self.cfg.micro_batch_size, rank, world)
        return self._loader(batches, RangeSampler(0, len(batches)))

    def mixture_batches(self) -> MixtureBatches:
        """This rank's training batches of data.mixture (built once)."""
        if self.mixture is None:
            c, folders, weights = self.cfg, [s.folder for s in self.sources], [s.weight for s in self.sources]
            self.mixture = MixtureBatches(
                folders, weights, c.seq_len, c.micro_batch_size, self.shuffle_seed, self.trainer.global_rank,
                self.trainer.world_size, c.align_to_documents, self.plan.grad_accum,
            )  # fmt: skip
        return self.mixture

    def mixture_report(self, steps: int) -> dict[str, dict]:
        """Each mixture source after `steps` optimizer steps: its weight, the share of the training sequences it
        supplied (the realised ratio), its tokens, passes over its training split and repeats."""
        mixture = self.mixture_batches()
        read = mixture.schedule.counts(steps * mixture.step_sequences)
        repeats = mixture.repeats(steps)
        report = {}
        for source, n, stream, r in zip(self.sources, read.tolist(), mixture.streams, repeats):
            passes = n / stream.num_sequences if stream else 0.0
            share = n / max(sum(read.tolist()), 1)
            report[source.name] = {"weight": source.weight, "share": share, "tokens": n * self.cfg.seq_len,
                                   "passes": passes, "repeats": r}  # fmt: skip
        return report

    def check_repeats(self) -> None:
        """data.max_repeats: refuse, before the first step, a budget that would read a source more often."""
        limit, steps = self.cfg.max_repeats, self.plan.total_steps
        repeats = self.mixture.repeats(steps)
        if limit is None or max(repeats) <= limit:
            return
        k = repeats.index(max(repeats))
        lo, hi = 0, steps  # the first step after which source k has been repeated more than the limit
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.mixture.repeats(mid)[k] <= limit else (lo, mid)
        source, passes = self.sources[k], self.mixture_report(steps)[self.sources[k].name]["passes"]
        raise ConfigError(
            "data.max_repeats",
            f"is {limit}, but source {source.name} ({source.folder}) would be read {passes:.2f} times in "
            f"{steps:,} steps; its repeat {limit + 1} would begin at step {lo:,}: lower the budget or its weight, "
            "add data to it, or raise data.max_repeats",
        )

    def state_dict(self) -> dict:
        """The loader position, saved in every checkpoint."""
        return {
            "micro_batches": self.trainer.global_step * self.plan.grad_accum,
            **self._layout(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._resumed_state = state

    def _layout(self) -> dict:
        """What batch i means: a resumed run must read the same sequences in the same order."""
        return {
            "shuffle": self.cfg.shuffle,
            "shuffle_seed": self.shuffle_seed,
            "align_to_documents": self.cfg.align_to_documents,
            "overfit_batches": self.cfg.overfit_batches,
            "seq_len": self.cfg.seq_len,
            "micro_batch_size": self.cfg.micro_batch_size,
            "world_size": self.trainer.world_size,
            "dataset": self.dataset_fingerprint,  # the shards' checksums: the folder itself may move
        } | ({"mixture": {s.name: s.weight for s in self.sources}} if self.cfg.mixture else {})

    def _start_batch(self) -> int:
        if self._resumed_state is None:
            return self.trainer.global_step * self.plan.grad_accum
        saved = {k: v for k, v in self._resumed_state.items() if k != "micro_batches"}
        if saved != self._layout():
            changed = sorted(k for k in saved if saved[k] != self._layout().get(k))
            raise ConfigError(
                "ckpt_path",
                f"the checkpoint's data layout differs in {', '.join(changed)} (saved {saved}); "
                "resume with the same data settings and devices to continue exactly",
            )
        return self._resumed_state["micro_batches"]

    def _loader(self, dataset, sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # items are already micro-batches
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.trainer.strategy.root_device.type == "cuda",
            persistent_workers=self.cfg.num_workers > 0,
        )


class FirstBatches(Dataset):
    """Item i is micro-batch i % n of `batches`: the first n micro-batches, served forever
    (data.overfit_batches; a model that cannot memorise them has a bug)."""

    def __init__(self, batches: Dataset, n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[i % self.n]


def prepare_when_free(cfg: DataConfig, poll_s: float = 1.0) -> dict:
    """Prepare a built-in corpus on first use. The jobs of a parallel sweep may all find it unprepared: one prepares
    it, the others wait for its lock (seconds), then find it prepared."""
    waiting = False
    while True:
        try:
            return prepare_dataset(cfg)
        except FolderInUse as busy:
            if not waiting:
                print(f"Waiting for the data folder: {busy}", file=sys.stderr, flush=True)
                waiting = True
            time.sleep(poll_s)


def unprepared_error(cfg: DataConfig | None, folder: Path, key: str) -> UserInputError | None:
    """Why training cannot start on `folder`, which has no manifest.json, with the command that fixes it; None
    when cfg's dataset may be prepared there now (a sample corpus, into an empty folder or its own). cfg: the data
    option that prepares the folder (None: a mixture source not named after one); key: the folder's config key."""
    if cfg is not None and index.is_token_shards(cfg):  # the prepare command indexes them
        _, beside = index.index_folder(cfg)
        foreign = [] if beside else foreign_files(folder, index.INDEX_FILE)
    else:
        foreign = foreign_files(folder, PREPARE_FILE)
    if foreign and any(name.endswith(".bin") for name in foreign) and token_shards_in(folder):
        local = DataConfig(name="local", source=str(folder), dir=str(folder))
        return ConfigError(
            key,
            f"{folder} holds token shards ({shown(foreign)}) but no {MANIFEST}, so no dataset is written there; to "
            f"train on those shards, index them first (this adds manifest.json and one .idx per shard beside them; "
            f"the shards are only read): {prepare_command(local)}, then train with data=local "
            f"data.source={quoted(folder)} data.dir={quoted(folder)}",
        )
    if foreign:
        return ConfigError(
            key,
            f"{folder} holds other files ({shown(foreign)}) and no {MANIFEST}: gptlab writes a dataset only into "
            f"an empty or new folder, or one it was preparing; set {key} to another folder",
        )
    if cfg is not None and cfg.name in AUTO_PREPARED:
        return None
    command = prepare_command(cfg) if cfg is not None else (
        f"python scripts/prepare_data.py data=<option> data.source=<its files> data.dir={quoted(folder)}"
    )
    return ShardError(f"{key}={folder} holds no prepared dataset. Prepare it first:\n  {command}")


def describe_mixture(report: dict[str, dict], steps: int) -> str:
    """The mixture over `steps` optimizer steps, one line per source: weight, realised share, passes, repeats."""
    lines = [f"data mixture over {steps:,} steps (weight -> share of the training sequences, passes over each):"]
    for name, r in report.items():
        repeats = f", {r['repeats']} repeat(s)" if r["repeats"] else ""
        lines.append(f"  {name:<16} {r['weight']:.3f} -> {r['share']:.4f}  {r['tokens']:>14,} tokens  "
                     f"{r['passes']:.2f} passes{repeats}")  # fmt: skip
    return "\n".join(lines)
