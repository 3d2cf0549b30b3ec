"""Throughput and MFU: the FLOPs count, the peak-FLOPs table, the monitor's arithmetic on a fake clock, and the
keys a real CPU run logs and writes to summary.json."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from gptlab.callbacks import throughput
from gptlab.callbacks.throughput import ThroughputMeter
from gptlab.flops import flops_per_token, gpu_label, mfu, peak_flops, precision_kind
from gptlab.model import GPTConfig
from gptlab.train import run
from tests.conftest import compose_train

GPT2_124M = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024)


def test_flops_per_token_gpt2_124m_is_the_palm_closed_form():
    L, H, Q, T, d, V = 12, 12, 64, 1024, 768, 50304
    # per block: 2 LayerNorms, attention (qkv, proj), MLP (fc, proj); weights and biases
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    n = V * d + L * per_layer + 2 * d  # tied token embedding/head, blocks, final LN; no position embedding
    assert n == 123_689_472
    expected = 6 * n + 12 * L * H * Q * T  # 742,136,832 + 113,246,208
    assert flops_per_token(GPT2_124M, seq_len=T) == expected == 855_383_040
    assert flops_per_token(GPT2_124M, seq_len=512) == expected - 12 * L * H * Q * 512  # attention scales with T
    untied = replace(GPT2_124M, tie_embeddings=False)  # a separate head: V*d more parameters
    assert flops_per_token(untied, seq_len=T) == expected + 6 * V * d


def test_flops_per_token_counts_grouped_query_attention_and_gated_mlps():
    """A modern block by hand: RoPE (no position weights), RMSNorm (weight only), no biases, 2 key/value heads for
    8 query heads, SwiGLU with hidden 8/3 d rounded up to 64, untied head. Attention's 12*L*H*Q*T counts the query
    heads: grouped keys and values shrink the projections (in N), not the score and mix matmuls."""
    L, H, KV, Q, T, d, V = 2, 8, 2, 16, 256, 128, 50304
    hidden = 384  # 8/3 * 128 = 341.3, rounded up to a multiple of 64
    modern = GPTConfig(n_layer=L, n_head=H, n_kv_head=KV, n_embd=d, vocab_size=V, block_size=T, position="rope",
                       norm="rmsnorm", bias=False, mlp="swiglu", multiple_of=64, tie_embeddings=False)  # fmt: skip
    attention = d * (H + 2 * KV) * Q + d * d  # fused q, k, v (fewer k, v heads) and the output projection
    mlp = 3 * d * hidden  # gate, up, down
    n = V * d + L * (2 * d + attention + mlp) + d + V * d  # embedding, blocks (2 RMSNorms), final norm, head
    assert flops_per_token(modern, seq_len=T) == 6 * n + 12 * L * H * Q * T
    gpt2_mlp = replace(modern, mlp="gelu")  # 4d ungated: 2 matrices of d x 4d
    assert flops_per_token(gpt2_mlp, seq_len=T) == 6 * (n - L * (mlp - 2 * d * 4 * d)) + 12 * L * H * Q * T


def test_peak_flops_known_and_unknown_devices():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12  # H100 SXM, dense
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756.5e12
    assert peak_flops("NVIDIA H200", "tf32") == 494.7e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == peak_flops("NVIDIA A100 80GB PCIe", "fp16") == 312e12
    assert peak_flops("NVIDIA A100-PCIE-40GB", "fp32") == 19.5e12
    assert peak_flops("NVIDIA L4", "bf16") == 121e12 and peak_flops("NVIDIA L40S", "bf16") == 362.05e12
    assert gpu_label("NVIDIA H100 NVL") == "H100 NVL" and gpu_label("NVIDIA H200 NVL") == "H200 NVL"
    for unknown in ("Foo GPU", "NVIDIA L40", "cpu", "", None):  # L40 is not L4 nor L40S
        assert peak_flops(unknown, "bf16") is None and gpu_label(unknown) is None


def test_precision_kind_picks_the_peak_column():
    assert precision_kind("bf16-mixed", "high") == precision_kind("bf16-true", "high") == "bf16"
    assert precision_kind("16-mixed", "high") == "fp16"
    assert precision_kind("32-true", "high") == precision_kind("32-true", "medium") == "tf32"
    assert precision_kind("32-true", "highest") == "fp32"


def test_mfu_arithmetic():
    fpt = flops_per_token(GPT2_124M, 1024)
    tokens_per_s = 0.5 * 989.4e12 / fpt  # half the H100's bf16 peak: about 578k tokens/s
    assert mfu(tokens_per_s, fpt, 989.4e12) == pytest.approx(0.5)
    assert mfu(tokens_per_s, fpt, 989.4e12, n_devices=2) == pytest.approx(0.25)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def drive(monitor, clock, device, world_size=2, steps=6, grad_accum=2, first_step_s=1.0, step_s=0.1):
    """Run the monitor's hooks as Lightning would, with a validation of 5 s after step 3."""
    logged = []
    module = SimpleNamespace(device=device, step_metrics={})  # the step's line (callbacks/step_log.py)
    trainer = SimpleNamespace(global_step=0, world_size=world_size)
    monitor.on_train_start(trainer, module)
    for step in range(1, steps + 1):
        for micro in range(grad_accum):
            clock.now += (first_step_s if step == 1 else step_s) / grad_accum
            trainer.global_step = step if micro == grad_accum - 1 else step - 1  # counts optimizer steps
            monitor.on_train_batch_end(trainer, module, None, None, None)
        logged += [(step, key, value) for key, value in module.step_metrics.items()]
        module.step_metrics = {}
        if step == 3:
            monitor.on_validation_start(trainer, module)
            clock.now += 5.0
            monitor.on_validation_end(trainer, module)
    return logged


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(throughput, "time", fake)
    return fake


