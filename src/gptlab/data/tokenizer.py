"""GPT-2 BPE through tiktoken, built from the rank file shipped with gptlab: no network needed.

The ranks are tiktoken's `r50k_base` file (identical to `gpt2`), verified by its sha256 before use.
"""

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

from gptlab.errors import DataError

RANKS_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256  # <|endoftext|>: precedes every document in the shards
# GPT-2's pre-tokenization regex (tiktoken's r50k / gpt2 pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerFileError(DataError):
    pass


def load_ranks(path: Path = RANKS_FILE, sha256: str = RANKS_SHA256) -> dict[bytes, int]:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise TokenizerFileError(f"{path} has sha256 {digest}, expected {sha256}: the file is damaged")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding: same ids as tiktoken.get_encoding("gpt2"), built offline."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_ranks(),
        special_tokens={"<|endoftext|>": EOT},
    )


@functools.cache
def token_byte_lengths(vocab_size: int) -> tuple[int, ...]:
    """UTF-8 bytes of each id's text, for bits per byte; 0 for <|endoftext|> and for the ids beyond the
    tokenizer's (a padded vocabulary), which are no text."""
    enc = gpt2_tokenizer()
    lengths = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    lengths[EOT] = 0
    return tuple(lengths[:vocab_size]) + (0,) * max(vocab_size - enc.n_vocab, 0)
