"""gptlab: GPT-2-style pretraining with PyTorch Lightning, configured by Hydra."""

import secrets

from omegaconf import OmegaConf

# `${gptlab.uid:}` in conf/hydra: a random suffix that keeps run folders started in the same second apart.
# Cached, so that every job of a sweep sees the same value (Hydra copies the cache into each job's config).
OmegaConf.register_new_resolver("gptlab.uid", lambda: secrets.token_hex(3), use_cache=True, replace=True)
# `${gptlab.path:a,b}`: the non-empty parts joined by "/" (a sweep job with no overrides but its seed: `seed=0`).
OmegaConf.register_new_resolver("gptlab.path", lambda *parts: "/".join(str(p) for p in parts if p), replace=True)
