"""lm-evaluation-harness over gptlab's in-memory GPT: the adapter against plain forward passes, tasks over local
files in the real datasets' schemas (lm-eval's own task YAMLs, included), DDP, the callback and the script.
Offline throughout: each task reads a small json file written here."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.nn import functional as F

from gptlab.config import load_config
from gptlab.data.tokenizer import EOT, gpt2_tokenizer
from gptlab.errors import ConfigError, UserInputError
from gptlab.eval import harness
from gptlab.eval.harness import GPTLM, TASK_PRESETS, expand_tasks, flat_metrics, run_tasks
from gptlab.generate import generate
from gptlab.model import GPT, GPTConfig
from tests.conftest import compose_train, read_metrics, run_script

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
LOCAL_TASKS = ["hellaswag_local", "arc_local", "lambada_local", "wikitext_local", "qa_local"]
WORDS = "the a man woman dog ball kitchen runs jumps slowly quickly into out of table chair paints is then".split()


def tiny_gpt(block_size: int = 128) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + 3 * k) % len(WORDS)] for k in range(n))


# --- tasks over local files ------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hellaswag_records(n: int = 8) -> list[dict]:
    """Rowan/hellaswag's schema (label a string, as on the hub)."""
    return [
        dict(ind=i, activity_label="Cooking", ctx_a=sentence(i, 6) + ".", ctx_b="he", ctx=sentence(i, 6) + ". he",
             endings=[sentence(i + j, 2 + j) + "." for j in range(4)], source_id=f"activitynet~{i}", split="val",
             split_type="indomain", label=str(i % 4))
        for i in range(n)
    ]  # fmt: skip


def arc_records(n: int = 8) -> list[dict]:
    """allenai/ai2_arc's schema."""
    return [
        dict(id=f"q{i}", question=sentence(i, 5) + "?", answerKey="ABCD"[i % 4],
             choices={"text": [sentence(i + j, 1 + j) for j in range(4)], "label": list("ABCD")})
        for i in range(n)
    ]  # fmt: skip


def task_yaml(name: str, include: str | None, data: Path, split: str, cache: Path, **more) -> str:
    """An lm-eval task over a local json file; `include`: lm-eval's own YAML (prompt, metrics, processing)."""
    config = {"task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {split: str(data)}, "cache_dir": str(cache)},
              "training_split": None, "validation_split": None, "test_split": None}  # fmt: skip
    config |= {f"{split}_split": split, **more}
    lines = [f"include: {include}"] if include else []
    return "\n".join(lines + [f"{key}: {json.dumps(value)}" for key, value in config.items()]) + "\n"  # JSON is YAML


def lambada_text(i: int) -> str:
    """EleutherAI/lambada_openai's schema: a text whose last word is the target; for even i that word is
    tiny_gpt()'s greedy next token, so that acc is not 0 for a random model."""
    if i % 2:
        return sentence(i, 6 + i)
    enc, model = gpt2_tokenizer(), tiny_gpt()
    for n in range(6 + i, 30 + i):  # the first context whose greedy next token is a word
        context = enc.encode_ordinary(sentence(i, n))
        word = enc.decode(generate(model, torch.tensor([context]), 1, temperature=0)[0, -1:].tolist())
        if re.fullmatch(r" [A-Za-z]+", word):
            return sentence(i, n) + word
    raise AssertionError("no context with a greedy next word")


