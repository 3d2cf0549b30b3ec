"""Model FLOPs per token and the peak FLOP/s of common GPUs: the two halves of MFU (model FLOPs utilization).

MFU = achieved model FLOP/s / peak FLOP/s, with the PaLM paper's count (Chowdhery et al., 2022, appendix B):
6N + 12*L*H*Q*T FLOPs per token for forward and backward, N the parameters without the position embedding (as
nanoGPT's estimate_mfu counts them), L layers, H heads, Q head dim, T sequence length. Activation checkpointing's
recomputation is not counted: that would be hardware FLOPs utilization (HFU), not MFU.
N is counted on the model itself, so grouped-query attention (smaller k and v projections), gated MLPs (three
matrices) and RoPE (no position weights) count exactly; the attention term counts the query heads, which set
the size of the score and mixing matmuls whatever the number of key/value heads. Document masking skips part of
those matmuls; MFU still counts the full causal T, as PaLM's formula does.
"""

import re
from dataclasses import replace

import torch

from gptlab.model import GPT, GPTConfig


def _peaks(bf16: float, tf32: float, fp32: float) -> dict[str, float]:
    """Dense peak FLOP/s from TFLOPS (no 2:4 sparsity: datasheets quote sparse figures with a '*', halved here).
    fp16 equals bf16 on all these GPUs; tf32 is float32 matmuls on tensor cores (matmul precision "high"), fp32
    the plain CUDA cores."""
    return {"bf16": bf16 * 1e12, "fp16": bf16 * 1e12, "tf32": tf32 * 1e12, "fp32": fp32 * 1e12}


_H100_SXM = _peaks(989.4, 494.7, 66.9)  # NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5
_NVL = _peaks(835.5, 417.5, 60)  # H100 / H200 datasheets, NVL: 1671 bf16, 835 tf32 with sparsity; fp32 60
# (pattern searched in the lower-cased torch.cuda.get_device_name(), label, peaks): the first match wins.
PEAK_FLOPS: list[tuple[str, str, dict[str, float]]] = [
    (r"h200 nvl", "H200 NVL", _NVL),
    (r"h200", "H200 SXM", _H100_SXM),  # H200 datasheet: the H100 SXM's compute (1979 bf16 sparse, 67 fp32)
    (r"h100 nvl", "H100 NVL", _NVL),
    (r"h100.*pcie", "H100 PCIe", _peaks(756.5, 378, 51.2)),  # H100 whitepaper, H100 PCIe
    (r"h100", "H100 SXM", _H100_SXM),  # "NVIDIA H100 80GB HBM3"
    (r"a100", "A100", _peaks(312, 156, 19.5)),  # A100 datasheet: SXM4 and PCIe, 40 and 80 GB alike
    (r"\bl40s\b", "L40S", _peaks(362.05, 183, 91.6)),  # L40S datasheet (733 bf16, 366 tf32 with sparsity)
    (r"\bl4\b", "L4", _peaks(121, 60, 30.3)),  # L4 datasheet (242 bf16, 120 tf32 with sparsity)
]


def non_embedding_params(model_cfg: GPTConfig) -> int:
    """N: the model's parameters without the position embedding, counted on a model built on the meta device
    (no memory, no init cost), so every architecture option (bias, norm, tied head) counts exactly."""
    with torch.device("meta"):
        model = GPT(replace(model_cfg, compile=False))
    return model.num_params(non_embedding=True)


def flops_per_token(model_cfg: GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), PaLM's 6N + 12*L*H*Q*T."""
    head_dim = model_cfg.n_embd // model_cfg.n_head
    attention = 12 * model_cfg.n_layer * model_cfg.n_head * head_dim * seq_len
    return 6 * non_embedding_params(model_cfg) + attention


def precision_kind(trainer_precision: str, matmul_precision: str) -> str:
    """The peak table's column for a Lightning precision flag: bf16, fp16, tf32 or fp32."""
    if trainer_precision.startswith("bf16"):
        return "bf16"
    if trainer_precision.startswith("16"):
        return "fp16"
    return "fp32" if matmul_precision == "highest" else "tf32"  # "high"/"medium" put float32 matmuls on TF32


def _lookup(device_name: str | None) -> tuple[str, dict[str, float]] | None:
    name = (device_name or "").lower()
    return next(((label, peaks) for pattern, label, peaks in PEAK_FLOPS if re.search(pattern, name)), None)


def gpu_label(device_name: str | None) -> str | None:
    """The table's name for a CUDA device name; None for CPUs and GPUs not in the table."""
    found = _lookup(device_name)
    return found and found[0]


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """Dense peak FLOP/s of one device at a precision (bf16 | fp16 | tf32 | fp32); None when unknown."""
    found = _lookup(device_name)
    return found and found[1].get(precision)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the peak of all devices together."""
    return tokens_per_s * flops_per_token / (peak * n_devices)
