"""Every command the README and the pages of docs/ show for train.py, prepare_data.py, sample.py,
eval_hellaswag.py, eval_harness.py and export_hf.py passes the config checks as written (a sweep: each of its jobs).
What needs a GPU, the Hub or a run folder is not run here; placeholders such as <run> stand for any path. The README
stays a front door: short, and linking every page of docs/."""

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


README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # every file whose commands are checked


def readme_commands() -> list[tuple[str, str, list[str]]]:
    """(file, script, its arguments) for every command line of the bash blocks of README.md and docs/*.md that runs
    one of SCRIPTS; the file is named relative to the repository, e.g. docs/configuration.md."""
    commands = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(re.sub(r"<[^>]*>", "placeholder", line), comments=True)
                scripts = [
                    i for i, w in enumerate(words) if w.startswith("scripts/") and w[len("scripts/") :] in SCRIPTS
                ]
                if scripts:
                    i = scripts[0]
                    name = str(page.relative_to(ROOT))
                    commands.append((name, words[i].removeprefix("scripts/"), words[i + 1 :]))
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
    """Between them, the README and docs/ show every script; the README itself shows the quick start's run."""
    assert {script for _, script, _ in COMMANDS} == SCRIPTS and len(COMMANDS) > 60
    assert ("README.md", "train.py", []) in COMMANDS


@pytest.mark.parametrize(
    "page, script, arguments", COMMANDS, ids=[f"{p}: {' '.join([s, *a])}"[:110] for p, s, a in COMMANDS]
)
def test_readme_command_passes_the_config_checks(page, script, arguments):
    for overrides in jobs(arguments):
        check(script, overrides)


def test_the_readme_is_a_front_door():
    """At most 230 lines: the reference material lives in docs/."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 230, f"README.md has {len(lines)} lines; move reference material into docs/"


def heading_anchors(page) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(page) -> list[str]:
    """The relative links of a page's Markdown, e.g. docs/data.md or experiments.md#scaling-ladder."""
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", page.read_text()) if "://" not in t]


def test_the_readme_links_every_page_of_docs():
    linked = {(ROOT / t.split("#")[0]).resolve() for t in links(README) if t.split("#")[0].startswith("docs/")}
    assert DOCS, "docs/ has no pages"
    assert not {p for p in linked if not p.exists()}, "the README links pages that do not exist"
    assert {p.resolve() for p in DOCS} <= linked, "every page of docs/ is linked from the README"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_between_the_pages_resolve(page):
    """Each page's relative links name a file that exists, and a #section that is one of its headings."""
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name} links {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in heading_anchors(file), f"{page.name} links {target}: no such heading"


def test_every_page_of_docs_starts_with_what_it_covers():
    """A title, then one line saying what the page covers, with a link back to the README."""
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[1] == "" and "(../README.md)" in lines[2], page.name
