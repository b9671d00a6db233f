"""Typed YAML configs with dotted CLI overrides.

A config is a dataclass schema; YAML files and `a.b=value` overrides are merged onto it.
A key the schema does not have is an error naming the key and the closest valid one, so a
typo never silently falls back to a default. Some sections are *variants*: their schema is
chosen by their own `name` field (each method has its own parameters).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .io import write_text_atomic
from .registry import closest

# Keys that name or place a run but do not change what it computes.
NON_SEMANTIC_KEYS = (
    "run.name",
    "run.output_dir",
    "data.num_workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.progress",
)
# ... and the seed: runs of one recipe with different seeds share a recipe hash (one board row).
RECIPE_IGNORED_KEYS = (*NON_SEMANTIC_KEYS, "run.seed")


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


def _load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return cfg


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override: {err}") from None


def _check_keys(user: Any, schema: Any, source: str, prefix: str = "") -> None:
    """Raise on the first key in `user` that `schema` lacks, suggesting the closest full key."""
    if not isinstance(user, DictConfig) or not isinstance(schema, DictConfig):
        return
    for key in user.keys():
        full = f"{prefix}{key}"
        if key not in schema:
            siblings = [f"{prefix}{k}" for k in schema.keys()]
            raise ConfigError(f"{source}: unknown config key {full!r}{closest(full, siblings)}")
        child_schema = schema._get_node(key)
        if not isinstance(child_schema, DictConfig) or child_schema._is_none():
            continue
        # Recurse into dataclass sections only: a Dict field (e.g. data.options) takes any key,
        # but each entry of a Dict of dataclasses (a pipeline's tasks) is checked as a section.
        if child_schema._metadata.object_type not in (None, dict):
            _check_keys(user._get_node(key), child_schema, source, f"{full}.")
        elif dataclasses.is_dataclass(child_schema._metadata.element_type):
            entry_schema = OmegaConf.structured(child_schema._metadata.element_type)
            entries = user._get_node(key)
            for name in entries.keys() if isinstance(entries, DictConfig) else ():
                _check_keys(entries._get_node(name), entry_schema, source, f"{full}.{name}.")


def _open_dict_fields(cfg: DictConfig) -> None:
    """Let Dict-typed fields (e.g. data.options) take any key; dataclass sections stay closed."""
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none():
            if node._metadata.object_type in (None, dict):
                OmegaConf.set_struct(node, False)
            else:
                _open_dict_fields(node)


def build_config(
    schema: type,
    paths: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    variants: Mapping[str, Callable[[str], type]] | None = None,
) -> DictConfig:
    """Merge YAML files (in order) and dotted overrides onto `schema`, checking every key.

    `variants` maps a section name to a function from that section's `name` to its dataclass.
    """
    sources = [(str(p), _load_yaml(p)) for p in paths]
    sources.append(("overrides", _parse_overrides(overrides)))
    base = OmegaConf.structured(schema)
    for section, resolve in (variants or {}).items():
        merged_names = OmegaConf.merge(*(cfg for _, cfg in sources)) if sources else {}
        name = OmegaConf.select(merged_names, f"{section}.name", default=None)
        if name is None:
            name = OmegaConf.select(base, f"{section}.name", default=None)
        if name is None:
            raise ConfigError(f"config needs {section}.name")
        try:
            section_schema = OmegaConf.structured(resolve(str(name)))
        except KeyError as err:
            raise ConfigError(f"{section}.name: {err.args[0]}") from None
        OmegaConf.set_struct(base, False)
        base[section] = section_schema
        OmegaConf.set_struct(base, True)
    _open_dict_fields(base)
    for source, cfg in sources:
        _check_keys(cfg, base, source)
        try:
            base = OmegaConf.merge(base, cfg)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            msg = str(err).splitlines()[0]
            raise ConfigError(f"{source}: bad value for {key!r}: {msg}") from None
    OmegaConf.set_readonly(base, True)
    return base


def check_choices(cfg: DictConfig, choices: dict[str, Sequence]) -> None:
    """Reject a value outside its key's allowed set (keys dotted), naming the key and the set."""
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def config_hash(cfg: DictConfig | dict, ignore: Sequence[str] = NON_SEMANTIC_KEYS) -> str:
    """sha256 of the resolved config, without the keys that only name or place the run."""
    data = to_dict(cfg) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    for dotted in ignore:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def recipe_hash(cfg: DictConfig | dict) -> str:
    """config_hash without the seed: what a leaderboard row is keyed by."""
    return config_hash(cfg, RECIPE_IGNORED_KEYS)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))
