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

LENGTH_MULTIPLE = 32  # row lengths are rounded up to this: few distinct shapes for torch.compile
SCORED_MULTIPLE = 64  # positions whose logits a batch needs, likewise
PADDING = -1  # the segment of padding tokens
CPU_CHUNK = 128  # rows of logits normalized at once on a CPU (a buffer of 128 x vocab floats, 26 MB for GPT-2)


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
    """Rows as right-padded (n_rows, T) tensors (the extra rows all padding; T bucketed), and what to score:
    `logits_at`, the positions (into the flattened batch) whose logits are needed, each once, padded to a bucket;
    `scored`, `targets` and `owners`, per scored token: its row of the logits, its token, its request.
    `mask` is True where a query may attend: causal, within the context or its own continuation. Padding attends
    to the context and to padding, so no softmax row is empty; nothing real attends to padding."""
    T = -(-max(len(r.tokens) for r in rows) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    tokens = torch.zeros(n_rows, T, dtype=torch.long)
    positions = torch.zeros(n_rows, T, dtype=torch.long)
    seg = torch.full((n_rows, T), PADDING, dtype=torch.long)
    logits_at, scored, targets, owners = [], [], [], []
    for i, row in enumerate(rows):
        for name, tensor in (("tokens", tokens), ("positions", positions), ("segments", seg)):
            tensor[i, : len(row.tokens)] = torch.tensor(getattr(row, name))
        needed = sorted(set(row.at))  # a context's last position predicts the first token of each continuation
        index = {position: len(logits_at) + k for k, position in enumerate(needed)}
        logits_at += [i * T + position for position in needed]
        scored += [index[position] for position in row.at]
        targets += row.targets
        owners += row.owners
    n = -(-max(len(logits_at), 1) // SCORED_MULTIPLE) * SCORED_MULTIPLE
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return dict(
        tokens=tokens,
        positions=positions,
        mask=(causal & ((seg.unsqueeze(1) == 0) | (seg.unsqueeze(1) == seg.unsqueeze(2)))).unsqueeze(1),
        logits_at=torch.tensor(logits_at + [0] * (n - len(logits_at)), dtype=torch.long),
        scored=torch.tensor(scored, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        owners=torch.tensor(owners, dtype=torch.long),
    )


def logsumexp_and_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (N, vocab) logits: log-sum-exp and argmax. On a CPU in chunks of rows through one buffer, which
    runs 2x faster than torch.logsumexp: its vocab-wide temporaries cost more in page faults than in arithmetic."""
    best, argmax = logits.max(dim=-1)
    chunk = len(logits) if logits.is_cuda else CPU_CHUNK
    buffer = torch.empty(min(chunk, len(logits)), logits.size(-1), device=logits.device)
    sums = torch.empty_like(best)
    for start in range(0, len(logits), chunk):
        rows = slice(start, start + chunk)
        shifted = torch.sub(logits[rows], best[rows, None], out=buffer[: len(best[rows])])
        sums[rows] = shifted.exp_().sum(dim=-1)
    return best + sums.log(), argmax


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
                batch["tokens"], logits_at=batch["logits_at"], position_ids=batch["positions"], attn_mask=batch["mask"]
            )
        if not rows_in_batch:
            continue
        logits = logits.float()
        log_normalizer, best = logsumexp_and_argmax(logits)  # once per position, however many targets it has
        row, targets = batch["scored"], batch["targets"]
        token_logprobs = logits[row, targets] - log_normalizer[row]  # log p(target) = logit - logsumexp
        missed = best[row] != targets
        owners, token_logprobs, missed = (t.cpu() for t in (batch["owners"], token_logprobs, missed))
        logprobs.index_add_(0, owners, token_logprobs.double())
        misses.index_add_(0, owners, missed.long())
    return [
        Score(logprob=float(lp), tokens=len(window[1]), greedy=int(miss) == 0)
        for lp, miss, window in zip(logprobs, misses, windows)
    ]
