"""The `callbacks` group: checkpoints, the training-dynamics monitor and the profiler (their code is beside this
file; it loads Lightning, which a config check must not wait for)."""

from dataclasses import dataclass, field

from gptlab.schema import at_least, knob, non_negative, one_of, positive, require

# Columns torch.profiler's key_averages().table(sort_by=...) sorts by.
PROFILER_SORT_KEYS = (
    "self_cpu_time_total", "cpu_time_total", "self_cuda_time_total", "cuda_time_total",
    "self_cpu_memory_usage", "cpu_memory_usage", "self_cuda_memory_usage", "cuda_memory_usage", "count",
)  # fmt: skip


@dataclass
class CheckpointConfig:
    """<run>/checkpoints/, each file written atomically (a kill mid-save keeps the previous one)."""

    every_n_steps: int = knob(500, at_least(1))  # step_XXXXXX.ckpt and last.ckpt every N steps, last.ckpt at the end
    save_top_k: int = knob(3, at_least(-1))  # periodic checkpoints kept, newest first (-1: all); last.ckpt stays


@dataclass
class ProfilerConfig:
    """torch.profiler over a few optimizer steps (callbacks/profiler.py): <run>/profile/trace_rank0.json
    (ui.perfetto.dev) and a table of the top ops, printed and in profile/top_ops.txt."""

    enabled: bool = False  # debug=profile turns it on
    wait: int = knob(1, non_negative)  # optimizer steps skipped first (torch.profiler.schedule's names)
    warmup: int = knob(1, non_negative)  # steps traced, then discarded (the profiler's own start-up)
    active: int = knob(2, at_least(1))  # steps recorded into the trace
    record_shapes: bool = True  # input shapes of each op
    profile_memory: bool = True  # tensor memory allocated and freed by each op
    with_stack: bool = False  # Python source line of each op (bigger trace)
    sort_by: str = knob("self_cpu_time_total", one_of(*PROFILER_SORT_KEYS))  # table order; on GPU: self_cuda_time_total
    row_limit: int = knob(15, non_negative)  # rows of the printed top-ops table (0: none)


@dataclass
class LossSpikeConfig:
    """Warn when train/loss > running mean + k std (counted as loss_spikes)."""

    enabled: bool = True
    window: int = knob(50, at_least(2))  # running mean and std over the train losses of the last N optimizer steps
    k: float = knob(4.0, positive)  # standard deviations above the mean that make a spike
    min_steps: int = 20  # losses in the window before detection starts

    def check(self) -> None:
        require(2 <= self.min_steps <= self.window, "min_steps",
                f"must be in [2, loss_spike.window={self.window}] (got {self.min_steps})")  # fmt: skip


@dataclass
class MonitorConfig:
    """Training dynamics (callbacks/monitor.py); one host sync per optimizer step."""

    grad_norm: bool = True  # global gradient norm before clipping, every step (grad_norm)
    lr: bool = True  # learning rate (lr; lr/<group> where parameter groups differ)
    loss_scale: bool = True  # fp16: dynamic loss scale (loss_scale) and overflow-skipped steps (skipped_steps)
    param_norm: bool = True  # global weight norm (param_norm), every every_n_steps
    update_ratio: bool = True  # per-layer |Δθ|/|θ| of one step (update_ratio/<layer>, /global, /max); ~1e-3 is healthy
    every_n_steps: int = knob(10, at_least(1))  # how often param_norm and update_ratio are measured
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    progress_bar_refresh_rate: int = knob(1, non_negative)  # the bar's numbers every N optimizer steps; 0 hides it
