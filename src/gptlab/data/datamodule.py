"""The LightningDataModule: prepares the dataset on first use, then serves train and validation batches."""

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from gptlab.config import ConfigError, EvalConfig, RunPlan, SampleDataConfig
from gptlab.data.loader import RangeSampler, SequentialBatches, TokenWindows, ValidationBatches
from gptlab.data.sample import prepare_sample
from gptlab.data.shards import MANIFEST, read_manifest

PREPARERS = {"sample": prepare_sample}  # data.name -> function(data_cfg) that writes data.dir


class TokenDataModule(L.LightningDataModule):
    def __init__(self, cfg: SampleDataConfig, eval_cfg: EvalConfig, plan: RunPlan):
        super().__init__()
        self.cfg, self.eval_cfg, self.plan = cfg, eval_cfg, plan
        self.folder = Path(cfg.dir)

    def prepare_data(self) -> None:
        """Runs once per node before setup: writes the shards if data.dir has none yet."""
        if not (self.folder / MANIFEST).is_file():
            PREPARERS[self.cfg.name](self.cfg)
        prepared_fraction = read_manifest(self.folder).get("val_fraction")
        if prepared_fraction != self.cfg.val_fraction:
            raise ConfigError(
                "data.val_fraction",
                f"{self.folder} was prepared with val_fraction={prepared_fraction}; "
                f"set data.val_fraction={prepared_fraction} or delete the folder to re-prepare",
            )

    def setup(self, stage: str) -> None:
        self.train_windows = TokenWindows(self.folder, "train", self.cfg.seq_len)
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
        batches = SequentialBatches(
            self.train_windows, self.cfg.micro_batch_size, self.trainer.global_rank, self.trainer.world_size
        )
        # Resume exactly: skip the micro-batches that the restored optimizer steps already consumed.
        start = self.trainer.global_step * self.plan.grad_accum
        stop = self.plan.total_steps * self.plan.grad_accum
        return self._loader(batches, RangeSampler(start, stop))

    def val_dataloader(self) -> DataLoader:
        batches = ValidationBatches(
            self.val_windows,
            self.num_val_windows,
            self.cfg.micro_batch_size,
            self.trainer.global_rank,
            self.trainer.world_size,
        )
        return self._loader(batches, RangeSampler(0, len(batches)))

    def _loader(self, dataset, sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # items are already micro-batches
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.trainer.strategy.root_device.type == "cuda",
            persistent_workers=self.cfg.num_workers > 0,
        )
