"""Benchmark the data pipeline on synthetic shards: `python scripts/bench_data.py [--dir D] [--tokens N]`.

Writes (or reuses) N synthetic training tokens in documents of realistic lengths, then prints one
table: the shuffling index (build time, memory) measured at that size and extrapolated to
FineWeb-Edu sample-10BT, loader throughput with and without shuffling and of a three-source mixture (one
process, page cache warm), and prepare throughput (tokenize + write shards) on a local parquet of real English,
1 and 2 workers.

Disk: the shards take 2 bytes per token (2 GB at the default 1B tokens, plus 0.4 GB for the mixture's sources)
and are kept in --dir for the next run (default: <tmp>/gptlab_bench_data); delete it when done. The run says so
first, and stops before writing anything if the disk has less room.
"""

import argparse
import multiprocessing
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gptlab.data.config import DataConfig, PrepareConfig
from gptlab.data.loader import SequentialBatches, TokenWindows
from gptlab.data.mixture import MixtureBatches
from gptlab.data.prepare import prepare_dataset
from gptlab.data.sample_corpus import sample_documents
from gptlab.data.shards import read_manifest, shard_name, write_manifest, write_shard
from gptlab.data.shuffle import ShuffledBatches
from gptlab.data.tokenizer import EOT

FINEWEB_EDU_10BT = {"tokens": 10e9, "documents": 9.7e6}
SHARD_TOKENS = 100_000_000
SEQ_LEN, BATCH = 1024, 16


