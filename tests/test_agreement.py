"""gptlab's HellaSwag and lm-evaluation-harness's `hellaswag` task agree example by example, on the same model
and the same examples: lm-eval through gptlab's adapter (GPTLM) and through lm-eval's own `hf` model loading the
Hugging Face export. The task is lm-eval's own hellaswag.yaml (its process_docs, metrics and prompt), pointed at a
local file in HellaSwag's schema."""

import json
import random
from pathlib import Path

import pytest
import torch

from gptlab.eval.hellaswag import load_examples, predict
from gptlab.model import GPT, GPTConfig

lm_eval = pytest.importorskip("lm_eval")  # pinned in requirements.txt, so CI always runs these

WORDS = "the a man woman dog ball kitchen runs jumps slowly quickly into out of table chair paints is then".split()
UNICODE = ["café", "naïve", "Ünïcödé", "日本語", "emoji 🙂", "ß"]  # per-byte and per-character lengths differ
TASK = "hellaswag_local"


def hellaswag_records(n: int, seed: int = 0, unicode: bool = False) -> list[dict]:
    """Records in the HellaSwag validation schema, with WikiHow's bracket artefacts in some."""
    rng = random.Random(seed)

    def sentence(k: int) -> str:
        words = [rng.choice(WORDS) for _ in range(k)]
        if unicode and rng.random() < 0.7:
            words.insert(rng.randrange(k + 1), rng.choice(UNICODE))
        return " ".join(words)

    records = []
    for i in range(n):
        ctx_a = sentence(rng.randint(5, 20)) + (" [title] " + sentence(3) if i % 3 == 0 else ".")
        records.append(dict(
            ind=i, activity_label=rng.choice(["Cooking", "Home and Garden"]), ctx_a=ctx_a,
            ctx_b=sentence(rng.randint(1, 5)), ctx=f"{ctx_a} ...", split="val", split_type="indomain",
            label=rng.randrange(4), endings=[sentence(rng.randint(1, 12)) for _ in range(4)], source_id=f"t~{i}",
        ))  # fmt: skip
    return records


def local_task(folder: Path, data: Path) -> Path:
    """lm-eval's hellaswag task (included from the installed package) over a local jsonl, with acc_bytes too."""
    included = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    folder.mkdir()
    (folder / f"{TASK}.yaml").write_text(
        f"include: {included}\ntask: {TASK}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\ntraining_split: null\nvalidation_split: validation\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n"
    )
    return folder


def lm_eval_choices(model, tasks_folder: Path, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: lm-eval's chosen ending by acc, acc_norm (per character) and acc_bytes; and its 4
    log-likelihoods. model: an lm_eval LM, or "hf" with model_args."""
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model, tasks=[TASK], task_manager=TaskManager(include_path=str(tasks_folder)), log_samples=True,
        bootstrap_iters=0, **kwargs,
    )  # fmt: skip
    chosen, logprobs = [], []
    for sample in sorted(results["samples"][TASK], key=lambda s: s["doc_id"]):
        lls = torch.tensor([resp[0][0] for resp in sample["resps"]], dtype=torch.float64)
        endings = sample["doc"]["choices"]
        chars = torch.tensor([len(e) for e in endings], dtype=torch.float64)
        n_bytes = torch.tensor([len(e.encode("utf-8")) for e in endings], dtype=torch.float64)
        chosen.append([int(lls.argmax()), int((lls / chars).argmax()), int((lls / n_bytes).argmax())])
        gold = sample["doc"]["gold"]
        assert [sample[m] for m in ("acc", "acc_norm", "acc_bytes")] == [float(c == gold) for c in chosen[-1]]
        logprobs.append(lls)
    return torch.tensor(chosen), torch.stack(logprobs)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("agreement")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()
    files = {}
    for name, unicode in (("ascii", False), ("unicode", True)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in hellaswag_records(24, seed=1, unicode=unicode)))
        files[name] = (data, local_task(folder / f"tasks_{name}", data))
    return dict(model=model, folder=folder, files=files)


def gptlab_choices(setup: dict, name: str) -> torch.Tensor:
    """gptlab's chosen ending per example: by summed, per-token and per-byte log-likelihood."""
    return predict(setup["model"], load_examples(setup["files"][name][0], prompt="lm_eval"), batch_size=5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ascii", "unicode"])
def test_adapter_agrees_with_gptlab_hellaswag(setup, name):
    from gptlab.eval.harness import GPTLM

    ours = gptlab_choices(setup, name)
    theirs, _ = lm_eval_choices(GPTLM(setup["model"], batch_size=8), setup["files"][name][1])
    assert torch.equal(ours[:, 0], theirs[:, 0])  # acc
    assert torch.equal(ours[:, 2], theirs[:, 2])  # per byte = lm-eval's acc_bytes
    if name == "ascii":
        assert torch.equal(ours[:, 2], theirs[:, 1])  # ... = lm-eval's acc_norm (per character) on ASCII
    else:
        assert not torch.equal(theirs[:, 1], theirs[:, 2])  # the data tells characters from bytes


@pytest.mark.slow
def test_hf_export_in_lm_evals_hf_model_agrees_with_gptlab_hellaswag(setup, monkeypatch):
    from gptlab.hf import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = export_hf(setup["model"], setup["folder"] / "export")
    ours = gptlab_choices(setup, "ascii")
    theirs, logprobs = lm_eval_choices(
        "hf", setup["files"]["ascii"][1], model_args=f"pretrained={export},dtype=float32", device="cpu", batch_size=8
    )
    assert torch.equal(ours[:, 0], theirs[:, 0]) and torch.equal(ours[:, 2], theirs[:, 1])  # acc; acc_norm
    _, adapter_logprobs = lm_eval_choices_via_adapter(setup)
    assert torch.allclose(logprobs, adapter_logprobs, atol=1e-4, rtol=0)  # the same numbers, two ways


def lm_eval_choices_via_adapter(setup: dict):
    from gptlab.eval.harness import GPTLM

    return lm_eval_choices(GPTLM(setup["model"], batch_size=8), setup["files"]["ascii"][1])
