"""The commands gptlab prints for a user to run: the scripts/prepare_data.py line that prepares (or indexes) a
data config's folder, stating every key that decides what is written, quoted for Hydra and for a POSIX shell."""

import dataclasses
import glob
import os
import re
import shlex
from pathlib import Path

from gptlab.data import index
from gptlab.data.config import DataConfig, PrepareConfig
from gptlab.errors import DataError

# The data keys that decide what a prepare writes (a resumed prepare must get the same), in command-line order
PREPARE_KEYS = ("source", "dir", "hub_config", "train_split", "val_source", "val_fraction", "text_field", "id_field")
PREPARE_SETTINGS = ("max_docs", "max_tokens", "shard_tokens", "filters")
HYDRA_PLAIN = re.compile(r"[\w./:*?~@%+-]+")  # a value Hydra reads as written, unquoted


def token_shards_in(folder: Path) -> bool:
    """Whether `folder` holds token shards the index command can read (named as llm.c names them)."""
    try:
        return bool(index.layout(str(folder)))
    except DataError:
        return False


def prepare_command(cfg: DataConfig) -> str:
    """The scripts/prepare_data.py command that prepares cfg.dir as cfg describes: every key that decides what the
    prepare writes and differs from the data option's own value (so that an interrupted prepare resumes), with local
    paths made absolute (the command runs from the repository, the run may have started elsewhere)."""
    args = [f"data={cfg.name}"]
    keys = ("source", "dir") if index.is_token_shards(cfg) else PREPARE_KEYS
    defaults = option_defaults(cfg.name)
    for key in keys:
        value = getattr(cfg, key)
        if key == "dir":
            value = os.path.abspath(os.path.expanduser(value))
        elif key in ("source", "val_source"):
            value = absolute(value)
        if key in ("source", "dir") or value != defaults.get(key) or (key == "hub_config" and value is not None):
            args.append(f"data.{key}={hydra_value(value)}")
    if not index.is_token_shards(cfg):
        schema = PrepareConfig()
        option = defaults.get("prepare") or {}
        for key in PREPARE_SETTINGS:
            value = getattr(cfg.prepare, key)
            default = option.get(key, getattr(schema, key))
            if key == "filters":
                value = [{k: v for k, v in dataclasses.asdict(f).items() if v is not None} for f in value]
            if value != default:
                args.append(f"data.prepare.{key}={hydra_value(value)}")
    return "python scripts/prepare_data.py " + " ".join(shell_quote(a) for a in args)


def absolute(source: str | None) -> str | None:
    """Local files (a file, folder or glob) by their absolute path; a hub id or split name as it is."""
    if source is None or not (Path(source).expanduser().exists() or glob.has_magic(source)):
        return source
    return os.path.abspath(os.path.expanduser(source))


def option_defaults(name: str) -> dict:
    """The data keys' values with data=<name> alone: the schema's defaults, then what conf/data/<name>.yaml sets."""
    from omegaconf import OmegaConf

    values = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.default is not dataclasses.MISSING}
    root = Path(os.environ.get("GPTLAB_ROOT") or Path(__file__).resolve().parents[3])
    option = root / "conf" / "data" / f"{name}.yaml"
    if option.is_file():
        values |= OmegaConf.to_container(OmegaConf.load(option), resolve=False) or {}
    return values


def hydra_value(value) -> str:
    """`value` as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items() if v is not None) + "}"
    text = str(value)
    if HYDRA_PLAIN.fullmatch(text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shell_quote(word: str) -> str:
    """`word` for a POSIX shell: as it is, in double quotes (Hydra's quotes stay readable), or as shlex quotes it."""
    if word == shlex.quote(word) or re.search(r'["$`\\!]', word):
        return shlex.quote(word)
    return f'"{word}"'


def quoted(path: Path | str) -> str:
    return shell_quote(hydra_value(str(path)))


def source_config(name: str, folder: str) -> DataConfig | None:
    """The data option `name` (conf/data/<name>.yaml) set to prepare into `folder`: how a mixture source named
    after an option is prepared. None when there is no such option."""
    from gptlab.schema import typed

    values = option_defaults(name)
    if values.get("name") != name:
        return None
    return typed(DataConfig, values | {"dir": str(folder)}, "data")
