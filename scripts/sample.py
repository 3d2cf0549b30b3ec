"""Print samples from a GPT: `python scripts/sample.py checkpoint=<path> prompt="Hello" [key=value ...]`.

checkpoint is a gptlab .ckpt file, a Hugging Face GPT-2 folder or a hub name such as `gpt2` (online);
see conf/sample.yaml for the sampling options.
"""

import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gptlab.data.tokenizer import EOT, gpt2_tokenizer
from gptlab.errors import exit_on_config_error, exit_on_user_error
from gptlab.generate import SampleConfig, compile_for_sampling, generate
from gptlab.pretrained import load_model, resolve_device
from gptlab.schema import load

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))
SEPARATOR = "-" * 40


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    sample(load(SampleConfig, cfg))  # config mistakes end here, before the model is loaded


def sample(cfg: SampleConfig) -> None:
    device = resolve_device(cfg.device)
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


if __name__ == "__main__":
    main()
