"""Every default has one home: its schema. An option in conf/ states only what it changes, a preset only what
differs from the config it is applied to, and a schema built in code equals the one Hydra composes."""

import dataclasses
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gptlab.config import TrainConfig
from gptlab.schema import schema_of
from tests.conftest import CONF, script_schemas

# conf/<root>.yaml: the scripts' configs
ROOTS = ("train", "prepare", "sample", "eval_hellaswag", "eval_harness", "export_hf")
PRESETS = ("experiment", "debug", "hparams_search")  # `# @package _global_`
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", *PRESETS))
MODIFIERS = {"arch": "model"}  # groups whose options change another group's node (`# @package model`)
SINGLE_SCHEMA = {f.name: f.type for f in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(f.type)}


SCRIPT_SCHEMAS = script_schemas()  # and registers them with Hydra


def leaves(node, prefix: str = "") -> dict[str, object]:
    """Dotted path -> value of every leaf (a list is a leaf)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def body(path: Path) -> dict:
    """What a yaml states, beside its defaults list and Hydra's own settings."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    return {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}


def compose_with(conf: Path, root: str, overrides: list[str]) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = compose(config_name=root, overrides=overrides, return_hydra_config=root == "train")
    return OmegaConf.to_container(cfg, resolve=False)


def yaml_files(conf: Path) -> list[tuple[Path, str, list[str], str]]:
    """(file, root config, overrides that select it, the package its body lands in) for every option and preset."""
    files = [(conf / f"{root}.yaml", root, [], "") for root in ROOTS]
    for group in [*GROUPS, *PRESETS]:
        package = "" if group in PRESETS else MODIFIERS.get(group, group)
        for path in sorted((conf / group).glob("*.yaml")):
            files.append((path, "train", [f"{group}={path.stem}"], package))
    for path in sorted((conf / "hydra" / "launcher").glob("*.yaml")):  # on top of the plugins' own schemas
        files.append((path, "train", [f"hydra/launcher={path.stem}"], "hydra.launcher"))
    return files


def sweep_variants(conf: Path, overrides: list[str]) -> list[list[str]]:
    """A preset's own sweep over group options (e.g. optimizer: adamw,adam): each choice is a config its values
    are applied to. Without one, the preset alone."""
    params = (compose_with(conf, "train", overrides)["hydra"].get("sweeper") or {}).get("params") or {}
    variants = [list(overrides)]
    for o in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        if o.key_or_group in GROUPS and o.is_sweep_override():
            variants = [[*v, f"{o.key_or_group}={choice}"] for v in variants for choice in o.sweep_string_iterator()]
    return variants


def restated_defaults(conf: Path) -> list[str]:
    """`<file>: <key>` for every key a yaml states with the value the config has without it (in every job of
    the preset's sweep): a default stated twice."""
    found = []
    for path, root, overrides, package in yaml_files(conf):
        stated = leaves(body(path), package)
        if not stated:
            continue
        original = path.read_text()
        raw = OmegaConf.load(path)
        kept = {k: raw[k] for k in ("defaults", "hydra") if k in raw}
        header = "".join(line for line in original.splitlines(keepends=True) if line.startswith("# @package"))
        path.write_text(header + (OmegaConf.to_yaml(OmegaConf.create(kept)) if kept else ""))
        try:
            bases = [leaves(compose_with(conf, root, v)) for v in sweep_variants(conf, overrides)]
        finally:
            path.write_text(original)
        name = str(path.relative_to(conf))
        found += [f"{name}: {k}" for k, value in stated.items() if all(b.get(k, "<absent>") == value for b in bases)]
    return found


@pytest.fixture(scope="module")
def restated_in_conf(tmp_path_factory) -> list[str]:
    """On a copy of conf/: the check rewrites each yaml while it composes, and a run started meanwhile from the
    repository (a sweep beside the test suite) would read the rewritten file."""
    conf = tmp_path_factory.mktemp("defaults") / "conf"
    shutil.copytree(CONF, conf)
    return restated_defaults(conf)


def test_no_default_is_stated_twice(restated_in_conf):
    assert restated_in_conf == []


@pytest.mark.slow  # the whole check again, on a copy of conf/
def test_the_check_finds_a_restated_default(tmp_path):
    """The check above can fail: a default restated in an option, in a preset, or in a preset's parent is found;
    a changed value is not."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    with (conf / "optimizer" / "adamw.yaml").open("a") as f:
        f.write("lr: 3.0e-3\nbetas: [0.9, 0.95]\neps: 1.0e-7\n")  # eps differs from the default
    with (conf / "experiment" / "cpu_ablation.yaml").open("a") as f:
        f.write("grad_clip: 1.0\n")
    with (conf / "experiment" / "ablate_schedules.yaml").open("a") as f:
        f.write("max_tokens: 24576\n")  # as cpu_ablation, its parent, has it
    found = restated_defaults(conf)
    assert sorted(found) == [
        "experiment/ablate_schedules.yaml: max_tokens",
        "experiment/cpu_ablation.yaml: grad_clip",
        "optimizer/adamw.yaml: optimizer.betas",
        "optimizer/adamw.yaml: optimizer.lr",
    ]


def test_a_presets_value_needed_by_one_job_of_its_sweep_is_not_restated(restated_in_conf):
    """ablate_schedules' warmup of 8 is cosine's default but not constant's (0); ablate_adamw_vs_adam_l2's weight
    decay 0.1 is adamw's but not adam's: both are needed, and not reported."""
    stated = leaves(body(CONF / "experiment" / "ablate_schedules.yaml"))
    assert stated["scheduler.warmup_steps"] == 8
    assert "experiment/ablate_schedules.yaml: scheduler.warmup_steps" not in restated_in_conf
    assert leaves(body(CONF / "experiment" / "ablate_adamw_vs_adam_l2.yaml"))["optimizer.weight_decay"] == 0.1


def option_schema(group: str, node: dict) -> type:
    return SINGLE_SCHEMA[group] if group in SINGLE_SCHEMA else schema_of(group, node)


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS if g not in MODIFIERS for p in sorted((CONF / g).glob("*.yaml"))],
    ids=lambda x: x,
)
def test_dataclass_built_option_equals_the_composed_one(group, option):
    """The schema with the option's stated values, built in code, is the option Hydra composes: no value comes
    from anywhere else (a default restated elsewhere, a root that overrides a group)."""
    composed = compose_with(CONF, "train", [f"{group}={option}"])[group]
    schema = option_schema(group, composed)
    built = OmegaConf.merge(OmegaConf.structured(schema), body(CONF / group / f"{option}.yaml"))
    assert OmegaConf.to_container(built, resolve=False) == composed


def test_dataclass_built_roots_equal_the_composed_ones():
    """TrainConfig's top-level keys, and every script's root, are their schemas' defaults."""
    train = compose_with(CONF, "train", [])
    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False)
    scalars = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in SINGLE_SCHEMA]
    scalars = [k for k in scalars if not isinstance(train[k], dict)]
    assert {k: train[k] for k in scalars} == {k: defaults[k] for k in scalars}
    for root, schema in SCRIPT_SCHEMAS.items():
        assert compose_with(CONF, root, []) == OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)