def write_tasks(folder: Path) -> Path:
    """A folder of lm-eval task YAMLs, each over a small local file in its dataset's schema."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "hf_cache"
    pages = [f" = Page {i} = \n " + sentence(i, 40 * i + 5) + " @-@ x , y . \n" for i in range(4)]  # wikitext's style
    files = {
        "hellaswag": write_jsonl(folder / "hellaswag.jsonl", hellaswag_records()),
        "arc": write_jsonl(folder / "arc.jsonl", arc_records()),
        "lambada": write_jsonl(folder / "lambada.jsonl", [{"text": lambada_text(i)} for i in range(6)]),
        "wikitext": write_jsonl(folder / "wikitext.jsonl", [{"page": page} for page in pages]),
        "qa": write_jsonl(folder / "qa.jsonl", [{"question": sentence(i, 4), "answer": "the"} for i in range(6)]),
    }
    tasks = {
        "hellaswag_local": ("hellaswag/hellaswag.yaml", "hellaswag", "validation", {}),
        "arc_local": ("arc/arc_easy.yaml", "arc", "validation", {}),
        "lambada_local": ("lambada/lambada_openai.yaml", "lambada", "test", {}),
        "wikitext_local": ("wikitext/wikitext.yaml", "wikitext", "test", {}),
        "qa_local": (None, "qa", "test", dict(
            output_type="generate_until", doc_to_text="Q: {{question}}\nA:", doc_to_target="{{answer}}",
            generation_kwargs={"until": ["\n", "."], "max_gen_toks": 6, "do_sample": False},
            metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        )),
    }  # fmt: skip
    for name, (include, data, split, more) in tasks.items():
        include = str(LM_EVAL_TASKS / include) if include else None
        (folder / f"{name}.yaml").write_text(task_yaml(name, include, files[data], split, cache, **more))
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def local_results(task_dir):
    """run_tasks over every local task with tiny_gpt(), once."""
    return run_tasks(tiny_gpt(), LOCAL_TASKS, include_path=task_dir, batch_size=4)


# --- references: one request at a time, a plain forward pass ---------------------------------------------


@torch.no_grad()
def reference_loglikelihood(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from one forward pass over the last block_size + 1 tokens (a continuation
    longer than that: its tokens that have a token before them in the window)."""
    whole = (context + continuation)[-(model.config.block_size + 1) :]
    n = min(len(continuation), len(whole) - 1)
    logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = F.log_softmax(logits[0, -n:].float(), dim=-1)
    targets = torch.tensor(whole[-n:])
    return logprobs.gather(1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


@torch.no_grad()
def reference_rolling(model: GPT, tokens: list[int]) -> float:
    """log p(tokens | EOT): the tokens predicted block_size at a time, each window as long as the block allows."""
    L, seq, total = model.config.block_size, [EOT, *tokens], 0.0
    for start in range(0, len(tokens), L):
        end = min(start + L, len(tokens))  # this window predicts tokens[start:end] from seq[first:end]
        first = max(0, end - L)
        logits, _ = model(torch.tensor([seq[first:end]]))
        logprobs = F.log_softmax(logits[0].float(), dim=-1)
        total += sum(logprobs[i - first, tokens[i]].item() for i in range(start, end))
    return total


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: the context's trailing spaces go to the continuation; an empty context is EOT."""
    enc = gpt2_tokenizer()
    if not context:
        return [EOT], enc.encode_ordinary(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_tokens = enc.encode_ordinary(stripped)
    return context_tokens, enc.encode_ordinary(stripped + continuation)[len(context_tokens) :]


def instances(request_type: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


PAIRS = [
    ("The man runs into the", " kitchen"),
    ("The man runs into the", " table and then the chair"),  # the same context: one row, context run once
    ("The man runs into the ", "dog"),  # a trailing space moves to the continuation
    ("", "A dog is then a ball"),  # no context: <|endoftext|> is the context
    (sentence(1, 150), " slowly quickly"),  # longer than block_size: cut from the left
    ("a", sentence(2, 140)),  # a continuation longer than block_size
]


# --- the adapter ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_loglikelihood_equals_a_plain_forward_pass(batch_size):
    model = tiny_gpt()
    got = GPTLM(model, batch_size=batch_size).loglikelihood(instances("loglikelihood", PAIRS))
    for (logprob, greedy), pair in zip(got, PAIRS):
        expected_logprob, expected_greedy = reference_loglikelihood(model, *encode_pair(*pair))
        assert logprob == pytest.approx(expected_logprob, abs=1e-4) and greedy == expected_greedy


def test_greedy_continuations_are_flagged_greedy():
    model = tiny_gpt()
    context = gpt2_tokenizer().encode_ordinary("The man runs into the")
    greedy = generate(model, torch.tensor([context]), 3, temperature=0)[0, len(context) :].tolist()
    text = gpt2_tokenizer().decode(greedy)
    [(_, is_greedy), (_, not_greedy)] = GPTLM(model).loglikelihood(
        instances("loglikelihood", [("The man runs into the", text), ("The man runs into the", text + text)])
    )
    assert is_greedy and not not_greedy


@pytest.mark.parametrize("block_size", [128, 32])  # 32: texts of several windows
def test_rolling_loglikelihood_sums_the_whole_text(block_size):
    model = tiny_gpt(block_size)
    texts = ["A man runs.", sentence(3, 70), sentence(4, 33)]
    got = GPTLM(model, batch_size=2).loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
    expected = [reference_rolling(model, gpt2_tokenizer().encode_ordinary(t)) for t in texts]
    assert got == pytest.approx(expected, abs=1e-4)


def test_endoftext_in_text_is_the_eot_token():
    lm, enc = GPTLM(tiny_gpt()), gpt2_tokenizer()
    assert lm.tok_encode("a<|endoftext|>b") == [*enc.encode_ordinary("a"), EOT, *enc.encode_ordinary("b")]
    assert lm.eot_token_id == lm.prefix_token_id == EOT and lm.max_length == 128


def test_generate_until_is_greedy_batched_and_stops_at_until():
    model, enc = tiny_gpt(), gpt2_tokenizer()
    contexts = ["The man", "A dog runs into the kitchen and", sentence(5, 20), "Then"]
    alone = []  # each context on its own: 6 greedy tokens
    for context in contexts:
        tokens = enc.encode_ordinary(context)
        alone.append(enc.decode(generate(model, torch.tensor([tokens]), 6, temperature=0)[0, len(tokens) :].tolist()))
    stop = alone[1][len(alone[1]) // 2 :][:2]  # a piece of one continuation: that one stops early
    kwargs = {"until": [stop], "max_gen_toks": 6, "do_sample": False}
    got = GPTLM(model, batch_size=3).generate_until(instances("generate_until", [(c, kwargs) for c in contexts]))
    assert got == [text.split(stop)[0] for text in alone] and len(got[1]) < len(alone[1])


def test_generate_until_refuses_sampling_and_too_many_tokens():
    lm = GPTLM(tiny_gpt(block_size=32))
    with pytest.raises(UserInputError, match="greedily only"):
        lm.generate_until(instances("generate_until", [("a", {"until": ["\n"], "do_sample": True})]))
    with pytest.raises(UserInputError, match="max_gen_toks=32"):
        lm.generate_until(instances("generate_until", [("a", {"until": ["\n"], "max_gen_toks": 32})]))


@pytest.mark.slow
def test_compiled_model_gives_the_same_loglikelihoods():
    torch._dynamo.reset()
    model, compiled = tiny_gpt(), tiny_gpt()
    compiled.compile(backend="eager")  # dynamo's capture without inductor's code generation: seconds, not minutes
    requests = instances("loglikelihood", PAIRS[:3])
    got, expected = GPTLM(compiled).loglikelihood(requests), GPTLM(model).loglikelihood(requests)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)


# --- tasks, presets, errors --------------------------------------------------------------------------------


def test_run_tasks_gives_every_tasks_metrics(local_results):
    results, flat = local_results
    expected = {
        "hellaswag_local": ("acc", "acc_norm"), "arc_local": ("acc", "acc_norm"), "qa_local": ("exact_match",),
        "lambada_local": ("acc", "perplexity"),
        "wikitext_local": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    }  # fmt: skip
    assert set(flat) == {f"{task}/{m}" for task, metrics in expected.items() for m in (*metrics, "n")}
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    assert flat["hellaswag_local/n"] == 8 and flat["wikitext_local/n"] == 4
    assert flat == flat_metrics(results) and "hellaswag_local" in results["results"]


def test_lambada_and_wikitext_metrics_follow_the_reference(local_results, task_dir):
    _, flat = local_results
    model, enc = tiny_gpt(), gpt2_tokenizer()
    texts = [json.loads(line)["text"] for line in (task_dir / "lambada.jsonl").read_text().splitlines()]
    greedy = []  # lambada's acc: is the last word what greedy decoding gives?
    for text in texts:
        context, last_word = text.rsplit(" ", 1)
        greedy.append(reference_loglikelihood(model, *encode_pair(context, " " + last_word))[1])
    assert flat["lambada_local/acc"] == pytest.approx(sum(greedy) / len(texts)) and sum(greedy) >= 3
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    pages = [json.loads(line)["page"] for line in (task_dir / "wikitext.jsonl").read_text().splitlines()]
    logprob = sum(reference_rolling(model, enc.encode_ordinary(wikitext_detokenizer({"page": p}))) for p in pages)
    words = sum(len(re.split(r"\s+", page)) for page in pages)  # lm-eval counts the raw page's words
    assert flat["wikitext_local/word_perplexity"] == pytest.approx(math.exp(-logprob / words), rel=1e-4)


def test_presets_expand():
    assert expand_tasks(["small_models"]) == TASK_PRESETS["small_models"]
    assert expand_tasks(["piqa", "small_models", "mine"]) == ["piqa", "hellaswag", "arc_easy", "arc_challenge",
                                                              "winogrande", "lambada_openai", "mine"]  # fmt: skip


def test_unknown_task_message_lists_close_matches():
    message = harness.unknown_tasks_message(["hellaswg"], ["hellaswag", "hellaswag_de", "piqa"], None)
    assert "\n" not in message and "'hellaswg'" in message and "did you mean hellaswag" in message
    assert "small_models" in message


@pytest.mark.slow
def test_unknown_task_is_a_one_line_error_with_close_matches(task_dir):
    """Names not all under include_path: lm-eval's whole task index (~10 s to build)."""
    with pytest.raises(UserInputError, match=r"unknown lm-eval task 'arc_esy' \(did you mean arc_easy") as e:
        run_tasks(tiny_gpt(), ["hellaswag_local", "arc_esy"], include_path=task_dir)
    assert "\n" not in str(e.value)


def test_a_dataset_that_cannot_be_loaded_is_a_one_line_error(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    yaml = task_yaml("arc_gone", str(LM_EVAL_TASKS / "arc/arc_easy.yaml"), tmp_path / "gone.jsonl", "test", tmp_path)
    (folder / "arc_gone.yaml").write_text(yaml)
    load = lambda: harness.load_tasks(["arc_gone"], folder)  # noqa: E731
    run = lambda: run_tasks(tiny_gpt(), ["arc_gone"], include_path=folder)  # noqa: E731
    for call in (load, run):
        with pytest.raises(UserInputError, match="arc_gone: a dataset could not be loaded") as e:
            call()
        assert "\n" not in str(e.value) and "include_path" in str(e.value)


def test_missing_lm_eval_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails, as where it is not installed
    for call in (lambda: run_tasks(tiny_gpt(), ["piqa"]), lambda: GPTLM(tiny_gpt())):
        with pytest.raises(UserInputError, match=r"pip install -e \.\[eval\] \(requirements.txt pins it\)") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"pip install -e \.\[eval\]") as e:  # before training starts
        load_config(compose_train(["eval.harness.tasks=[piqa]"]), command_line=[])
    assert e.value.key == "eval.harness.tasks"
    load_config(compose_train([]), command_line=[])  # no tasks: no lm-eval needed


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.harness.every_n_steps=-1", "eval.harness.every_n_steps"),
        ("eval.harness.limit=0", "eval.harness.limit"),
        ("eval.harness.num_fewshot=-1", "eval.harness.num_fewshot"),
        ("eval.harness.batch_size=0", "eval.harness.batch_size"),
        ("eval.harness.include_path=/no/such/folder", "eval.harness.include_path"),
        ("eval.harness.tasks=[' ']", "eval.harness.tasks"),
    ],
)
def test_bad_harness_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(compose_train(["eval.harness.tasks=[piqa]", override]), command_line=[])
    assert e.value.key == key


def test_header_says_which_tasks_run():
    from gptlab.callbacks.harness import describe
    from gptlab.eval.config import HarnessConfig

    assert describe(HarnessConfig(), "cpu") == ""
    clause = describe(HarnessConfig(tasks=["small_models"], every_n_steps=50), "cpu")
    assert clause.startswith("; lm-eval: hellaswag, arc_easy,") and "first 100 examples" in clause
    assert "every 50 steps" in clause and "cpu_limit" in clause
    assert "all examples" in describe(HarnessConfig(tasks=["piqa"]), "cuda")


@pytest.mark.slow
def test_agrees_with_lm_evals_own_hf_model_on_the_export(tmp_path, task_dir, local_results):
    """lm-eval's HFLM over the model exported to Hugging Face: the same metrics, and the same generations."""
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from gptlab.eval.harness import task_manager
    from gptlab.hf import export_hf

    model = tiny_gpt()
    hf = HFLM(pretrained=str(export_hf(model, tmp_path / "hf")), device="cpu", batch_size=4)
    manager = task_manager(LOCAL_TASKS, task_dir)
    results = lm_eval.simple_evaluate(hf, tasks=LOCAL_TASKS, task_manager=manager, bootstrap_iters=0, log_samples=False)
    assert flat_metrics(results) == pytest.approx(local_results[1], rel=1e-5)
    kwargs = {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False}
    requests = instances("generate_until", [(c, kwargs) for c in ("The man", sentence(6, 30), "A dog runs into")])
    assert GPTLM(model, batch_size=2).generate_until(requests) == hf.generate_until(requests)


# --- data parallel -----------------------------------------------------------------------------------------


def ddp_worker(rank: int, world: int, init_file: str, task_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results, flat = run_tasks(tiny_gpt(), LOCAL_TASKS, include_path=task_dir, batch_size=4)
        assert (results is None) == (rank > 0)
        Path(out, f"rank{rank}.json").write_text(json.dumps(flat))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_return_the_single_process_metrics(tmp_path, task_dir, local_results):
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(task_dir), str(tmp_path)), nprocs=2)
    _, single = local_results
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(single, rel=1e-5)


