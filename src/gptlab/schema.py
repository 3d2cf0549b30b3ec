"""How gptlab declares a config: dataclasses whose fields hold their default and their rule side by side.

    @dataclass
    class SGDConfig(OptimizerConfig):
        momentum: float = knob(0.9, at_least(0))  # 0: plain SGD

A dataclass is the only home of its defaults: Hydra composes `conf/` on top of it (each option states only
what differs), and code that builds the dataclass directly gets the same values. `check` applies every field's
rule and each config's own `check()` method (rules that tie several of its fields together) and reports the
first failure as a ConfigError naming the dotted key. Groups whose options have different fields (optimizer,
scheduler, ...) register each option's schema with `@option`; Hydra finds it as `<name>_schema` in the group.

This module loads neither torch nor Lightning: a config mistake is reported before either is imported.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from gptlab.errors import ConfigError

# Rules: what a field's value must be, in words that complete "must be ..."


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    text: str  # completes "must be ...", e.g. "> 0"

    def problem(self, value: Any) -> str | None:
        """None if `value` passes, else the message a ConfigError gives."""
        return None if self.test(value) else f"must be {self.text} (got {value!r})"


class OneOf(Rule):
    def __init__(self, *choices: Any):
        super().__init__(lambda value: value in choices, ", ".join("null" if c is None else str(c) for c in choices))

    def problem(self, value: Any) -> str | None:
        return None if self.test(value) else f"unknown option {value!r}; choose one of: {self.text}"


class Required(Rule):
    def __init__(self, what: str):
        super().__init__(lambda value: value is not None, what)

    def problem(self, value: Any) -> str | None:
        return None if self.test(value) else f"is required: {self.text}"


def required(what: str) -> Rule:
    """Not null; `what` says what to give, e.g. "a .ckpt file or a run folder"."""
    return Required(what)


def greater_than(bound: float) -> Rule:
    return Rule(lambda value: value > bound, f"> {bound:g}")


def at_least(bound: float) -> Rule:
    return Rule(lambda value: value >= bound, f">= {bound:g}")


def in_range(low: float, high: float, closed: str = "[]") -> Rule:
    """low..high, each end included where `closed` has a bracket: "[]", "[)", "(]" or "()"."""
    above = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    below = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    return Rule(lambda value: above(value) and below(value), f"in {closed[0]}{low:g}, {high:g}{closed[1]}")


def one_of(*choices: Any) -> Rule:
    return OneOf(*choices)


def optional(rule: Rule) -> Rule:
    """null, or a value that passes `rule`."""
    return Rule(lambda value: value is None or rule.test(value), f"null or {rule.text}")


def each(rule: Rule, count: int) -> Rule:
    """A list of exactly `count` values that each pass `rule`."""
    return Rule(lambda values: len(values) == count and all(map(rule.test, values)), f"{count} numbers {rule.text}")


def length(count: int) -> Rule:
    return Rule(lambda values: len(values) == count, f"a list of {count} numbers")


positive = greater_than(0)
non_negative = at_least(0)


def knob(default: Any, rule: Rule | None = None) -> Any:
    """A config field with its default and the rule its value must pass (mutable defaults are copied per instance)."""
    metadata = {"rule": rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def require(ok: bool, key: str, message: str) -> None:
    """For rules that tie fields together (a config's check() method) or span groups (gptlab.config.validate)."""
    if not ok:
        raise ConfigError(key, message)


def check(config: Any, prefix: str = "") -> None:
    """Every field's rule, depth first, then the config's own check(); a failure names the dotted key."""
    for f in fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            check(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    check(item, f"{key}[{i}].")
        elif isinstance(value, dict):
            for name, item in value.items():
                if is_dataclass(item):
                    check(item, f"{key}.{name}.")
        rule = f.metadata.get("rule")
        problem = rule.problem(value) if rule is not None else None
        if problem is not None:
            raise ConfigError(key, problem)
    own_check = getattr(config, "check", None)
    if own_check is not None:
        try:
            own_check()
        except ConfigError as e:  # its key is relative to the config ("" names the config itself)
            raise ConfigError(f"{prefix}{e.key}" if e.key else prefix.rstrip(".") or "<config>", e.message) from None


# Groups whose options have different fields: the schema of each option, found by its `name`.

OPTIONS: dict[str, dict[str, type]] = {}  # group -> option name -> schema


def option(group: str) -> Callable[[type], type]:
    """Class decorator (above @dataclass): the schema of the `group` option named by the class's `name` default.
    conf/<group>/<option>.yaml starts from it with `defaults: [<name>_schema]`."""

    def register(schema: type) -> type:
        name = schema.name
        OPTIONS.setdefault(group, {})[name] = schema
        ConfigStore.instance().store(group=group, name=f"{name}_schema", node=schema)
        return schema

    return register


def schema_of(group: str, node: Any) -> type:
    """The schema of a group's option: the type Hydra composed it with, else the one its `name` registered."""
    if isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node)):
        return OmegaConf.get_type(node)
    name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
    options = OPTIONS[group]
    if name not in options:
        raise ConfigError(f"{group}.name", f"unknown option {name!r}; choose one of: {', '.join(options)}")
    return options[name]


def load(schema: type, cfg: DictConfig | dict, prefix: str = "") -> Any:
    """A config (a script's root, or the group at `prefix`) as a checked instance of `schema`: resolved, typed,
    every rule applied; a ConfigError names the key with its prefix."""
    config = typed(schema, resolve(cfg), prefix)
    check(config, f"{prefix}." if prefix else "")
    return config


def resolve(cfg: DictConfig | dict) -> dict:
    """Plain values, interpolations resolved; a value that does not resolve is a ConfigError naming its key."""
    try:
        return OmegaConf.to_container(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as e:
        raise config_error(e) from None


def typed(schema: type, node: Any, prefix: str = "") -> Any:
    """`node` (a dict or DictConfig, resolved) as an instance of the dataclass `schema`, its defaults filled in.
    Wrong types, unknown keys and missing values raise a ConfigError naming the key."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        raise config_error(e, prefix) from None


def config_error(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    """OmegaConf's exception (from Hydra's composition or from `typed`) as a one-line ConfigError, by its type."""
    key = ".".join(part for part in (prefix, e.full_key or str(e.key or "")) if part) or "<config>"
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):  # a key the schema does not have
        return ConfigError(key, f"unknown key; known: {', '.join(_known_keys(e))}")
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(key, "is required but has no value")
    expected = _field_types(e.object_type).get(str(e.key)) if isinstance(e, ValidationError) else None
    if expected is not None:  # a value of the wrong type
        return ConfigError(key, f"must be {_type_name(expected)} (got {getattr(e, 'value', None)!r})")
    return ConfigError(key, str(e).strip().splitlines()[0])


def _known_keys(e: OmegaConfBaseException) -> list[str]:
    if e.object_type is not None and is_dataclass(e.object_type):
        return [f.name for f in fields(e.object_type)]
    return [str(k) for k in e.parent_node.keys()] if isinstance(e.parent_node, DictConfig) else []


def _field_types(schema: type) -> dict[str, Any]:
    return {f.name: f.type for f in fields(schema)} if is_dataclass(schema) else {}


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_name(annotation: Any) -> str:
    if annotation in TYPE_NAMES:
        return TYPE_NAMES[annotation]
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and type(None) in getattr(annotation, "__args__", ()):  # Optional[X]
        return f"null or {_type_name(args[0])}"
    if is_dataclass(annotation):
        return f"a mapping with {annotation.__name__}'s keys"
    if getattr(annotation, "__origin__", None) is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return str(annotation)
