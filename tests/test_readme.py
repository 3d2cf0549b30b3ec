"""Every command the README shows for train.py, prepare_data.py, sample.py, eval_hellaswag.py and export_hf.py
passes the config checks as written (a sweep: each of its jobs). What needs a GPU, the Hub or a run folder is
not run here; placeholders such as <run> stand for any path."""

import itertools
import re
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep

from gptlab.config import load_config, load_data_config
from gptlab.schema import load
from tests.conftest import ROOT, compose_root, compose_train, script_schemas

SCRIPTS = {"train.py", "prepare_data.py", "sample.py", "eval_hellaswag.py", "eval_harness.py", "export_hf.py"}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, its arguments) for every command line of the README's bash blocks that runs one of SCRIPTS."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(re.sub(r"<[^>]*>", "placeholder", line), comments=True)
            scripts = [i for i, w in enumerate(words) if w.startswith("scripts/") and w[len("scripts/") :] in SCRIPTS]
            if scripts:
                i = scripts[0]
                commands.append((words[i].removeprefix("scripts/"), words[i + 1 :]))
    return commands


COMMANDS = readme_commands()


HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp"}


def jobs(arguments: list[str]) -> list[list[str]]:
    """The overrides of each job: a multirun's comma lists and ranges expanded, Optuna's intervals left to it."""
    overrides, flags = [], iter(arguments)
    for argument in flags:
        if argument in HYDRA_FLAGS_WITH_VALUE:
            next(flags)  # --cfg job, --package optimizer: what to print, not what to run
        elif not argument.startswith("-"):
            overrides.append(argument)
    if "-m" not in arguments:
        return [overrides]
    axes = []
    for o, text in zip(OverridesParser.create().parse_overrides(overrides), overrides):
        if not o.is_sweep_override():
            axes.append([text])
        elif not isinstance(o.value(), IntervalSweep):  # an Optuna search space: the sampler picks the values
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    return [list(job) for job in itertools.product(*axes)]


def check(script: str, overrides: list[str]) -> None:
    root = script.removesuffix(".py")
    if root == "train":
        load_config(compose_train(overrides), command_line=overrides)
    elif root == "prepare_data":
        load_data_config(compose_root("prepare", overrides))
    else:
        load(script_schemas()[root], compose_root(root, overrides))


def test_the_readme_shows_commands_of_every_script():
    assert {script for script, _ in COMMANDS} == SCRIPTS and len(COMMANDS) > 60


@pytest.mark.parametrize("script, arguments", COMMANDS, ids=[" ".join([s, *a])[:90] for s, a in COMMANDS])
def test_readme_command_passes_the_config_checks(script, arguments):
    for overrides in jobs(arguments):
        check(script, overrides)
