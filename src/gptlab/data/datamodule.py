"""The LightningDataModule: checks the prepared dataset, then serves train and validation batches.

Training batches come from a map-style dataset whose item i is micro-batch i of this rank, so the
loader's position is just the number of micro-batches consumed. It is saved in every checkpoint and
resuming starts the sampler there: the run continues with exactly the batch it would have seen.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from gptlab.config import RunPlan
from gptlab.data import index
from gptlab.data.commands import prepare_command, quoted, token_shards_in
from gptlab.data.config import DataConfig, PrepareConfig
from gptlab.data.loader import RangeSampler, SequentialBatches, TokenWindows, ValidationBatches
from gptlab.data.prepare import PREPARE_FILE, foreign_files, prepare_dataset, shown
from gptlab.data.shards import MANIFEST, ShardError, check_dataset, read_manifest
from gptlab.data.shuffle import ShuffledBatches
from gptlab.data.tokenizer import RANKS_SHA256
from gptlab.errors import ConfigError, UserInputError
from gptlab.eval.config import EvalConfig

AUTO_PREPARED = {"sample"}  # datasets small enough to prepare on first use


class TokenDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, eval_cfg: EvalConfig, plan: RunPlan, seed: int):
        super().__init__()
        self.cfg, self.eval_cfg, self.plan = cfg, eval_cfg, plan
        self.shuffle_seed = seed if cfg.shuffle_seed is None else cfg.shuffle_seed
        self.folder = Path(cfg.dir)
        self._resumed_state: dict | None = None

    def prepare_data(self) -> None:
        """Once per node, before setup: prepare the sample on first use, then check the shards."""
        if not (self.folder / MANIFEST).is_file():
            error = self.unprepared_error()
            if error is not None:
                raise error
            prepare_dataset(self.cfg)
        manifest = check_dataset(self.folder, RANKS_SHA256, self.cfg.verify_checksums)
        prepared_fraction = manifest.get("val_fraction")  # None: the val split came with the shards
        if self.cfg.val_source is None and prepared_fraction not in (None, self.cfg.val_fraction):
            raise ConfigError(
                "data.val_fraction",
                f"{self.folder} was prepared with val_fraction={prepared_fraction}; "
                f"set data.val_fraction={prepared_fraction} or prepare again into another data.dir",
            )

    def unprepared_error(self) -> UserInputError | None:
        """Why training cannot start on data.dir, which has no manifest.json, with the command that fixes it; None
        when the dataset may be prepared there now (the sample corpus, into an empty folder or its own)."""
        folder = self.folder
        if index.is_token_shards(self.cfg):  # the prepare command indexes them
            _, beside = index.index_folder(self.cfg)
            foreign = [] if beside else foreign_files(folder, index.INDEX_FILE)
        else:
            foreign = foreign_files(folder, PREPARE_FILE)
        if foreign and any(name.endswith(".bin") for name in foreign) and token_shards_in(folder):
            local = dataclasses.replace(self.cfg, name="local", source=str(folder), prepare=PrepareConfig())
            return ConfigError(
                "data.dir",
                f"{folder} holds token shards ({shown(foreign)}) but no {MANIFEST}, so no data={self.cfg.name} "
                f"dataset is written there; to train on those shards, index them first (this adds manifest.json and "
                f"one .idx per shard beside them; the shards are only read): {prepare_command(local)}, "
                f"then train with data=local data.source={quoted(folder)} data.dir={quoted(folder)}",
            )
        if foreign:
            return ConfigError(
                "data.dir",
                f"{folder} holds other files ({shown(foreign)}) and no {MANIFEST}: gptlab writes a dataset only into "
                "an empty or new folder, or one it was preparing; set data.dir to another folder",
            )
        if self.cfg.name in AUTO_PREPARED:
            return None
        return ShardError(f"{folder} holds no prepared dataset. Prepare it first:\n  {self.prepare_command()}")

    def prepare_command(self) -> str:
        return prepare_command(self.cfg)

    def setup(self, stage: str) -> None:
        shards = [(Path(e["file"]).name, e["sha256"]) for e in read_manifest(self.folder)["shards"]]
        self.dataset_fingerprint = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
        self.val_windows = TokenWindows(self.folder, "val", self.cfg.seq_len)
        self.num_val_windows = self.eval_cfg.val_tokens // self.cfg.seq_len
        if not 1 <= self.num_val_windows <= len(self.val_windows):
            raise ConfigError(
                "eval.val_tokens",
                f"must cover 1 to {len(self.val_windows)} sequences of data.seq_len={self.cfg.seq_len} "
                f"(the validation split of {self.folder} has {len(self.val_windows) * self.cfg.seq_len} "
                f"tokens in whole sequences; got {self.eval_cfg.val_tokens})",
            )

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        B, T, accum = self.cfg.micro_batch_size, self.cfg.seq_len, self.plan.grad_accum
        if self.cfg.shuffle:
            align = self.cfg.align_to_documents
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
        }

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