def synthetic_dataset(folder: Path, tokens: int, seed: int = 0) -> dict:
    """Random tokens in documents of log-normal length (median ~550, mean ~1,000, like web text)."""
    source = {"name": "synthetic", "tokens": tokens, "seed": seed}
    if (folder / "manifest.json").is_file() and read_manifest(folder)["source"] == source:
        return read_manifest(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = np.maximum(2, rng.lognormal(np.log(1000) - 0.6, 1.1, size=2 * tokens // 1000 + 1000)).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    starts = starts[starts < tokens]
    entries = []
    for index, base in enumerate(range(0, tokens, SHARD_TOKENS)):
        shard = rng.integers(0, EOT, size=min(SHARD_TOKENS, tokens - base), dtype=np.uint16)
        local = starts[(starts >= base) & (starts < base + len(shard))] - base
        shard[local] = EOT
        name = shard_name("train", index)
        sha = write_shard(folder / name, shard, local)
        entries.append({"file": name, "split": "train", "tokens": len(shard), "documents": len(local), "sha256": sha})
    manifest = {"format": "llm.c token shards (gptlab)", "source": source, "shards": entries}
    write_manifest(folder, manifest)
    return manifest


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def warm_page_cache(folder: Path, manifest: dict) -> None:
    for entry in manifest["shards"]:
        with open(folder / entry["file"], "rb") as f:
            while f.read(1 << 24):
                pass


def tokens_per_s(batches, n: int) -> float:
    for i in range(10):  # builds tables, touches code paths
        batches[i]
    start = time.perf_counter()
    for i in range(n):
        batches[i]
    return n * BATCH * SEQ_LEN / (time.perf_counter() - start)


def measure_index(folder: Path) -> tuple[float, int, int, dict]:
    """Build time, RssAnon growth and tracemalloc peak of opening the shuffled dataset and building epoch 0."""
    before, start = rss_anon_bytes(), time.perf_counter()
    ds = ShuffledBatches(folder, SEQ_LEN, BATCH, seed=0)
    ds[0]  # opens the shards, reads the document index, builds epoch 0's tables
    seconds, resident = time.perf_counter() - start, rss_anon_bytes() - before
    tracemalloc.start()
    ShuffledBatches(folder, SEQ_LEN, BATCH, seed=1)[0]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, resident, peak, ds.index_nbytes()


# Each benchmark returns rows (what, measured here, FineWeb-Edu sample-10BT or "").
def bench_index(folder: Path, manifest: dict, args) -> list[tuple[str, str, str]]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process, so RSS growth is the index's
        seconds, resident, peak, index = pool.apply(measure_index, (folder,))
    docs = index["num_documents"]
    scale = FINEWEB_EDU_10BT["documents"] / docs
    per_doc, per_seq = index["document_bytes"] / docs, index["sequence_bytes"] / index["num_sequences"]
    arrays = index["document_bytes"] + index["sequence_bytes"]
    at_10bt = per_doc * FINEWEB_EDU_10BT["documents"] + per_seq * FINEWEB_EDU_10BT["tokens"] / SEQ_LEN
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    return [
        ("documents / training tokens", f"{docs / 1e6:.2f}M / {args.tokens / 1e9:.2f}B", "9.7M / 10B"),
        ("shuffle index build (open + epoch 0)", f"{seconds:.2f} s", f"{seconds * scale:.1f} s (scaled by documents)"),
        ("shuffle index resident (RssAnon growth)", mb(resident), f"{mb(resident * scale)} (scaled)"),
        ("shuffle index arrays", mb(arrays), mb(at_10bt)),
        ("  bytes per document / per sequence", f"{per_doc:.1f} / {per_seq:.1f}", ""),
        # Building needs the arrays plus one chunk of CHUNK_DOCS documents, whatever the dataset size.
        ("shuffle index build peak (tracemalloc)", mb(peak), f"{mb(at_10bt + peak - arrays)} (arrays + chunk)"),
    ]


def bench_shuffled(folder: Path, manifest: dict, args) -> list[tuple[str, str, str]]:
    rate = tokens_per_s(ShuffledBatches(folder, SEQ_LEN, BATCH, seed=0), args.batches)
    return [(f"shuffled loader, {BATCH}x{SEQ_LEN}, 1 process", f"{rate / 1e6:,.0f}M tokens/s", "")]


def bench_sequential(folder: Path, manifest: dict, args) -> list[tuple[str, str, str]]:
    rate = tokens_per_s(SequentialBatches(TokenWindows(folder, "train", SEQ_LEN), BATCH), args.batches)
    return [(f"sequential loader, {BATCH}x{SEQ_LEN}, 1 process", f"{rate / 1e6:,.0f}M tokens/s", "")]


def bench_mixture(folder: Path, manifest: dict, args) -> list[tuple[str, str, str]]:
    """Three sources: the dataset above and two more of --mixture-tokens each, weights 0.5 / 0.3 / 0.2."""
    folders = [folder, *(folder.parent / f"{folder.name}_source{seed}" for seed in (1, 2))]
    for seed, other in enumerate(folders[1:], 1):
        warm_page_cache(other, synthetic_dataset(other, args.mixture_tokens, seed))
    mixture = MixtureBatches(folders, [0.5, 0.3, 0.2], SEQ_LEN, BATCH, seed=0)
    rate = tokens_per_s(mixture, args.batches)
    index = [stream.index_nbytes() for stream in mixture.streams]
    per_doc = sum(i["document_bytes"] for i in index) / sum(i["num_documents"] for i in index)
    return [
        (f"mixture loader, 3 sources, {BATCH}x{SEQ_LEN}, 1 process", f"{rate / 1e6:,.0f}M tokens/s", ""),
        ("  mixture index bytes per document", f"{per_doc:.1f}", ""),
    ]


def english_parquet(folder: Path, tokens: int) -> Path:
    """A FineWeb-Edu-schema parquet of real English: the sample corpus repeated to about `tokens` tokens."""
    path = folder / f"english_{tokens}.parquet"
    if not path.is_file():
        docs = sample_documents()
        per_pass = sum(len(text) for _, text in docs) / 4  # ~4 characters per GPT-2 token
        rows = [
            {"text": text, "id": f"{doc_id}#{copy}", "int_score": 3}
            for copy in range(max(1, round(tokens / per_pass)))
            for doc_id, text in docs
        ]
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def bench_prepare(folder: Path, manifest: dict, args) -> list[tuple[str, str, str]]:
    source = english_parquet(folder.parent / "gptlab_bench_prepare", args.prepare_tokens)
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            cfg = DataConfig(name="fineweb_edu", source=str(source), dir=out, prepare=PrepareConfig(workers=workers))
            start = time.perf_counter()
            prepared = prepare_dataset(cfg)
            rate = sum(e["tokens"] for e in prepared["shards"]) / (time.perf_counter() - start)
        hours = FINEWEB_EDU_10BT["tokens"] / rate / 3600
        rows.append((f"prepare local parquet, {workers} worker(s)", f"{rate / 1e6:.2f}M tokens/s", f"{hours:.1f} h"))
    return rows


BENCHMARKS = [bench_index, bench_shuffled, bench_sequential, bench_mixture, bench_prepare]


def print_table(rows: list[tuple[str, str, str]]) -> None:
    header = ("", "measured", "FineWeb-Edu sample-10BT")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def check_room(args) -> None:
    """Say how much disk the run takes, and stop with one line before writing if there is not that much."""
    need = 2 * (args.tokens + 2 * args.mixture_tokens) + 8 * args.prepare_tokens  # tokens; parquet and shards
    folder = next(p for p in (args.dir, *args.dir.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    print(f"{args.dir}: up to {need / 1e9:.1f} GB of synthetic shards, kept for the next run ({free / 1e9:.1f} GB "
          "free)")  # fmt: skip
    if free < need and not args.dir.is_dir():
        raise SystemExit(f"Error: not enough disk in {folder} for --tokens {args.tokens:,}: pass --dir, fewer --tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "gptlab_bench_data")
    parser.add_argument("--tokens", type=int, default=1_000_000_000)
    parser.add_argument("--batches", type=int, default=3000, help="micro-batches per throughput measurement")
    parser.add_argument("--mixture-tokens", type=int, default=100_000_000, help="tokens of each added mixture source")
    parser.add_argument("--prepare-tokens", type=int, default=20_000_000, help="English tokens to prepare")
    args = parser.parse_args()
    check_room(args)
    start = time.perf_counter()
    manifest = synthetic_dataset(args.dir, args.tokens)
    print(f"{args.dir}: {args.tokens:,} tokens ready in {time.perf_counter() - start:.0f} s")
    warm_page_cache(args.dir, manifest)
    print_table([row for bench in BENCHMARKS for row in bench(args.dir, manifest, args)])


if __name__ == "__main__":
    main()
