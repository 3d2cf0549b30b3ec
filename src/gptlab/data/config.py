"""The `data` group: where documents come from, how they are prepared into shards, and how training reads them.

One schema for every data option; conf/data/<name>.yaml states what its dataset changes (source, validation
split, folder, loader workers). Loads no torch: scripts/prepare_data.py and the config checks use it alone.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from gptlab.schema import at_least, in_range, knob, non_negative, optional, require

SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a mixture source's name, as metric names (val/loss/<name>) carry it


@dataclass
class FilterConfig:
    """Keep a document only if its `field` (dotted for nested, e.g. meta.redpajama_set_name) passes."""

    field: str = MISSING
    min: Optional[float] = None  # keep values >= min
    max: Optional[float] = None  # keep values <= max
    one_of: Optional[list[str]] = None  # keep values in this list

    def check(self) -> None:
        require(self.min is not None or self.max is not None or self.one_of is not None, "",
                f"filter on {self.field!r} needs min, max or one_of")  # fmt: skip


@dataclass
class PrepareConfig:
    """How scripts/prepare_data.py turns the source into shards."""

    workers: int = knob(2, at_least(1))  # tokenizer processes
    max_docs: Optional[int] = knob(None, optional(at_least(1)))  # stop after this many kept training documents
    max_tokens: Optional[int] = knob(None, optional(at_least(1)))  # stop after this many training tokens
    shard_tokens: int = knob(100_000_000, at_least(1))  # tokens per shard (uint16: 200 MB)
    filters: list[FilterConfig] = field(default_factory=list)  # e.g. [{field: int_score, min: 3}]


@dataclass
class DataConfig:
    name: str = MISSING  # sample | fineweb_edu | fineweb | slimpajama | local (the option)
    source: str = MISSING  # a hub dataset id, or local files (a file, folder or glob) in the same schema
    hub_config: Optional[str] = None  # the hub dataset's configuration, e.g. sample-10BT
    train_split: str = "train"  # the hub split to train on
    # the source's own validation data: a hub split name or local files; null: hold out val_fraction of the
    # documents, chosen by a hash of their id
    val_source: Optional[str] = None
    val_fraction: float = 0.0005  # share of documents held out for validation when val_source is null
    text_field: str = "text"
    id_field: Optional[str] = "id"  # null: a document's id is its source file and row
    dir: str = "${paths.data_dir}/${.name}"  # folder of prepared shards
    verify_checksums: bool = True  # hash every shard against manifest.json before training
    seq_len: int = knob(256, at_least(1))  # tokens per training sequence (T); GPT-2 recipes use 1024
    micro_batch_size: int = knob(8, at_least(1))  # sequences per device per forward pass (B)
    num_workers: int = knob(0, non_negative)  # DataLoader worker processes
    shuffle: bool = True  # a seeded permutation of documents each epoch; false: read shards in order
    shuffle_seed: Optional[int] = knob(None, optional(non_negative))  # null: the run's seed
    align_to_documents: bool = False  # true: sequences start at document starts (see gptlab/data/shuffle.py)
    overfit_batches: int = knob(0, non_negative)  # > 0: train on the first N micro-batches only, repeated
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    # A mixture of prepared datasets, name -> {dir: a prepared data.dir, weight: its relative share, normalised to
    # sum to 1; 0: validation only} (gptlab/data/mixture.py): each training sequence comes from one source, drawn by
    # weight; each source is validated on its own (val/loss/<name>). Empty: data.dir alone.
    mixture: dict[str, Any] = field(default_factory=dict)
    # mixture: how many times a source may be re-permuted and read again once it runs out; null: no limit
    max_repeats: Optional[int] = knob(None, optional(non_negative))

    def check(self) -> None:
        require(
            self.val_source is not None or in_range(0, 1, "()").test(self.val_fraction),
            "val_fraction",
            f"must be in (0, 1) when data.val_source is null (got {self.val_fraction})",
        )
        for name, source in self.mixture.items():
            require(bool(SOURCE_NAME.fullmatch(name)), f"mixture.{name}", "a name may hold letters, digits, _ . -")
            shape = isinstance(source, dict) and set(source) <= {"dir", "weight"} and isinstance(source.get("dir"), str)
            require(shape, f"mixture.{name}", f"must be {{dir: <prepared folder>, weight: <number>}} (got {source!r})")
            weight = source.get("weight", 1.0)
            require(isinstance(weight, (int, float)) and weight >= 0, f"mixture.{name}.weight",
                    f"must be a number >= 0 (got {weight!r})")  # fmt: skip
        require(
            not self.mixture or sum(s.get("weight", 1.0) for s in self.mixture.values()) > 0,
            "mixture",
            "needs a source with weight > 0 (0 marks a source that is only validated on)",
        )
        require(self.shuffle or not self.mixture, "shuffle", "must be true with data.mixture (it draws shuffled data)")


@dataclass(frozen=True)
class Source:
    """A prepared dataset a run reads: data.dir, or one of data.mixture's."""

    name: str
    folder: Path
    weight: float  # its share of the training sequences (normalised)


def data_sources(cfg: DataConfig) -> list[Source]:
    """The run's datasets: data.mixture's, in its order, or data.dir alone (named after the data option)."""
    if not cfg.mixture:
        return [Source(cfg.name, Path(cfg.dir), 1.0)]
    weights = {name: source.get("weight", 1.0) for name, source in cfg.mixture.items()}
    return [Source(name, Path(s["dir"]), weights[name] / sum(weights.values())) for name, s in cfg.mixture.items()]
