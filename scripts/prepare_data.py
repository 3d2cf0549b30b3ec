"""Tokenize a dataset into token shards: `python scripts/prepare_data.py data=fineweb_edu [key=value ...]`.

Reads data.source (a Hugging Face Hub dataset, streamed, or local files), tokenizes it with GPT-2 in
data.prepare.workers processes and writes shards + manifest.json into data.dir (see conf/prepare.yaml).
Interrupted (Ctrl-C: exit status 130; SIGTERM, as a scheduler's preemption sends: 143)? Run the same command
again: it resumes after the last finished shard. data.dir is locked while it is prepared: a second prepare into
it fails at once, naming the first.

data.source naming `.bin` token shards (llm.c, modded-nanogpt) indexes them in place instead, without
re-tokenizing: `python scripts/prepare_data.py data=local data.source=<folder>` (gptlab.data.index).
"""

import os
import signal
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab.config import load_data_config
from gptlab.data import index
from gptlab.data.commands import quoted, source_config
from gptlab.data.config import DataConfig, FilterConfig, data_sources
from gptlab.data.prepare import build_dataset, existing_manifest, lock_folder
from gptlab.data.sample_corpus import BUILT_IN
from gptlab.data.shards import MANIFEST
from gptlab.data.sources import Stream, streams
from gptlab.errors import DataError, exit_on_config_error, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="prepare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, terminate)
    try:
        prepare(cfg)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the last finished shard and its progress are on disk
        how, status = ("Terminated", 143) if isinstance(e, Terminated) else ("Interrupted", 130)
        print(f"{how}: run the same command again to resume after the last finished shard", file=sys.stderr)
        sys.exit(status)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both stop the prepare the same way."""


def terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def prepare(cfg: DictConfig) -> None:
    data = load_data_config(cfg)
    if data.mixture:
        prepare_mixture(data)
    else:
        prepare_folder(data)


def prepare_mixture(data: DataConfig) -> None:
    """Each source named after a data option is prepared into its folder with that option's settings; any other
    source must be prepared already (checked first, before any long prepare)."""
    options = {source: source_config(source.name, source.folder) for source in data_sources(data)}
    for source, option in options.items():
        if option is None and not (source.folder / MANIFEST).is_file():
            raise DataError(
                f"data.mixture.{source.name}.dir={source.folder} holds no prepared dataset, and there is no data "
                f"option {source.name} (conf/data/{source.name}.yaml) to prepare it with; prepare it first: python "
                f"scripts/prepare_data.py data=<option> data.source=<its files> data.dir={quoted(source.folder)}"
            )
    for source, option in options.items():
        if option is not None:
            print(f"data.mixture.{source.name}:")
            prepare_folder(option)


def prepare_folder(data: DataConfig) -> None:
    """Prepare data.dir from data.source (or index the token shards it names), unless it is prepared already
    (with these settings: a folder holding another dataset is refused), holding its lock meanwhile."""
    folder = Path(data.dir)
    with lock_folder(data):
        manifest = existing_manifest(data)
        if manifest is not None:
            source = manifest.get("source", {}).get("source")
            if manifest.get("format") == index.FORMAT:  # the folder may hold the shards themselves: keep them
                print(f"{folder} is already indexed (from {source}); delete {folder / MANIFEST} to index it again")
            else:
                print(f"{folder} is already prepared (from {source}); delete it to prepare it again")
            return
        shards = index.is_token_shards(data)
        print(index.plan(data) if shards else plan(data))
        started = time.time()
        manifest = build_dataset(data)
        print((index.summary if shards else summary)(folder, manifest, time.time() - started))


def plan(data: DataConfig) -> str:
    """What the prepare will read and write; local files are listed here, so a bad path fails before any work."""
    p = data.prepare
    lines = [f"Preparing data={data.name} into {data.dir}"]
    lines += [describe_stream(data, stream) for stream in streams(data)]
    filters = [f"{f.field} {describe_filter(f)}" for f in p.filters]
    limits = [f"{key}={getattr(p, key):,}" for key in ("max_docs", "max_tokens") if getattr(p, key) is not None]
    lines.append(f"  filters:    {'; '.join(filters) or 'none'}")
    lines.append(f"  limits:     {', '.join(limits) or 'none: the whole source'}")
    lines.append(f"  shards:     {p.shard_tokens:,} tokens each, GPT-2 tokenizer in {p.workers} process(es)")
    return "\n".join(lines)


def describe_stream(data: DataConfig, stream: Stream) -> str:
    if data.name in BUILT_IN:
        what = f"the built-in corpus: {stream.origin}"
    elif isinstance(stream.origin, str):  # a hub split
        config = f" (config {data.hub_config})" if data.hub_config else ""
        what = f"split {stream.origin} of {data.source}{config}, streamed from the Hugging Face Hub"
    else:
        where = data.val_source if stream.splits == ("val",) else data.source
        what = f"{len(stream.origin)} local file(s) from {where}"
    if len(stream.splits) > 1:
        what += f"; {held_out(data)}"
    return f"  {'+'.join(stream.splits) + ':':<12}{what}"


def held_out(data: DataConfig) -> str:
    return f"val: {data.val_fraction * 100:g}% of the documents, chosen by a hash of their id"


def describe_filter(f: FilterConfig) -> str:
    conditions = ((">=", f.min), ("<=", f.max), ("in", f.one_of))
    return " and ".join(f"{op} {value}" for op, value in conditions if value is not None)


def summary(folder: Path, manifest: dict, seconds: float) -> str:
    shards = manifest["shards"]
    total = sum(e["tokens"] for e in shards)
    lines = [f"Prepared {folder} in {seconds:.1f} s: {len(shards)} shards, {total:,} tokens"]
    for split, counts in manifest["documents"].items():
        tokens = sum(e["tokens"] for e in shards if e["split"] == split)
        dropped = ", ".join(f"{key.replace('_', ' ')} {n:,}" for key, n in counts.items() if key != "kept")
        lines.append(f"  {split:<5} {tokens:>15,} tokens {counts['kept']:>12,} documents ({dropped})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
