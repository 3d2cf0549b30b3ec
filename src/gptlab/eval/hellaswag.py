"""HellaSwag accuracy of a GPT, scored completion-style as in Karpathy's build-nanogpt.

Each example is a context and 4 candidate endings. A row is the GPT-2 tokens of `ctx` followed by those of
`" " + ending`; the model's cross-entropy over the ending tokens ranks the endings: `acc` takes the ending with
the lowest summed loss, `acc_norm` the one with the lowest mean loss per ending token.

Unlike build-nanogpt (one example, 4 rows, per forward pass), the rows of `batch_size` examples go through
the model together, sorted by length and right-padded; causal attention keeps padding from changing the
real positions. Batch shapes come from a few buckets so a torch.compile'd model compiles only a few times.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.request import urlopen

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from torch.nn import functional as F

from gptlab.config import PathsConfig
from gptlab.data.tokenizer import gpt2_tokenizer
from gptlab.errors import DataError
from gptlab.eval.config import HellaSwagFileConfig
from gptlab.files import atomic_open, atomic_write_bytes, sha256_of
from gptlab.schema import at_least, knob, one_of, optional, required


@dataclass
class _HellaSwagFileSection:
    hellaswag: HellaSwagFileConfig = field(default_factory=HellaSwagFileConfig)


@dataclass
class EvalHellaSwagConfig:
    """The root of scripts/eval_hellaswag.py (conf/eval_hellaswag.yaml)."""

    checkpoint: Optional[str] = knob(None, required("a gptlab .ckpt, a Hugging Face GPT-2 folder or a hub name"))
    limit: Optional[int] = knob(None, optional(at_least(1)))  # score only the first N examples; null: all 10,042
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:1 ...
    # autocast dtype; auto: bf16 on a GPU that has it, else fp32 (not `precision`: that names the training group)
    dtype: str = knob("auto", one_of("auto", "fp32", "bf16", "fp16"))
    batch_size: int = knob(16, at_least(1))  # examples per forward pass (4 rows each); lower it if out of memory
    compile: bool = False  # torch.compile the model first (pays off on the full split on a GPU)
    eval: _HellaSwagFileSection = field(default_factory=_HellaSwagFileSection)
    paths: PathsConfig = field(default_factory=PathsConfig)


ConfigStore.instance().store(name="eval_hellaswag_schema", node=EvalHellaSwagConfig)

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_NAME = "hellaswag_val.jsonl"  # the validation split: 10,042 examples
SHA256_SUFFIX = ".sha256"  # sidecar holding the sha256 of the downloaded file, checked on later uses
REQUIRED_FIELDS = ("ctx", "endings", "label")  # the schema has more fields; scoring reads only these
N_ENDINGS = 4
LENGTH_MULTIPLE = 32  # sequence lengths are rounded up to this: few distinct shapes for torch.compile
ENDING_MULTIPLE = 16  # ending lengths likewise (logits are computed at ending positions only)


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]  # 4 candidate endings
    label: int  # index of the correct ending


# ---------------------------------------------------------------------------------------------------------
# The data file


def hellaswag_file(path: str | Path | None, cache_dir: Path, download: bool = True) -> Path | None:
    """The HellaSwag validation jsonl: `path` when given, else the copy cached in cache_dir, else a fresh
    download into cache_dir. None when there is no path, no cached copy and the download failed (offline)."""
    if path is not None:
        given = Path(path).expanduser()
        if not given.is_file():
            raise DataError(f"no HellaSwag file at {given} (eval.hellaswag.path)")
        return given
    cached = Path(cache_dir) / FILE_NAME
    if cached.is_file():
        verify_cached(cached)
        return cached
    return download_file(URL, cached) if download else None


def verify_cached(file: Path) -> None:
    """Check a downloaded copy against the sha256 recorded when it was downloaded (a copy placed there by
    hand has no record and is taken as is: there is no official hash to check it against)."""
    record = file.with_name(file.name + SHA256_SUFFIX)
    if not record.is_file():
        return
    expected = record.read_text().strip()
    actual = sha256_of(file)
    if actual != expected:
        raise DataError(
            f"{file} has sha256 {actual} but {expected} when it was downloaded: the file is damaged; "
            f"delete it and {record.name} to download it again"
        )


def download_file(url: str, dest: Path) -> Path | None:
    """Download url to dest atomically (a temp file renamed into place) and record its sha256 beside it.
    None when the download fails, e.g. with no network."""
    digest = hashlib.sha256()
    try:
        with atomic_open(dest) as out, urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            atomic_write_bytes(dest.with_name(dest.name + SHA256_SUFFIX), (digest.hexdigest() + "\n").encode())
    except OSError:  # URLError, timeouts and connection resets are all OSErrors
        return None
    return dest
    return digest.hexdigest()


def load_examples(path: str | Path) -> list[Example]:
    """Every example of a HellaSwag jsonl file; a malformed line is a DataError naming its line number."""
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(parse_example(line, f"{path}, line {line_number}"))
    if not examples:
        raise DataError(f"{path} holds no HellaSwag examples")
    return examples


def parse_example(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str):
        raise DataError(f"{where}: ctx must be a string, got {ctx!r}")
    if type(label) is not int or not 0 <= label < N_ENDINGS:  # type(): bool is an int subclass
        raise DataError(f"{where}: label must be an integer in 0..{N_ENDINGS - 1}, got {label!r}")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
        count = len(endings) if isinstance(endings, list) else type(endings).__name__
        raise DataError(f"{where}: endings must be a list of exactly {N_ENDINGS} strings, got {count}")
    return Example(ctx=ctx, endings=tuple(endings), label=label)


# ---------------------------------------------------------------------------------------------------------
# Scoring


def example_rows(example: Example, block_size: int) -> list[tuple[list[int], int]]:
    """The 4 rows of an example as (tokens, number of ending tokens), cut from the left to block_size."""
    enc = gpt2_tokenizer()
    ctx = enc.encode_ordinary(example.ctx)
    rows = []
    for ending in example.endings:
        end = enc.encode_ordinary(" " + ending)
        tokens = (ctx + end)[-block_size:]
        rows.append((tokens, min(len(end), len(tokens))))
    return rows


def bucket_length(n: int, block_size: int) -> int:
    return min(-(-n // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, block_size)


def make_batch(
    rows: list[tuple[list[int], int]], n_rows: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n_rows, T) tokens; (n_rows, K) positions whose next token is an ending token, and which of those
    are real. Rows past len(rows) are dummy rows (nothing real); T and K are bucketed for torch.compile."""
    T = bucket_length(max(len(tokens) for tokens, _ in rows), block_size)
    K = -(-max(n_end for _, n_end in rows) // ENDING_MULTIPLE) * ENDING_MULTIPLE
    tokens = torch.zeros(n_rows, T, dtype=torch.long)
    positions = torch.zeros(n_rows, K, dtype=torch.long)
    real = torch.zeros(n_rows, K, dtype=torch.bool)
    for i, (row, n_end) in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        first = max(len(row) - n_end, 1)  # the first token of a row predicts nothing
        positions[i, : len(row) - first] = torch.arange(first - 1, len(row) - 1)
        real[i, : len(row) - first] = True
    return tokens, positions, real


def ending_losses(
    logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean cross-entropy over each row's ending tokens; logits: (rows, K, vocab) at `positions`."""
    targets = tokens.gather(1, positions + 1)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)
    summed = (losses * real).sum(1)
    return summed, summed / real.sum(1).clamp(min=1)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    examples: list[Example],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    block_size: int | None = None,
    min_batches: int = 0,
) -> torch.Tensor:
    """(len(examples), 2) predicted ending per example: column 0 by summed loss, column 1 by mean loss.

    batch_size: examples per forward pass (4 * batch_size rows, always: short batches get dummy rows).
    block_size: longest row, default model.config.block_size.
    min_batches: run at least this many forward passes; the extra ones score a dummy batch and are discarded
    (under FSDP every forward pass gathers parameters from all ranks, so all ranks must run as many)."""
    block_size = block_size or model.config.block_size
    device = torch.device(device)
    rows = [example_rows(example, block_size) for example in examples]
    order = sorted(range(len(examples)), key=lambda i: max(len(tokens) for tokens, _ in rows[i]))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    chunks += [[]] * (min_batches - len(chunks))  # padding: no examples
    predictions = torch.zeros(len(examples), 2, dtype=torch.long)
    for chunk in chunks:
        batch_rows = [row for i in chunk for row in rows[i]] or [([0], 1)]  # padding: one 1-token dummy row
        tokens, positions, real = (t.to(device) for t in make_batch(batch_rows, N_ENDINGS * batch_size, block_size))
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(tokens, positions=positions)  # logits where an ending token is predicted, only
        if not chunk:
            continue
        summed, mean = ending_losses(logits, tokens, positions, real)
        n = len(chunk)
        predictions[chunk, 0] = summed[: N_ENDINGS * n].view(n, N_ENDINGS).argmin(1).cpu()
        predictions[chunk, 1] = mean[: N_ENDINGS * n].view(n, N_ENDINGS).argmin(1).cpu()
    return predictions


