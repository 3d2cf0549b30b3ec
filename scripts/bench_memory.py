"""Memory of one training step with and without activation checkpointing:
`python scripts/bench_memory.py [--model gpt2_124m] [--batch-size 1] [--seq-len 1024] [--device auto] [n_layer=6 ...]`.

The model is conf/model/<model>.yaml (random weights), with `key=value` overrides. For each mode it prints:
- saved for backward: bytes autograd keeps between forward and backward (distinct storages, weights excluded,
  counted with torch.autograd.graph.saved_tensors_hooks): exact and the same on every device;
- peak: the most memory allocated at once during forward + backward, above what was allocated before (the
  weights): torch.cuda.max_memory_allocated on CUDA; on CPU the running sum of the allocations and frees the
  PyTorch profiler records (profile_memory=True); gradients and the logits count in both modes;
- step time: forward + backward, median of --repeats (checkpointing reruns each block's forward).
"""

import argparse
import contextlib
import dataclasses
import gc
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from gptlab.model import GPT, GPTConfig
from gptlab.errors import exit_on_user_error
from gptlab.schema import load

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def model_config(name: str, overrides: list[str]) -> GPTConfig:
    """conf/model/<name>.yaml on top of GPTConfig's defaults, then the overrides, checked by the model's rules."""
    option = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml") or {}
    return load(GPTConfig, OmegaConf.merge(option, OmegaConf.from_dotlist(overrides)), "model")


def autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


def saved_bytes(model: GPT, x: torch.Tensor, amp) -> int:
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(x, x)  # the graph and what it saved are freed on return
    return sum(saved.values())


def step(model: GPT, x: torch.Tensor, amp) -> None:
    with amp:
        _, loss = model(x, x)
    loss.backward()
    model.zero_grad(set_to_none=True)


def peak_bytes(model: GPT, x: torch.Tensor, amp) -> int:
    gc.collect()
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, x, amp)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, x, amp)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    allocated = peak = 0
    for event in events:  # nbytes: + for an allocation, - for a free
        allocated += event.nbytes()
        peak = max(peak, allocated)
    return peak


def step_seconds(model: GPT, x: torch.Tensor, amp, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        step(model, x, amp)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(config: GPTConfig, batch_size: int, seq_len: int, device: str, precision: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    x = torch.randint(0, min(config.vocab_size, 50257), (batch_size, seq_len), device=device)
    amp = autocast(device, precision)
    step(model, x, amp)  # warm-up: kernels, allocator
    result = {
        "saved": saved_bytes(model, x, amp),
        "peak": peak_bytes(model, x, amp),
        "seconds": step_seconds(model, x, amp, repeats),
    }
    del model, x
    gc.collect()
    return result


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2_tiny", help="a conf/model option")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the model's block_size")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode")
    parser.add_argument("overrides", nargs="*", help="model options, e.g. n_layer=6 attention=manual")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    config = model_config(args.model, args.overrides)
    seq_len = args.seq_len or config.block_size
    rows = {}
    for checkpointing in (False, True):
        mode = dataclasses.replace(config, activation_checkpointing=checkpointing, compile=False)
        rows[checkpointing] = measure(mode, args.batch_size, seq_len, device, args.precision, args.repeats)
    with torch.device("meta"):
        params = GPT(config).num_params()
    hardware = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(
        f"{args.model} ({params / 1e6:.1f}M parameters, {config.n_layer} layers, d={config.n_embd}), "
        f"batch {args.batch_size} x {seq_len}, {args.precision}, {device} ({hardware})"
    )
    print(f"{'activation checkpointing':<26}{'saved for backward':>20}{'peak (fwd + bwd)':>18}{'step time':>11}")
    for checkpointing, r in rows.items():
        name = "on (per block)" if checkpointing else "off"
        print(f"{name:<26}{r['saved'] / MB:>17.1f} MB{r['peak'] / MB:>15.1f} MB{r['seconds']:>10.2f}s")
    off, on = rows[False], rows[True]
    print(
        f"checkpointing saves {1 - on['saved'] / off['saved']:.0%} of the saved activations and "
        f"{1 - on['peak'] / off['peak']:.0%} of the peak, for {on['seconds'] / off['seconds'] - 1:+.0%} step time"
    )


if __name__ == "__main__":
    main()
