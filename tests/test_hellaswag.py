"""HellaSwag: the data file, batched scoring against build-nanogpt's per-example loop, DDP, and the script."""

import io
import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch.nn import functional as F

from gptlab.data.tokenizer import gpt2_tokenizer
from gptlab.errors import DataError
from gptlab.eval import hellaswag
from gptlab.eval.hellaswag import Example, evaluate, hellaswag_file, load_examples, predict
from gptlab.model import GPT, GPTConfig
from tests.conftest import compose_train, run_script

WORDS = "the a man woman dog ball kitchen runs jumps slowly quickly into out of table chair paints is then".split()


def make_records(n: int = 16, seed: int = 0) -> list[dict]:
    """Records in the HellaSwag schema; 12 short contexts and 4 long ones: two length buckets (32, 64)."""
    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    records = []
    for i in range(n):
        ctx = sentence(rng.randint(3, 12) if i % 4 else rng.randint(25, 40))
        endings = [sentence(rng.randint(1, 9)) for _ in range(4)]
        records.append(dict(
            ind=i, activity_label="Testing", ctx_a=ctx, ctx_b="", ctx=ctx, split="val", split_type="indomain",
            label=rng.randrange(4), endings=endings, source_id=f"test~{i}",
        ))  # fmt: skip
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_gpt(block_size: int = 128) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [Example(r["ctx"], tuple(r["endings"]), r["label"]) for r in make_records()]


@pytest.fixture(scope="module")
def reference(examples) -> torch.Tensor:
    """The per-example loop's predictions with tiny_gpt(), computed once."""
    return reference_predictions(tiny_gpt(), examples)


