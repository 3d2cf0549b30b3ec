"""The private names of torch and Lightning that gptlab relies on, all of them, each checked against the versions
named beside it. Nothing else in gptlab uses an underscore name of torch, Lightning or Hydra
(tests/test_internals.py greps for them, and fails loudly here when one of these names disappears).
"""

import torch

# Each checked against torch 2.13.0 and lightning 2.6.6 (requirements.txt's pins).

# torch.compile's wrapper (OptimizedModule) keeps the compiled module as `_orig_mod`, so its state_dict keys
# carry this prefix; gptlab compiles in place (nn.Module.compile), but checkpoints of older gptlab versions
# hold such keys.
COMPILED_PREFIX = "_orig_mod."


def unscales_in_step(optimizer: torch.optim.Optimizer) -> bool:
    """Does this optimizer unscale fp16 gradients inside its own step() (torch's fused Adam, AdamW, SGD)?

    Lightning's fp16 plugin then leaves the gradients scaled before on_before_optimizer_step (it asks the
    same attribute, lightning.fabric.plugins.precision.amp._optimizer_handles_unscaling)."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


def loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """GradScaler's current scale as a tensor on its device: GradScaler.get_scale() returns a float, a host sync
    of its own; this one joins the step's single sync."""
    return scaler._get_scale_async()