def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    limit: int | None = None,
) -> dict:
    """HellaSwag accuracy: {acc, acc_norm, n, correct, correct_norm} over the first `limit` examples (all by
    default). batch_size is examples per forward pass (4 rows each).

    Under torch.distributed each rank scores examples[rank::world] and the counts are summed over ranks, so
    every rank returns the single-process result; call it on every rank, with the bare model (not the DDP
    wrapper, whose forward may communicate a different number of times on each rank). Every rank runs as
    many forward passes as rank 0, which has the most examples: an FSDP model gathers parameters in each."""
    examples = examples[:limit] if limit is not None else examples
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = examples[rank::world]
    batches = -(-len(examples[0::world]) // batch_size)
    was_training = model.training
    model.eval()
    try:
        predictions = predict(
            model, mine, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, min_batches=batches
        )
    finally:
        model.train(was_training)
    labels = torch.tensor([example.label for example in mine], dtype=torch.long)
    counts = torch.tensor([len(mine), *(predictions == labels[:, None]).sum(0).tolist()], dtype=torch.long)
    if world > 1:
        counts = counts.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(counts)
    n, correct, correct_norm = counts.tolist()
    return dict(
        acc=correct / max(n, 1), acc_norm=correct_norm / max(n, 1), n=n, correct=correct, correct_norm=correct_norm
    )
