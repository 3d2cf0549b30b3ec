"""HellaSwag accuracy of a GPT, scored completion-style: each example is a context and 4 candidate endings, and
the model's log-likelihood of each ending (as " " + ending after the context) ranks them.

Three normalisations, each an argmax over the 4 endings:
- acc: summed log-likelihood (build-nanogpt's and lm-evaluation-harness's `acc`);
- acc_norm: per ending token (build-nanogpt's `acc_norm`, gptlab's before it had acc_bytes);
- acc_bytes: per UTF-8 byte of the ending (lm-eval's `acc_bytes`; lm-eval's `acc_norm` divides by characters,
  the same on ASCII endings), comparable across tokenizers.

The context of an example runs once for its 4 endings (gptlab.eval.scoring), batch_size examples per forward
pass. prompt=lm_eval builds the context and endings as lm-eval's `hellaswag` task does, so its numbers and
gptlab's agree example by example; prompt=ctx uses the file's `ctx` and `endings` as build-nanogpt does.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.request import urlopen

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore

from gptlab.config import PathsConfig
from gptlab.data.tokenizer import gpt2_tokenizer
from gptlab.errors import DataError
from gptlab.eval.config import HellaSwagFileConfig
from gptlab.eval.scoring import Score, score_continuations
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
    batch_size: int = knob(32, at_least(1))  # examples per forward pass; lower it if out of memory
    compile: bool = False  # torch.compile the model first (pays off on the full split on a GPU)
    eval: _HellaSwagFileSection = field(default_factory=_HellaSwagFileSection)
    paths: PathsConfig = field(default_factory=PathsConfig)


ConfigStore.instance().store(name="eval_hellaswag_schema", node=EvalHellaSwagConfig)

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_NAME = "hellaswag_val.jsonl"  # the validation split: 10,042 examples
SHA256_SUFFIX = ".sha256"  # sidecar holding the sha256 of the downloaded file, checked on later uses
FIELDS = dict(  # the fields each prompt reads (the file has more)
    ctx=("ctx", "endings", "label"),
    lm_eval=("activity_label", "ctx_a", "ctx_b", "endings", "label"),
)
N_ENDINGS = 4
METRICS = ("acc", "acc_norm", "acc_bytes")  # by summed, per-token and per-byte log-likelihood


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


def load_examples(path: str | Path, prompt: str = "ctx") -> list[Example]:
    """Every example of a HellaSwag jsonl file; a malformed line is a DataError naming its line number."""
    path = Path(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                examples.append(parse_example(line, f"{path}, line {line_number}", prompt))
    if not examples:
        raise DataError(f"{path} holds no HellaSwag examples")
    return examples


def parse_example(line: str, where: str, prompt: str = "ctx") -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [field for field in FIELDS[prompt] if field not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (eval.hellaswag.prompt={prompt})")
    texts = [record[field] for field in FIELDS[prompt] if field not in ("endings", "label")]
    if not all(isinstance(text, str) for text in texts):
        raise DataError(f"{where}: {', '.join(FIELDS[prompt][:-2])} must be strings")
    endings, label = record["endings"], record["label"]
    if type(label) is not int or not 0 <= label < N_ENDINGS:  # type(): bool is an int subclass
        raise DataError(f"{where}: label must be an integer in 0..{N_ENDINGS - 1}, got {label!r}")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
        count = len(endings) if isinstance(endings, list) else type(endings).__name__
        raise DataError(f"{where}: endings must be a list of exactly {N_ENDINGS} strings, got {count}")
    if prompt == "lm_eval":  # lm-eval's tasks/hellaswag/utils.py: process_docs
        ctx = lm_eval_preprocess(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
        return Example(ctx=ctx, endings=tuple(lm_eval_preprocess(e) for e in endings), label=label)
    return Example(ctx=record["ctx"], endings=tuple(endings), label=label)


def lm_eval_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, and drop the WikiHow bracket artefacts ("[title]", "[step]")."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


# ---------------------------------------------------------------------------------------------------------
# Scoring


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation split as lm-evaluation-harness splits them: trailing whitespace of the
    context moves to the continuation, the whole text is encoded, and the continuation is what follows the
    context's own tokens (for HellaSwag the same as encoding the two apart)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    enc = gpt2_tokenizer()
    context_tokens = enc.encode_ordinary(context)
    return context_tokens, enc.encode_ordinary(context + continuation)[len(context_tokens) :]


def example_requests(example: Example) -> list[tuple[list[int], list[int]]]:
    """The (context, continuation) tokens of an example's 4 endings; the continuation is " " + ending."""
    return [encode_pair(example.ctx, " " + ending) for ending in example.endings]


def choose(scores: list[Score], endings: tuple[str, ...]) -> list[int]:
    """The chosen ending of one example by each normalisation: summed log-likelihood (acc), per token (acc_norm,
    build-nanogpt), per UTF-8 byte of the ending (acc_bytes, lm-eval's; its acc_norm per character)."""
    n_bytes = [len(ending.encode("utf-8")) for ending in endings]
    by = (
        [s.logprob for s in scores],
        [s.logprob / max(s.tokens, 1) for s in scores],
        [s.logprob / max(b, 1) for s, b in zip(scores, n_bytes)],
    )
    return [max(range(len(values)), key=values.__getitem__) for values in by]  # the first of equals, as argmax


def predict(
    model: torch.nn.Module,
    examples: list[Example],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    all_ranks: bool = False,
) -> torch.Tensor:
    """(len(examples), 3) chosen ending per example, by summed, per-token and per-byte log-likelihood; each
    example's context runs once for its 4 endings (gptlab.eval.scoring), batch_size examples per forward pass.
    all_ranks: every rank calls this at once (see score_continuations)."""
    requests = [request for example in examples for request in example_requests(example)]
    scores = score_continuations(
        model, requests, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, all_ranks=all_ranks
    )
    chosen = [
        choose(scores[N_ENDINGS * i : N_ENDINGS * (i + 1)], example.endings) for i, example in enumerate(examples)
    ]
    return torch.tensor(chosen, dtype=torch.long).view(len(examples), len(METRICS))


def evaluate(
    model: torch.nn.Module,
    examples: list[Example],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    limit: int | None = None,
) -> dict:
    """HellaSwag accuracy over the first `limit` examples (all by default): {acc, acc_norm, acc_bytes, n,
    correct, correct_norm, correct_bytes}. batch_size is examples per forward pass.

    Under torch.distributed each rank scores examples[rank::world] and the counts are summed over ranks, so
    every rank returns the single-process result; call it on every rank, with the bare model (not the DDP
    wrapper, whose forward may communicate a different number of times on each rank)."""
    examples = examples[:limit] if limit is not None else examples
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = examples[rank::world]
    was_training = model.training
    model.eval()
    try:
        chosen = predict(
            model, mine, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, all_ranks=world > 1
        )
    finally:
        model.train(was_training)
    labels = torch.tensor([example.label for example in mine], dtype=torch.long)
    counts = torch.tensor([len(mine), *(chosen == labels[:, None]).sum(0).tolist()], dtype=torch.long)
    if world > 1:
        counts = counts.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(counts)
    n, *correct = counts.tolist()
    result = {"n": n}
    for metric, right in zip(METRICS, correct):
        result[metric] = right / max(n, 1)
        result[metric.replace("acc", "correct")] = right
    return result