def test_monitor_rates_and_mfu_on_a_known_gpu(clock, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    fpt = flops_per_token(GPT2_124M, 1024)
    monitor = ThroughputMeter(tokens_per_step=8192, log_every_n_steps=2, seq_len=1024, flops_per_token=fpt,
                                precision="bf16")  # fmt: skip
    logged = drive(monitor, clock, torch.device("cuda", 0))
    assert f"PaLM 6N+12LHQT FLOPs/token = {fpt:,}" in capsys.readouterr().out
    assert sorted({step for step, _, _ in logged}) == [2, 4, 6]
    assert all(type(value) is float for _, _, value in logged)  # host numbers: nothing sent to the GPU
    # intervals: steps 1-2 (1.1 s, warm-up), 3-4 and 5-6 (0.2 s each; the validation is not counted)
    first, *rest = monitor.intervals
    assert first["tokens_per_s"] == pytest.approx(2 * 8192 / 1.1)
    for m in rest:
        assert m["tokens_per_s"] == pytest.approx(81920) and m["samples_per_s"] == pytest.approx(80)
        assert m["step_time_ms"] == pytest.approx(100)
        assert m["mfu"] == pytest.approx(81920 * fpt / (2 * 989.4e12))  # two devices' peak
    assert monitor.medians() == pytest.approx(rest[0])  # the warm-up interval left out


def test_monitor_reports_no_mfu_on_cpu(clock, capsys):
    monitor = ThroughputMeter(4096, 1, seq_len=64, flops_per_token=10**6, precision="fp32")
    logged = drive(monitor, clock, torch.device("cpu"), world_size=1, steps=3)
    assert "MFU: not reported on cpu" in capsys.readouterr().out
    assert {key for _, key, _ in logged} == {"tokens_per_s", "samples_per_s", "step_time_ms"}
    assert "mfu" not in monitor.medians() and monitor.medians()["step_time_ms"] == pytest.approx(100)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("throughput") / "run"
    overrides = ["debug=smoke", "logger=none", "max_tokens=2048", "eval.hellaswag.enabled=false"]  # 4 steps
    summary = run(compose_train(overrides, run_dir, data_dir))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [m for m in metrics if "tokens_per_s" in m], json.loads((run_dir / "summary.json").read_text())


def test_cpu_run_logs_throughput_and_writes_medians(cpu_run):
    summary, logged, written = cpu_run
    assert [m["step"] for m in logged] == [1, 2, 3, 4]  # every logging step (log_every_n_steps=1)
    for m in logged:
        assert "mfu" not in m and m["tokens_per_s"] > 0
        assert m["samples_per_s"] == pytest.approx(m["tokens_per_s"] / 64, rel=1e-5)  # seq_len 64
        assert m["step_time_ms"] * m["tokens_per_s"] / 1000 == pytest.approx(512, rel=1e-5)  # tokens per step
    assert "mfu" in written and written["mfu"] is None and written["status"] == "completed"
    assert all(written[k] == summary[k] for k in ("tokens_per_s", "samples_per_s", "step_time_ms"))
    for key in ("tokens_per_s", "samples_per_s", "step_time_ms"):  # medians of steps 2-4: step 1 is warm-up
        assert written[key] == pytest.approx(sorted(m[key] for m in logged[1:])[1], rel=1e-5)