@torch.no_grad()
def reference_predictions(model: GPT, examples: list[Example], block_size: int = 10**9) -> torch.Tensor:
    """build-nanogpt's loop: one example (4 rows padded to the longest) per forward pass, logits everywhere;
    rows cut from the left to block_size + 1 tokens (lm-eval's truncation: the last token is only a target).
    Columns: by summed loss, per ending token, per UTF-8 byte of the ending."""
    enc = gpt2_tokenizer()
    predictions = []
    for example in examples:
        ctx = enc.encode_ordinary(example.ctx)
        rows, masks = [], []
        for ending in example.endings:
            end = enc.encode_ordinary(" " + ending)
            rows.append((ctx + end)[-(block_size + 1) :])
            masks.append(([0] * len(ctx) + [1] * len(end))[-(block_size + 1) :])
        tokens = torch.zeros(4, max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, (row, m) in enumerate(zip(rows, masks)):
            tokens[i, : len(row)], mask[i, : len(m)] = torch.tensor(row), torch.tensor(m)
        logits, _ = model(tokens[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
        summed = (losses * mask[:, 1:]).sum(1)
        n_bytes = torch.tensor([len(ending.encode("utf-8")) for ending in example.endings])
        predictions.append([summed.argmin(), (summed / mask[:, 1:].sum(1)).argmin(), (summed / n_bytes).argmin()])
    return torch.tensor(predictions)


def accuracies(predictions: torch.Tensor, examples: list[Example]) -> tuple[float, ...]:
    labels = torch.tensor([e.label for e in examples])
    return tuple(count / len(examples) for count in (predictions == labels[:, None]).sum(0).tolist())


# --- the data file -------------------------------------------------------------------------------------


def test_load_examples_reads_the_schema(tmp_path):
    records = make_records(5)
    examples = load_examples(write_jsonl(tmp_path / "val.jsonl", records))
    assert [e.label for e in examples] == [r["label"] for r in records]
    assert examples[2].ctx == records[2]["ctx"] and examples[2].endings == tuple(records[2]["endings"])


def test_lm_eval_prompt_is_lm_evals_hellaswag_task(tmp_path):
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs  # the reference: lm-eval's own preprocessing

    records = make_records(6)
    records[1].update(ctx_a="How to paint a chair [title] Sand it.", ctx_b="then paint it [step] twice")
    records[2].update(ctx_b="A man  runs.", endings=[" [header] A [substeps] b", "c [title] d", "e  f", "[x]"])
    records[3]["activity_label"] = "Ételé ümlaut"
    examples = load_examples(write_jsonl(tmp_path / "val.jsonl", records), prompt="lm_eval")
    docs = process_docs(datasets.Dataset.from_list(records))
    assert [(e.ctx, list(e.endings), e.label) for e in examples] == [(d["query"], d["choices"], d["gold"]) for d in docs]
    with pytest.raises(DataError, match="missing field.*activity_label.*prompt=lm_eval"):
        load_examples(write_jsonl(tmp_path / "bare.jsonl", [{"ctx": "a", "endings": list("abcd"), "label": 0}]), "lm_eval")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not JSON"),
        (json.dumps({"ctx": "a", "label": 0}), "missing field(s) endings"),
        (json.dumps({"ctx": "a", "label": 4, "endings": list("abcd")}), "label must be an integer in 0..3"),
        (json.dumps({"ctx": "a", "label": "1", "endings": list("abcd")}), "label must be an integer in 0..3"),
        (json.dumps({"ctx": "a", "label": 1, "endings": list("abc")}), "exactly 4 strings, got 3"),
        (json.dumps({"ctx": "a", "label": 1, "endings": list("abcde")}), "exactly 4 strings, got 5"),
    ],
)
def test_malformed_file_names_the_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "val.jsonl", [*make_records(2), bad_line, *make_records(1)])
    with pytest.raises(DataError, match="line 3") as error:
        load_examples(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_given_path_wins_and_a_missing_one_is_named(tmp_path):
    given = write_jsonl(tmp_path / "mine.jsonl", make_records(1))
    write_jsonl(tmp_path / hellaswag.FILE_NAME, make_records(2))  # a cached copy, not used
    assert hellaswag_file(str(given), tmp_path) == given
    with pytest.raises(DataError, match=str(tmp_path / "absent.jsonl")):
        hellaswag_file(str(tmp_path / "absent.jsonl"), tmp_path)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_once_then_cached_and_verified(tmp_path, monkeypatch):
    body = "".join(json.dumps(r) + "\n" for r in make_records(3)).encode()
    calls = []
    monkeypatch.setattr(hellaswag, "urlopen", lambda url, timeout: calls.append(url) or FakeResponse(body))
    cache = tmp_path / "cache"
    path = hellaswag_file(None, cache)
    assert path == cache / hellaswag.FILE_NAME and path.read_bytes() == body and calls == [hellaswag.URL]
    assert hellaswag_file(None, cache) == path and len(calls) == 1  # cached: no second download
    assert sorted(p.name for p in cache.iterdir()) == [hellaswag.FILE_NAME, hellaswag.FILE_NAME + ".sha256"]
    path.write_bytes(body[:-10])  # damaged after the download
    with pytest.raises(DataError, match="damaged"):
        hellaswag_file(None, cache)


def test_failed_download_returns_none_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise OSError("no network")

    monkeypatch.setattr(hellaswag, "urlopen", offline)
    assert hellaswag_file(None, tmp_path / "cache") is None
    assert list((tmp_path / "cache").iterdir()) == []
    assert hellaswag_file(None, tmp_path / "never", download=False) is None


# --- scoring ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_batched_matches_the_per_example_loop(examples, reference, batch_size):
    model, expected = tiny_gpt(), reference
    assert torch.equal(predict(model, examples, batch_size=batch_size), expected)
    result = evaluate(model, examples, batch_size=batch_size)
    n = len(examples)
    assert result["n"] == n
    for metric, accuracy in zip(("acc", "acc_norm", "acc_bytes"), accuracies(expected, examples)):
        assert result[metric] == accuracy and result[metric.replace("acc", "correct")] == round(accuracy * n)


def test_limit_scores_the_first_examples(examples, reference):
    result = evaluate(tiny_gpt(), examples, batch_size=4, limit=6)
    assert result["n"] == 6 and result["acc"] == accuracies(reference[:6], examples[:6])[0]


def test_rows_longer_than_block_size_are_cut_from_the_left(examples):
    model = tiny_gpt(block_size=24)  # the long contexts do not fit
    expected = reference_predictions(model, examples, block_size=24)
    assert torch.equal(predict(model, examples, batch_size=8), expected)


def test_one_compile_per_length_bucket(examples):
    shapes = []

    def counting_backend(graph_module, example_inputs):
        shapes.append(tuple(example_inputs[0].shape))
        return graph_module.forward

    torch._dynamo.reset()
    model = tiny_gpt()
    model.compile(backend=counting_backend, dynamic=False)
    predict(model, examples, batch_size=4)  # 4 batches; rows of 32, 64 or 96 tokens, 16 or 32 scored positions
    compiled = len(shapes)
    predict(model, examples[::-1], batch_size=4)  # the same batches again: no new compile
    assert len(shapes) == compiled == 3


@pytest.mark.slow
def test_compiled_matches_eager(examples, reference):
    torch._dynamo.reset()
    compiled = tiny_gpt()
    compiled.compile()  # one batch, so one compile: inductor takes ~15 s per shape on CPU
    assert torch.equal(predict(compiled, examples, batch_size=len(examples)), reference)


def ddp_worker(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = evaluate(tiny_gpt(), load_examples(data), batch_size=3)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_return_the_single_process_numbers(tmp_path, examples):
    data = write_jsonl(tmp_path / "val.jsonl", make_records())
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(data), str(tmp_path)), nprocs=2)
    single = evaluate(tiny_gpt(), examples, batch_size=3)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [single, single]


