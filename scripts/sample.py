"""Print samples from a GPT: `python scripts/sample.py checkpoint=<path> prompt="Hello" [key=value ...]`.

checkpoint is a gptlab .ckpt file, a Hugging Face GPT-2 folder or a hub name such as `gpt2` (online);
see conf/sample.yaml for the sampling options.
"""

import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gptlab.checkpoint import load_model
from gptlab.config import ConfigError
from gptlab.data.tokenizer import EOT, gpt2_tokenizer
from gptlab.errors import exit_on_user_error
from gptlab.sample import compile_for_sampling, generate

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))
SEPARATOR = "-" * 40


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    sample(cfg)


def sample(cfg: DictConfig) -> None:
    check(cfg)
    device = pick_device(cfg.device)
    model = load_model(cfg.checkpoint, map_location=device)
    if cfg.compile:
        model = compile_for_sampling(model)
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode(cfg.prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    out = generate(
        model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, generator, vocab_size=tokenizer.n_vocab
    )
    for row in out.tolist():
        completion = row[len(prompt):]
        if cfg.stop_at_eot and EOT in completion:
            completion = completion[: completion.index(EOT)]
        print(cfg.prompt + tokenizer.decode(completion))
        print(SEPARATOR)


def check(cfg: DictConfig) -> None:
    """Config mistakes, caught before the model is loaded."""
    rules = [
        ("checkpoint", cfg.checkpoint is not None, "is required: a .ckpt file, an HF GPT-2 folder or a hub name"),
        ("max_new_tokens", isinstance(cfg.max_new_tokens, int) and cfg.max_new_tokens >= 0, "must be an integer >= 0"),
        ("temperature", isinstance(cfg.temperature, (int, float)) and cfg.temperature >= 0, "must be a number >= 0"),
        ("top_k", cfg.top_k is None or (isinstance(cfg.top_k, int) and cfg.top_k >= 1), "must be null or >= 1"),
        ("num_samples", isinstance(cfg.num_samples, int) and cfg.num_samples >= 1, "must be an integer >= 1"),
        ("seed", isinstance(cfg.seed, int) and cfg.seed >= 0, "must be an integer >= 0"),
    ]
    for key, ok, message in rules:
        if not ok:
            raise ConfigError(key, f"{message} (got {cfg[key]!r})")


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


if __name__ == "__main__":
    main()