# --- in training, and the script -----------------------------------------------------------------------------


@pytest.mark.slow
def test_callback_logs_harness_metrics_during_and_after_training(tmp_path, data_dir, task_dir):
    run_dir = tmp_path / "run"
    overrides = [
        "debug=smoke", "logger=none", "eval.hellaswag.enabled=false", "eval.harness.every_n_steps=1",
        "eval.harness.tasks=[hellaswag_local,lambada_local]", f"eval.harness.include_path={task_dir}",
        "eval.harness.limit=4",
    ]  # fmt: skip
    from gptlab.train import run

    summary = run(compose_train(overrides, run_dir, data_dir))
    assert summary["status"] == "completed"
    scored = [m for m in read_metrics(run_dir) if "harness/hellaswag_local/acc" in m]
    assert [m["step"] for m in scored] == [1, 2]  # every step, and not twice at the last one
    assert {"harness/lambada_local/acc", "harness/lambada_local/perplexity", "harness/hellaswag_local/n"} <= set(
        scored[-1]
    )
    assert scored[-1]["harness/hellaswag_local/n"] == 4
    assert summary["harness"] == {name.removeprefix("harness/"): v for name, v in scored[-1].items() if "/" in name
                                  and name.startswith("harness/")}  # fmt: skip


@pytest.mark.slow
def test_script_prints_the_table_and_a_json_line(tmp_path, task_dir):
    config = OmegaConf.to_container(compose_train(["model.n_layer=2"]), resolve=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config["model"])).eval()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"config": config}, "state_dict": {"model." + k: v for k, v in
                                                                     model.state_dict().items()}}, ckpt)  # fmt: skip
    common = (f"checkpoint={ckpt}", f"include_path={task_dir}", f"paths.output_root={tmp_path / 'outputs'}")

    done = run_script("eval_harness.py", *common, "tasks=[hellaswag_local,wikitext_local]", "limit=4", "device=cpu", "dtype=fp32")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("|") and "Tasks" in line for line in lines)  # lm-eval's table
    metrics = json.loads(lines[-1])
    _, expected = run_tasks(model, ["hellaswag_local", "wikitext_local"], include_path=task_dir, limit=4)
    assert metrics == pytest.approx(expected, rel=1e-5)

    failed = run_script("eval_harness.py", *common, "tasks=[hellaswag_locl]")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "hellaswag_locl" in failed.stderr and "did you mean" in failed.stderr
    no_tasks = run_script("eval_harness.py", *common)
    assert no_tasks.returncode == 2 and "tasks" in no_tasks.stderr and "Traceback" not in no_tasks.stderr
