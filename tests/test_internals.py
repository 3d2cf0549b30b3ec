"""gptlab's code uses no private (underscore) name of torch, Lightning, Hydra or OmegaConf outside
gptlab/internals.py, and each name that module does use still exists and still means what it says there."""

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import torch

import gptlab
from gptlab import internals
from tests.conftest import ROOT

LIBRARIES = ("torch", "lightning", "hydra", "omegaconf")
ADAPTER = ROOT / "src" / "gptlab" / "internals.py"


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def sources() -> dict[Path, ast.Module]:
    files = [*(ROOT / "src" / "gptlab").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    return {path: ast.parse(path.read_text(), str(path)) for path in files if path != ADAPTER}


def own_names(trees) -> set[str]:
    """Every name gptlab defines: functions, classes, attributes it assigns, variables, arguments."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def private_uses(path: Path, tree: ast.Module, own: set[str]) -> list[str]:
    """`file:line: name` for each private library name the file imports, reads as an attribute or spells as a
    string (getattr(x, "_name"))."""
    uses = []
    in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
            names = [part for part in node.module.split(".") if private(part)]
            names += [alias.name for alias in node.names if private(alias.name)]
        elif isinstance(node, ast.Import):
            parts = [part for a in node.names if a.name.split(".")[0] in LIBRARIES for part in a.name.split(".")]
            names = [part for part in parts if private(part)]
        elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
            names = [node.attr]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstrings:
            names = [node.value] if node.value.isidentifier() and private(node.value) and node.value not in own else []
        uses += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names]
    return uses


def library_overrides() -> list[str]:
    """Private methods of a torch/Lightning/Hydra base class that a gptlab class overrides (ABCMeta gives every
    abstract class its own _abc_impl)."""
    found = []
    for info in pkgutil.walk_packages(gptlab.__path__, "gptlab."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == module.__name__):
                continue
            library_bases = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in LIBRARIES]
            for name in vars(cls):
                if private(name) and name != "_abc_impl" and any(name in vars(base) for base in library_bases):
                    found.append(f"{module.__name__}.{cls.__name__}.{name}")
    return found


def test_no_private_library_name_outside_the_adapter():
    trees = sources()
    own = own_names(trees.values())
    uses = [use for path, tree in trees.items() for use in private_uses(path, tree, own)]
    assert uses == []
    assert library_overrides() == []


def test_the_grep_finds_what_it_is_for(tmp_path):
    """The check itself: each kind of private use it must catch, in a file of its own."""
    code = (
        "from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher\n"
        "import torch._dynamo\n"
        "scale = scaler._get_scale_async()\n"
        "fused = getattr(optimizer, '_step_supports_amp_scaling', False)\n"
        "self._own = 1\n"
        "x = self._own\n"
    )
    path = ROOT / "src" / "probe.py"  # any path under ROOT
    uses = private_uses(path, ast.parse(code), own_names([ast.parse(code)]))
    assert [u.split(": ")[1] for u in uses] == [
        "_MultiProcessingLauncher", "_dynamo", "_get_scale_async", "_step_supports_amp_scaling",
    ]  # fmt: skip


def test_adapter_names_still_exist_and_mean_what_they_say():
    # A fused optimizer unscales in its own step(), and Lightning asks the same attribute to leave it alone.
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    weight = torch.nn.Parameter(torch.ones(2))
    fused, plain = torch.optim.AdamW([weight], fused=True), torch.optim.AdamW([weight])
    assert internals.unscales_in_step(fused) and not internals.unscales_in_step(plain)
    assert _optimizer_handles_unscaling(fused) and not _optimizer_handles_unscaling(plain)

    # The loss scale as a tensor, equal to the public (syncing) get_scale().
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(weight.sum()).backward()
    scale = internals.loss_scale(scaler)
    assert isinstance(scale, torch.Tensor) and float(scale) == scaler.get_scale() == 2.0**10

    # torch.compile's wrapper prefixes state_dict keys (no compilation happens before the first call).
    compiled = torch.compile(torch.nn.Linear(2, 2))
    assert list(compiled.state_dict()) == [internals.COMPILED_PREFIX + "weight", internals.COMPILED_PREFIX + "bias"]
