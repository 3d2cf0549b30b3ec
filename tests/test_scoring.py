"""Shared-context scoring (gptlab.eval.scoring) against one plain forward pass per (context, continuation)."""

import random

import pytest
import torch
from torch.nn import functional as F

from gptlab.eval.scoring import Score, fit_window, pack_rows, score_continuations
from gptlab.model import GPT, GPTConfig

ARCHITECTURES = {
    "gpt2": {},
    "modern": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, qk_norm="rmsnorm"),
    "document_mask": dict(position="rope", document_mask=True, document_positions=True),
    "manual_attention": dict(attention="manual"),
}


def tiny_gpt(block_size: int = 64, **architecture) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=block_size, n_layer=2, n_head=4, n_embd=32, **architecture)
    return GPT(config).eval()


def random_requests(n_contexts: int, seed: int = 0, max_context: int = 70) -> list[tuple[list[int], list[int]]]:
    """Contexts with 1-5 continuations each (some empty, some longer than what fits beside the context)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(n_contexts):
        context = [rng.randrange(50257) for _ in range(rng.randint(1, max_context))]
        for _ in range(rng.randint(1, 5)):
            requests.append((context, [rng.randrange(50257) for _ in range(rng.randint(0, 20))]))
    return requests


@torch.no_grad()
def one_row_each(model: GPT, requests) -> list[Score]:
    """The reference: each request in a row of its own, truncated as lm-eval's HFLM truncates it."""
    block_size = model.config.block_size
    scores = []
    for context, continuation in requests:
        whole = (context + continuation)[-(block_size + 1) :]
        n = min(len(continuation), len(whole) - 1)
        if n == 0:
            scores.append(Score(0.0, 0, True))
            continue
        logits, _ = model(torch.tensor([whole[:-1]]))
        logits, targets = logits[0, len(whole) - 1 - n :].float(), torch.tensor(whole[len(whole) - n :], dtype=torch.long)
        logprob = F.log_softmax(logits, dim=-1)[torch.arange(n), targets].sum().item()
        scores.append(Score(logprob, n, bool((logits.argmax(-1) == targets).all())))
    return scores


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("batch_size", [1, 7])
def test_shared_context_scores_equal_one_row_each(architecture, batch_size):
    model, requests = tiny_gpt(**ARCHITECTURES[architecture]), random_requests(20)
    scores, expected = score_continuations(model, requests, batch_size=batch_size), one_row_each(model, requests)
    assert [(s.tokens, s.greedy) for s in scores] == [(s.tokens, s.greedy) for s in expected]
    assert max(abs(s.logprob - e.logprob) for s, e in zip(scores, expected)) < 1e-4


def test_greedy_is_true_for_the_models_own_continuation():
    model = tiny_gpt()
    context = [464, 3290, 318]
    continuation = []
    with torch.no_grad():
        for _ in range(5):  # greedy decoding
            continuation.append(int(model(torch.tensor([context + continuation]))[0][0, -1].argmax()))
    changed = continuation[:3] + [(continuation[3] + 1) % 50257]
    greedy, other = score_continuations(model, [(context, continuation), (context, changed)])
    assert greedy.greedy and greedy.tokens == 5 and not other.greedy


def test_continuations_of_one_context_share_a_row_until_it_is_full():
    windows = [((1, 2, 3), (4, 5, 6)), ((1, 2, 3), (7,)), ((9,), (4, 5)), ((1, 2, 3), (8, 8, 8, 8)), ((1, 2), ())]
    first, second, third = pack_rows(windows, max_length=7)
    assert first.tokens == [1, 2, 3, 4, 5] and first.positions == [0, 1, 2, 3, 4]  # (7,) needs no input token
    assert first.segments == [0, 0, 0, 1, 1] and first.owners == [0, 0, 0, 1]
    assert first.at == [2, 3, 4, 2] and first.targets == [4, 5, 6, 7]
    assert second.tokens == [1, 2, 3, 8, 8, 8] and second.positions == [0, 1, 2, 3, 4, 5]  # 5 + 3 > 7: a new row
    assert third.tokens == [9, 4] and third.at == [0, 1]  # another context; the empty continuation has no row


def test_truncation_keeps_the_last_block_size_plus_one_tokens():
    assert fit_window([1, 2, 3], [4, 5], block_size=4) == ((1, 2, 3), (4, 5))  # 4 inputs, the last token a target
    assert fit_window([1, 2, 3, 4, 5], [6, 7], block_size=4) == ((3, 4, 5), (6, 7))
    assert fit_window([1, 2, 3], [4, 5, 6, 7, 8, 9], block_size=4) == ((5,), (6, 7, 8, 9))  # only what has a context
    with pytest.raises(ValueError, match="context of at least one token"):
        fit_window([], [4, 5], block_size=4)


def test_empty_continuation_scores_zero_and_nothing_runs():
    calls = []
    model = tiny_gpt()
    model.register_forward_hook(lambda *args: calls.append(1))
    assert score_continuations(model, [([1, 2], [])]) == [Score(0.0, 0, True)]
    assert calls == []
