"""The offline GPT-2 tokenizer gives tiktoken's own ids."""


import pytest

from gptlab.data import tokenizer
from tests.conftest import SHARED

TEXTS = [
    "Hello world!",
    "  leading spaces, trailing   \n\n\ttabs\r\nand CRLF  ",
    "It's we'll they've I'd don't",
    "naïve café — 日本語テキスト, emoji 🤖🚀, Ελληνικά, русский",
    "numbers 1234567890 3.14159 1e-8 0x1F",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
]


def test_same_ids_as_tiktoken_gpt2(tiktoken_gpt2, sample_docs):
    reference = tiktoken_gpt2
    ours = tokenizer.gpt2_tokenizer()
    texts = TEXTS + [text for _, text in sample_docs[::10]]
    for text in texts:
        assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
    assert ours.encode("a<|endoftext|>b", allowed_special="all") == reference.encode("a<|endoftext|>b", allowed_special="all")
    assert ours.n_vocab == reference.n_vocab == 50257
    assert ours.eot_token == tokenizer.EOT == 50256


def test_shipped_rank_file_matches_the_shared_one():
    assert tokenizer.RANKS_FILE.read_bytes() == (SHARED / "tokenizers" / "gpt2.tiktoken").read_bytes()


def test_damaged_rank_file_is_refused(tmp_path):
    damaged = tmp_path / "gpt2.tiktoken"
    damaged.write_bytes(tokenizer.RANKS_FILE.read_bytes()[:-10])
    with pytest.raises(tokenizer.TokenizerFileError, match="damaged"):
        tokenizer.load_ranks(damaged)
