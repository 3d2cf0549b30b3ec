"""lm-evaluation-harness tasks scored by an in-memory gptlab GPT: no conversion to Hugging Face, so the model
that is training (or a compiled, or FSDP-sharded one) is evaluated as it is.

`GPTLM` is lm-eval's model interface over a GPT:
- loglikelihood (multiple choice, lambada) and loglikelihood_rolling (perplexity: wikitext) go through
  gptlab.eval.scoring, which runs the shared context of several continuations once, sorts rows by length and
  batches them; long inputs are cut from the left as lm-eval's HFLM cuts them;
- generate_until decodes greedily, batched, until a task's stop strings or max_gen_toks (no sampling);
- under torch.distributed, lm-eval gives each rank its share of the documents and gathers the metrics with
  the collectives below; every rank runs as many forward passes as the busiest (an FSDP model needs that).

`run_tasks` runs tasks with lm_eval.simple_evaluate and flattens the results to {"<task>/<metric>": value}.
lm-eval is an optional extra: gptlab imports without it, and using this module without it is a one-line error.
"""

import contextlib
import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore

from gptlab.config import PathsConfig
from gptlab.data.tokenizer import EOT, gpt2_tokenizer
from gptlab.errors import UserInputError
from gptlab.eval.config import LM_EVAL_MISSING
from gptlab.eval.scoring import Score, score_continuations
from gptlab.schema import Rule, at_least, knob, non_negative, one_of, optional, required

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the optional extra is not installed: GPTLM() says how to install it
    TemplateLM = object

TASK_PRESETS = {  # a name in `tasks` that expands to several tasks
    "small_models": ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai"],
}


@dataclass
class EvalHarnessConfig:
    """The root of scripts/eval_harness.py (conf/eval_harness.yaml)."""

    checkpoint: Optional[str] = knob(None, required("a gptlab .ckpt, a Hugging Face GPT-2 folder or a hub name"))
    tasks: list[str] = knob([], Rule(bool, "a list of lm-eval task names or presets, e.g. tasks=[small_models]"))
    limit: Optional[int] = knob(None, optional(at_least(1)))  # the first N examples of each task; null: all
    num_fewshot: Optional[int] = knob(None, optional(non_negative))  # examples in the prompt; null: each task's own
    batch_size: int = knob(32, at_least(1))  # rows per forward pass (a row: one context and its continuations)
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:1 ...
    dtype: str = knob("auto", one_of("auto", "fp32", "bf16", "fp16"))  # autocast; auto: bf16 on a GPU with it
    include_path: Optional[str] = None  # a folder of lm-eval task YAMLs (e.g. tasks over local files, offline)
    bootstrap_iters: int = knob(0, non_negative)  # bootstrap resamples for the stderr column; 0: none (fast)
    compile: bool = False  # torch.compile the model first
    paths: PathsConfig = field(default_factory=PathsConfig)


ConfigStore.instance().store(name="eval_harness_schema", node=EvalHarnessConfig)


def require_lm_eval():
    """The lm_eval package; a one-line UserInputError when the optional extra is not installed."""
    try:
        import lm_eval
    except ImportError:
        raise UserInputError(f"lm-eval tasks: gptlab {LM_EVAL_MISSING}") from None
    return lm_eval


# ---------------------------------------------------------------------------------------------------------
# The model adapter