# --- the script ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_script_prints_json_and_fails_cleanly_without_data(tmp_path):
    config = OmegaConf.to_container(compose_train(["model.n_layer=2"]), resolve=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config["model"]))
    ckpt = tmp_path / "last.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"config": config}, "state_dict": state}, ckpt)
    data = write_jsonl(tmp_path / "val.jsonl", make_records())
    outputs = f"paths.output_root={tmp_path / 'outputs'}"

    done = run_script("eval_hellaswag.py", f"checkpoint={ckpt}", f"eval.hellaswag.path={data}", "limit=10", "batch_size=4", "dtype=fp32", outputs)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    model.eval()
    examples = load_examples(data)[:10]
    acc, acc_norm, acc_bytes = accuracies(reference_predictions(model, examples), examples)
    assert result == {"acc": acc, "acc_norm": acc_norm, "acc_bytes": acc_bytes, "n": 10}

    cache = tmp_path / "cache"
    no_data = (f"eval.hellaswag.cache_dir={cache}", "eval.hellaswag.download=false")
    failed = run_script("eval_hellaswag.py", f"checkpoint={ckpt}", *no_data, outputs)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "eval.hellaswag.path=" in failed.stderr and str(cache) in failed.stderr


# --- how many examples a training run scores -------------------------------------------------------------


def test_all_examples_on_a_gpu_and_cpu_limit_on_a_cpu_as_the_header_says():
    from gptlab.callbacks.hellaswag import coverage, scored_examples
    from gptlab.eval.config import HellaSwagConfig

    default = HellaSwagConfig()
    assert (scored_examples(default, "cuda"), scored_examples(default, "cpu")) == (None, 200)
    assert coverage(default, "eval.hellaswag", "cuda") == "all examples, after the last step"
    assert coverage(default, "eval.hellaswag", "cpu") == (
        "the first 200 examples (eval.hellaswag.cpu_limit, on CPU), after the last step"
    )
    limited = HellaSwagConfig(limit=50, every_n_steps=10)
    assert scored_examples(limited, "cuda") == scored_examples(limited, "cpu") == 50
    assert coverage(limited, "eval.hellaswag", "cpu") == (
        "the first 50 examples (eval.hellaswag.limit), every 10 steps and after the last"
    )
    assert scored_examples(HellaSwagConfig(cpu_limit=None), "cpu") is None
