"""gptlab: GPT-2-style pretraining with PyTorch Lightning, configured by Hydra."""

import secrets

from omegaconf import OmegaConf

from gptlab import launch

# `${gptlab.uid:}` in conf/hydra: a random suffix that keeps run folders started in the same second apart.
# Cached, so that every job of a sweep sees the same value (Hydra copies the cache into each job's config).
OmegaConf.register_new_resolver("gptlab.uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)
# `${gptlab.path:a,b}`: the non-empty parts joined by "/" (a sweep job with no overrides but its seed: `seed=0`).
OmegaConf.register_new_resolver("gptlab.path", lambda *parts: "/".join(str(p) for p in parts if p), replace=True)

# Under torchrun or srun every rank runs Hydra itself: these keep them in rank 0's run folder (gptlab.launch).
# `${gptlab.run_name:<output_root>}`: `<date>_<time>_<random>`, drawn by rank 0, cached like gptlab.uid.
OmegaConf.register_new_resolver("gptlab.run_name", launch.shared_run_name, use_cache=True, replace=True)
# `${gptlab.rank_zero:x}`: x on rank 0, null elsewhere; `${gptlab.rank_suffix:}`: "" on rank 0, "_rank<r>" elsewhere.
OmegaConf.register_new_resolver("gptlab.rank_zero", launch.rank_zero_only_value, replace=True)
OmegaConf.register_new_resolver("gptlab.rank_suffix", launch.rank_suffix, replace=True)

# The config schemas Hydra composes conf/ on top of (ConfigStore's `train_schema`, `<option>_schema`).
from gptlab import config  # noqa: E402, F401
