"""data/repeats/<source>: how many times each source of a data mixture has run out and been re-permuted.

Logged after every optimizer step, and said on the console when a source runs out, so that a run that reads some
data more than once says so while it happens (data.max_repeats refuses such a run before it starts)."""

from lightning.pytorch.utilities import rank_zero_info

from gptlab.callbacks.step_end import OnOptimizerStepEnd


class MixtureRepeats(OnOptimizerStepEnd):
    def __init__(self):
        self._repeats: list[int] | None = None

    def on_optimizer_step_end(self, trainer, pl_module, step: int) -> None:
        datamodule = trainer.datamodule
        repeats = datamodule.mixture.repeats(step)
        for source, before, now in zip(datamodule.sources, self._repeats or repeats, repeats):
            if now > before:
                rank_zero_info(f"data: {source.name} ran out by step {step} and was re-permuted (repeat {now})")
        self._repeats = repeats
        pl_module.step_metrics |= {f"data/repeats/{s.name}": float(r) for s, r in zip(datamodule.sources, repeats)}
