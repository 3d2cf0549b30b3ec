"""gptlab: GPT-2-style pretraining with PyTorch Lightning, configured by Hydra."""

# The config schemas Hydra composes conf/ on top of (ConfigStore's `train_schema`, `<option>_schema`).
from gptlab import config  # noqa: F401
