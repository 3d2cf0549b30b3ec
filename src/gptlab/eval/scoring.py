"""Log-likelihoods of continuations given a context, with a context shared by several continuations run once.

Multiple-choice benchmarks (HellaSwag's 4 endings, lm-evaluation-harness's `loglikelihood` requests) ask: how
likely is continuation c after context x (summed over c's tokens), and is c what greedy decoding would produce?
Scored one row per (context, continuation), each context runs once per continuation. Here the continuations of
one context share a row:

    tokens     x0 x1 x2 | a0 a1 | b0 | c0 c1
    positions   0  1  2 |  3  4 |  3 |  3  4
    attends to  causal  | x, a  | x,b| x, c      (each continuation sees the context and itself)

a's tokens are predicted at x2 (a0), a0 (a1) and a1 (a2); a continuation's last token is never an input, so it is
left out of the row. Logits are computed at the scored positions only. Each continuation gets the
log-probabilities it gets in a row of its own, up to float rounding.

Truncation follows lm-evaluation-harness: context + continuation keeps its last block_size + 1 tokens (the last
is only a target), so a long context loses its start; continuations whose kept contexts differ get separate rows.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn import functional as F

LENGTH_MULTIPLE = 32  # row lengths are rounded up to this: few distinct shapes for torch.compile
SCORED_MULTIPLE = 16  # scored positions per row likewise
PADDING = -1  # the segment of padding tokens


@dataclass(frozen=True)
class Score:
    logprob: float  # natural log, summed over the scored tokens
    tokens: int  # how many continuation tokens were scored
    greedy: bool  # every scored token is the model's most likely next token


@dataclass
class Row:
    """One forward-pass row: a context, then continuations without their last token."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the context; k: the k-th continuation of this row
    at: list[int] = field(default_factory=list)  # the row index predicting each scored token
    targets: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # the request each scored token belongs to

    def add(self, request: int, continuation: tuple[int, ...]) -> None:
        start, segment, context = len(self.tokens), max(self.segments) + 1, self.context_length
        self.tokens += continuation[:-1]
        self.positions += range(context, context + len(continuation) - 1)
        self.segments += [segment] * (len(continuation) - 1)
        self.at += [context - 1, *range(start, start + len(continuation) - 1)]
        self.targets += continuation
        self.owners += [request] * len(continuation)

    @property
    def context_length(self) -> int:
        return self.segments.count(0)


def fit_window(context: list[int], continuation: list[int], block_size: int) -> tuple[tuple, tuple]:
    """(context, continuation) as scored in a window of block_size: lm-evaluation-harness's left truncation."""
    if not context:
        raise ValueError("a continuation needs a context of at least one token (lm-eval passes <|endoftext|>)")
    whole = (list(context) + list(continuation))[-(block_size + 1) :]
    n = min(len(continuation), len(whole) - 1)
    return tuple(whole[: len(whole) - n]), tuple(whole[len(whole) - n :])


def pack_rows(windows: list[tuple[tuple, tuple]], max_length: int) -> list[Row]:
    """One row per distinct context, holding its continuations; a new row (with the context again) whenever
    the next continuation would take the row past max_length tokens. Empty continuations get no row."""
    by_context: dict[tuple, list[int]] = {}
    for i, (context, continuation) in enumerate(windows):
        if continuation:
            by_context.setdefault(context, []).append(i)
    rows = []
    for context, requests in by_context.items():
        row = None
        for i in requests:
            continuation = windows[i][1]
            if row is None or len(row.tokens) + len(continuation) - 1 > max_length:
                row = Row(list(context), list(range(len(context))), [0] * len(context))
                rows.append(row)
            row.add(i, continuation)
    return rows


def make_batch(rows: list[Row], n_rows: int) -> dict[str, torch.Tensor]:
    """Rows as right-padded tensors of n_rows rows (the extra ones all padding), lengths bucketed; `mask` is
    True where a query may attend: causal, within the context or its own continuation. Padding attends to the
    context and to padding, so no softmax row is empty; nothing real attends to padding."""
    T = -(-max(len(r.tokens) for r in rows) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    K = -(-max(len(r.at) for r in rows) // SCORED_MULTIPLE) * SCORED_MULTIPLE
    batch = dict(
        tokens=torch.zeros(n_rows, T, dtype=torch.long),
        positions=torch.zeros(n_rows, T, dtype=torch.long),
        segments=torch.full((n_rows, T), PADDING, dtype=torch.long),
        at=torch.zeros(n_rows, K, dtype=torch.long),
        targets=torch.zeros(n_rows, K, dtype=torch.long),
        owners=torch.full((n_rows, K), -1, dtype=torch.long),
    )
    for i, row in enumerate(rows):
        for name in ("tokens", "positions", "segments", "at", "targets", "owners"):
            values = getattr(row, name)
            batch[name][i, : len(values)] = torch.tensor(values)
    seg = batch.pop("segments")
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    batch["mask"] = (causal & ((seg.unsqueeze(1) == 0) | (seg.unsqueeze(1) == seg.unsqueeze(2)))).unsqueeze(1)
    return batch


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module,
    requests: list[tuple[list[int], list[int]]],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    all_ranks: bool = False,
) -> list[Score]:
    """A Score per (context tokens, continuation tokens) request, in order. The caller sets eval mode.

    batch_size: rows per forward pass (a row holds the continuations of one context); short batches are
    padded with empty rows, so a compiled model sees few shapes.
    all_ranks: every rank of torch.distributed calls this together; all run as many forward passes as the
    busiest (an FSDP model gathers its weights in each)."""
    block_size = model.config.block_size
    device = torch.device(device)
    windows = [fit_window(context, continuation, block_size) for context, continuation in requests]
    rows = sorted(pack_rows(windows, 2 * block_size), key=lambda r: len(r.tokens))
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    n_batches = torch.tensor(len(batches))
    if all_ranks and dist.is_initialized():
        n_batches = n_batches.to(device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(n_batches, op=dist.ReduceOp.MAX)
    batches += [[]] * (int(n_batches) - len(batches))  # forward passes with nothing to score
    logprobs = torch.zeros(len(requests), dtype=torch.float64)
    misses = torch.zeros(len(requests), dtype=torch.long)  # tokens that are not the argmax
    for rows_in_batch in batches:
        batch = make_batch(rows_in_batch or [Row([0], [0], [0])], batch_size)
        batch = {name: t.to(device) for name, t in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(
                batch["tokens"], logits_at=batch["at"], position_ids=batch["positions"], attn_mask=batch["mask"]
            )
        if not rows_in_batch:
            continue
        targets = batch["targets"]
        token_logprobs = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        missed = logits.argmax(-1).flatten() != targets.flatten()
        owners = batch["owners"].flatten()
        scored = owners >= 0
        owners, token_logprobs, missed = (t[scored].cpu() for t in (owners, token_logprobs, missed))
        logprobs.index_add_(0, owners, token_logprobs.double())
        misses.index_add_(0, owners, missed.long())
    return [
        Score(logprob=float(lp), tokens=len(window[1]), greedy=int(miss) == 0)
        for lp, miss, window in zip(logprobs, misses, windows)
    ]
