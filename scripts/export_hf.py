"""Export a gptlab checkpoint as a Hugging Face GPT-2 or Llama folder, whichever the model's architecture maps to:
`python scripts/export_hf.py checkpoint=outputs/runs/<run>/checkpoints/last.ckpt out=exports/my-gpt`.

The folder holds config.json + model.safetensors + generation_config.json and GPT-2's tokenizer (tokenizer.json +
tokenizer_config.json, built offline: tiktoken's ids), so `AutoModelForCausalLM.from_pretrained(out)` (a
`GPT2LMHeadModel` or `LlamaForCausalLM`) and `AutoTokenizer.from_pretrained(out)` load it with no network, e.g.
for lm-evaluation-harness. The model's padded vocabulary is kept, so its log-probabilities equal gptlab's
(`vocab_size=50257` drops the padded rows; they then rise by log(1 + the padded ids' probability)).
See conf/export_hf.yaml."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gptlab.errors import exit_on_config_error, exit_on_user_error
from gptlab.hf import ExportHFConfig, check_out, export_hf_replacing, export_target
from gptlab.pretrained import load_gpt
from gptlab.schema import load

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("GPTLAB_ROOT", str(ROOT))


@exit_on_config_error
@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="export_hf")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    export(load(ExportHFConfig, cfg))


def export(cfg: ExportHFConfig) -> None:
    check_out(Path(cfg.out), cfg.overwrite)  # before the model loads
    model = load_gpt(cfg.checkpoint)
    folder = export_hf_replacing(model, Path(cfg.out), vocab_size=cfg.vocab_size)
    target = export_target(model.config)
    print(f"Exported {cfg.checkpoint} ({model.num_params():,} parameters) to {folder} as a Hugging Face {target}")


if __name__ == "__main__":
    main()
