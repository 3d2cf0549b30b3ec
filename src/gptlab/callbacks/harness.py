"""lm-evaluation-harness tasks during training: every `every_n_steps` optimizer steps and after the last one."""

from gptlab.callbacks.hellaswag import AUTOCAST_DTYPES, coverage, scored_examples
from gptlab.callbacks.step_end import PeriodicEvaluation
from gptlab.eval.config import HarnessConfig
from gptlab.eval.harness import expand_tasks, load_tasks, run_tasks


def describe(cfg: HarnessConfig, device_type: str) -> str:
    """The training header's clause, e.g. `; lm-eval: piqa, arc_easy, the first 100 examples of each
    (eval.harness.cpu_limit, on CPU), after the last step`; empty when no tasks are set."""
    if not cfg.tasks:
        return ""
    return f"; lm-eval: {', '.join(expand_tasks(cfg.tasks))}, {coverage(cfg, 'eval.harness', device_type, ' of each')}"


class HarnessEval(PeriodicEvaluation):
    """Scores the training model on lm-eval tasks on every rank (each rank its share of the documents) and logs
    `harness/<task>/<metric>` to every logger at the step."""

    def __init__(self, cfg: HarnessConfig, trainer_precision: str):
        super().__init__(cfg.every_n_steps)
        self.cfg = cfg
        self.tasks = expand_tasks(cfg.tasks)
        self.autocast_dtype = AUTOCAST_DTYPES.get(trainer_precision)
        self.limit: int | None = None
        self.result: dict[str, float] | None = None  # the latest {"<task>/<metric>": value}, for summary.json

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.limit = scored_examples(self.cfg, trainer.strategy.root_device.type)  # per task
        load_tasks(self.tasks, self.cfg.include_path)  # an unknown task or missing dataset fails now, not at the end

    def score(self, pl_module) -> dict[str, float]:
        _, self.result = run_tasks(  # the bare GPT, in eval mode meanwhile; the same numbers on every rank
            pl_module.model,
            self.tasks,
            limit=self.limit,
            num_fewshot=self.cfg.num_fewshot,
            batch_size=self.cfg.batch_size,
            device=pl_module.device,
            autocast_dtype=self.autocast_dtype,
            include_path=self.cfg.include_path,
        )
        return {f"harness/{name}": value for name, value in self.result.items()}
