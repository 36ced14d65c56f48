"""Typed configuration: configs/default.yaml, deep-merged with an override file and flags.

Every stage reads its settings from one `Config` of pydantic dataclasses (the sections,
pipelines/core/config_sections.py), validated when built. Unknown keys, wrong types and
out-of-range values fail fast with a `ConfigError` that names the key and, when the
config was loaded from files, the file (or the overrides) that set it.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from pipelines.core.config_sections import (
    AdapterConfig, AugmentConfig, DecodeConfig, DuplicatesConfig, EmbedConfig, FeaturesConfig,
    FetchConfig, FusionConfig, IndexConfig, ModelConfig, RunnerConfig, ServingConfig, SECTION)
from pipelines.core.errors import BadInputError

__all__ = [
    "AdapterConfig", "AugmentConfig", "Config", "ConfigError", "DEFAULT_CONFIG_PATH",
    "DecodeConfig", "DuplicatesConfig", "EmbedConfig", "FeaturesConfig", "FetchConfig",
    "FusionConfig", "IndexConfig", "ModelConfig", "RunnerConfig", "ServingConfig",
    "from_dict", "load_config", "read_yaml"]

# configs/default.yaml, shipped inside the package (pipelines/configs/default.yaml is a
# symlink to it that setuptools packages as a file) so a wheel install has the same defaults.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(BadInputError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True, config=SECTION)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    fetch: FetchConfig = dataclasses.field(default_factory=FetchConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    embed: EmbedConfig = dataclasses.field(default_factory=EmbedConfig)
    features: FeaturesConfig = dataclasses.field(default_factory=FeaturesConfig)
    fusion: FusionConfig = dataclasses.field(default_factory=FusionConfig)
    runner: RunnerConfig = dataclasses.field(default_factory=RunnerConfig)
    index: IndexConfig = dataclasses.field(default_factory=IndexConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    duplicates: DuplicatesConfig = dataclasses.field(default_factory=DuplicatesConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with some keys of some sections changed, e.g. replace(index={"shards": 4})."""
        return from_dict(_deep_merge(self.to_dict(), sections))


_CONFIG = TypeAdapter(Config)

# pydantic error types -> what the message says (the rest use pydantic's own words).
_PLAIN = {
    "int_type": "expected an integer", "float_type": "expected a number",
    "string_type": "expected a string", "bool_type": "must be true or false",
    "tuple_type": "expected a list", "list_type": "expected a list",
    "dict_type": "expected a mapping", "dataclass_type": "expected a mapping",
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "too_short": "must list at least {min_length}", "too_long": "must list at most {max_length}",
    "literal_error": "must be one of {expected}",
}


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _sets(data: Any, path: Sequence[str]) -> bool:
    for part in path:
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def _known(loc: Sequence[str]) -> str:
    cls: Any = Config
    for part in loc:
        cls = {f.name: f.type for f in dataclasses.fields(cls)}[part]
        cls = globals()[cls] if isinstance(cls, str) else cls
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _message(err: ErrorDetails, layers: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One pydantic error as today's wording: the key path, what is wrong, where it was set."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    loc = [str(p) for p in err["loc"] if isinstance(p, str)]
    if ctx.get("key"):  # a check of a whole section names the key it refuses
        loc.append(str(ctx["key"]))
    key = ".".join(loc) + "".join(f"[{p}]" for p in err["loc"] if isinstance(p, int))
    source = next((label for label, data in layers if _sets(data, loc)), None)
    where = f" (set in {source})" if source else ""
    if kind == "unexpected_keyword_argument":
        what = "section" if len(loc) == 1 else "key"
        name = repr(key) if len(loc) == 1 else key
        return f"unknown config {what} {name}{where}; known: {_known(loc[:-1])}"
    if not loc:
        return f"config must be a mapping of sections, got {type(err['input']).__name__}"
    if len(loc) == 1:
        return f"config section {key}: expected a mapping, got {err['input']!r:.80}{where}"
    if kind in _PLAIN:
        return (f"config key {key}: {_PLAIN[kind].format(**ctx)}, "
                f"got {err['input']!r:.80}{where}")
    return f"config key {key}: {err['msg']}{where}"


def from_dict(data: Mapping[str, Any],
              layers: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> Config:
    """Build and validate a Config from nested plain data (as read from YAML). `layers`:
    (file or "overrides", its data), latest first, to name where a refused key was set."""
    if isinstance(data, Mapping):  # an empty section (`model:` in YAML) is the defaults
        data = {name: {} if value is None else value for name, value in data.items()}
    try:
        return _CONFIG.validate_python(data)
    except ValidationError as e:
        first: dict[tuple[str, ...], str] = {}  # one message per key (a list item's is enough)
        for err in e.errors():
            keys = tuple(str(p) for p in err["loc"] if isinstance(p, str))
            first.setdefault(keys, _message(err, layers))
        raise ConfigError("; ".join(first.values())) from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file (local path or any Beam FileSystems URI)."""
    p = str(path)
    try:
        if "://" in p:
            from apache_beam.io.filesystems import FileSystems
            with FileSystems.open(p) as f:
                text = f.read().decode("utf-8")
        else:
            text = Path(p).read_text(encoding="utf-8")
    except (OSError, IOError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return data


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """configs/default.yaml, deep-merged with the file at `path` and then `overrides`."""
    data = read_yaml(DEFAULT_CONFIG_PATH)
    layers: list[tuple[str, Mapping[str, Any]]] = [(str(DEFAULT_CONFIG_PATH), data)]
    if path is not None:
        layers.insert(0, (str(path), read_yaml(path)))
        data = _deep_merge(data, layers[0][1])
    if overrides:
        layers.insert(0, ("the overrides", overrides))
        data = _deep_merge(data, overrides)
    return from_dict(data, layers)