class GPTLM(TemplateLM):
    """lm-eval's model interface over a gptlab GPT (bare, compiled or sharded), with gptlab's GPT-2 tokenizer.
    The caller puts the model in eval mode (run_tasks does)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        require_lm_eval()
        super().__init__()
        self.model = model
        self.batch_size = batch_size
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype
        self.enc = gpt2_tokenizer()
        if dist.is_available() and dist.is_initialized():  # lm-eval shards the documents by these
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # --- tokenizer -----------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return EOT  # also the prefix of a text scored from its first token (lm-eval's prefix_token_id)

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return "gpt2"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # "<|endoftext|>" in a text is the EOT token, as Hugging Face's GPT-2 tokenizer reads it
        return self.enc.encode(string, allowed_special="all")

    def tok_decode(self, tokens: list[int]) -> str:
        return self.enc.decode(tokens)

    def get_model_info(self) -> dict:  # simple_evaluate adds it to results["config"]
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()), "block_size": self.max_length}

    # --- log-likelihoods -----------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or self.rank != 0)  # one progress bar

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens), as TemplateLM encodes them."""
        scores = self._score([(context, continuation) for _, context, continuation in requests])
        return [(score.logprob, score.greedy) for score in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood from its first token (after EOT), in windows of block_size when it is longer:
        every token is predicted once, with as much context as a window holds (lm-eval's rolling windows)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(owners, self._score(windows)):
            totals[i] += score.logprob
        return totals

    def _score(self, requests: list[tuple[list[int], list[int]]]) -> list[Score]:
        return score_continuations(
            self.model, requests, batch_size=self.batch_size, device=self.device,
            autocast_dtype=self.autocast_dtype, all_ranks=self.world_size > 1,
        )  # fmt: skip

    # --- generation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, each cut before the first of its task's `until` strings (and <|endoftext|>),
        at most max_gen_toks tokens; contexts keep their last block_size - max_gen_toks tokens (as HFLM).
        Requests with the same generation settings are batched, longest context first."""
        contexts = [self.tok_encode(request.args[0]) for request in requests]
        plan = []  # (request indices, stop strings, max_gen_toks) per batch
        for (until, max_new), indices in self._by_settings(requests).items():
            indices.sort(key=lambda i: -len(contexts[i]))
            for start in range(0, len(indices), self.batch_size):
                plan.append((indices[start : start + self.batch_size], list(until), max_new))
        plan += [([], [], 0)] * (self._max_over_ranks(len(plan)) - len(plan))  # batches with nothing to generate
        outputs = [""] * len(requests)
        for indices, until, max_new in plan:
            kept = [contexts[i][-(self.max_length - max_new) :] or [EOT] for i in indices]  # "": from EOT
            for i, text in zip(indices, self._generate(kept, until, max_new)):
                outputs[i] = text
        return outputs

    def _by_settings(self, requests) -> dict[tuple, list[int]]:
        """Request indices by (stop strings, max_gen_toks); a request for sampling, or for more new tokens than
        the block holds, is a clear error rather than a number from a different decoding."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            kwargs = dict(request.args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens") if k in kwargs), 256))
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise UserInputError(
                    f"lm-eval task asks to sample ({json.dumps(kwargs, default=str)}); gptlab's adapter decodes "
                    "greedily only: set do_sample: false and temperature: 0 in the task's generation_kwargs"
                )
            if not 0 < max_new < self.max_length:
                raise UserInputError(
                    f"lm-eval task asks for max_gen_toks={max_new} new tokens; the model's block_size "
                    f"{self.max_length} leaves room for 1 to {self.max_length - 1} (after at least 1 token of context)"
                )
            groups.setdefault((tuple(dict.fromkeys([*until, self.tok_decode([EOT])])), max_new), []).append(i)
        return groups

    def _generate(self, contexts: list[list[int]], until: list[str], max_new: int) -> list[str]:
        """Greedy decoding of a batch of contexts, each until it holds a stop string or has max_new new tokens.
        Under torch.distributed every rank steps until the last rank's batch is done (a sharded model's forward
        pass needs every rank); a rank with nothing to do passes contexts=[]."""
        rows = [list(context) for context in contexts] or [[EOT]]
        new: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        step = 0
        while self._max_over_ranks(int(step < max_new and not all(done))):
            next_tokens = self._next_tokens(rows)
            for r in range(len(contexts)):
                if not done[r]:
                    rows[r].append(next_tokens[r])
                    new[r].append(next_tokens[r])
                    done[r] = any(stop in self.tok_decode(new[r]) for stop in until)
            step += 1
        return [cut_at_stop(self.tok_decode(tokens), until) for tokens in new]

    def _next_tokens(self, rows: list[list[int]]) -> list[int]:
        """The most likely next token of each row; rows are left-padded into one batch, padding masked out and
        positions counted from each row's first token, so a row gets the logits it gets alone."""
        B, T = len(rows), max(map(len, rows))
        pad = torch.tensor([T - len(row) for row in rows])
        tokens = torch.tensor([[EOT] * (T - len(row)) + row for row in rows])
        index = torch.arange(T)
        positions = (index[None, :] - pad[:, None]).clamp(min=0)
        real = index[None, :] >= pad[:, None]  # (B, T): not padding
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = causal & (real[:, None, :] | torch.eye(T, dtype=torch.bool))  # padding attends to itself only
        batch = dict(position_ids=positions, attn_mask=mask[:, None], logits_at=torch.arange(B) * T + T - 1)
        batch = {name: t.to(self.device) for name, t in batch.items()}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            logits, _ = self.model(tokens.to(self.device), **batch)
        return logits[:, : self.enc.n_vocab].argmax(-1).tolist()  # never a padding id of the vocabulary

    # --- collectives lm-eval's evaluator uses across ranks ---------------------------------------------------

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")  # gloo: CPU tensors

    def _max_over_ranks(self, value: int) -> int:
        if self.world_size == 1:
            return value
        t = torch.tensor(value, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated along dim 0 (a 0-dim tensor gives a vector of world_size)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.to(self._comm_device)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        """Every rank's object, as a list on rank dst; None elsewhere."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first occurrence of each stop string in turn (lm-eval's postprocessing)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# ---------------------------------------------------------------------------------------------------------
# Tasks


def expand_tasks(tasks: list[str]) -> list[str]:
    """Task names with presets expanded, each name once, in order."""
    names = [name for task in tasks for name in TASK_PRESETS.get(task, [task])]
    return list(dict.fromkeys(names))


@functools.cache
def _task_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(names: list[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager that knows every name, built once per process. Indexing lm-eval's ~15,000 own task
    configs takes ~10 s, so names that are all tasks (not groups) under include_path get an index of that folder
    alone. An unknown name is a one-line UserInputError listing close matches."""
    include_path = str(include_path) if include_path is not None else None
    if include_path is not None:
        local = _task_manager(include_path, False)
        if all(name in local.all_subtasks for name in names):
            return local
    manager = _task_manager(include_path, True)
    unknown = [name for name in names if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        raise UserInputError(unknown_tasks_message(unknown, manager.all_tasks, include_path))
    return manager


@contextlib.contextmanager
def dataset_errors(names: list[str]):
    """A task's dataset that cannot be had (no hub, no cached copy, a missing local file) as a one-line error."""
    try:
        yield
    except OSError as e:  # datasets' ConnectionError, DatasetNotFoundError (a FileNotFoundError), ...
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise UserInputError(
            f"lm-eval tasks {', '.join(names)}: a dataset could not be loaded ({type(e).__name__}: {first_line}). "
            "Without the hub, use a machine's datasets cache (HF_DATASETS_OFFLINE=1) or task YAMLs over local "
            "files in include_path"
        ) from e


def load_tasks(names: list[str], include_path: str | Path | None = None) -> None:
    """Build the tasks and load their datasets once (cached for the runs to come), so that an unknown name or a
    dataset that cannot be had fails before training rather than after it."""
    with dataset_errors(names):
        task_manager(names, include_path).load(names)


def unknown_tasks_message(unknown: list[str], known: list[str], include_path: str | None) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (add yours with include_path)"
    presets = ", ".join(TASK_PRESETS)
    return f"unknown lm-eval task {'; '.join(hints)}: not in {where}, and not a preset ({presets})"


def flat_metrics(results: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} from lm-eval's results, groups as well as tasks: its ",none" filter suffix
    dropped (another filter becomes "<metric>/<filter>"), stderr entries left out, and "<task>/n" the number of
    examples scored (lm-eval's sample_len)."""
    flat = {}
    for task, entries in results["results"].items():
        for key, value in entries.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name:  # name, alias, sample_len: about the task, not metrics
                if key == "sample_len":
                    flat[f"{task}/n"] = float(value)
                continue
            if metric.endswith("stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            flat[f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}/{filter_name}"] = float(value)
    return flat


def run_tasks(
    model: torch.nn.Module,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    include_path: str | Path | None = None,
    bootstrap_iters: int = 0,
) -> tuple[dict | None, dict[str, float]]:
    """Score a GPT on lm-eval tasks (names or presets): (lm-eval's results dict, None on ranks > 0; the flat
    {"<task>/<metric>": value}, the same on every rank). Under torch.distributed call it on every rank with the
    bare model: each rank scores its share of each task's documents. The model is in eval mode meanwhile."""
    lm_eval = require_lm_eval()
    names = expand_tasks(tasks)
    if not names:
        raise UserInputError("no lm-eval tasks given: name some, or a preset (small_models)")
    manager = task_manager(names, include_path)
    lm = GPTLM(model, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)
    if limit is not None and limit < lm.world_size:  # a rank with no documents would skip lm-eval's collectives
        raise UserInputError(f"lm-eval limit={limit} is below the {lm.world_size} ranks: each needs a document")
    was_training = model.training
    model.eval()
    try:
        with dataset_errors(names):
            results = lm_eval.simple_evaluate(
                lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                device=str(lm.device), bootstrap_iters=bootstrap_iters, log_samples=False,
            )  # fmt: skip
    finally:
        model.train(was_training)
    flat = [flat_metrics(results) if results is not None else None]
    if lm.world_size > 1:
        dist.broadcast_object_list(flat, src=0, device=lm._comm_device)
    return results, flat[0]
