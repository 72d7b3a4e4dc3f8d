"""Typed config values: the YAML reader, and the conversion of a mapping into a config dataclass
(types converted, unknown keys refused), with errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any

import yaml

from mmalign.errors import UserInputError


class ConfigError(UserInputError):
    """A config file or override that cannot be used; the message names the key."""


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are bools, so `mixed_precision: no` stays a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values, with YAML 1.2 booleans and no Python tags."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to a field's annotated type, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section; expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} expects a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None:
        raise ConfigError(f"config key {key!r} cannot be null")
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError(value)
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        name = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"config key {key!r} expects {name}, got {value!r}") from None
    return value


def unknown_key(key: str, known: list[str], reader: str | None = None) -> ConfigError:
    """The error for `key`, which is not among `known`, suggesting the closest known key."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if reader is None:
        return ConfigError(f"unknown config key {key!r}{hint}")
    return ConfigError(f"config key {key!r} is not read by {reader}{hint} It reads: {', '.join(known)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", reader: str | None = None) -> Any:
    """Build dataclass `cls` from a mapping, converting types and rejecting unknown keys (naming `reader`,
    e.g. "method grpo", in the error when given).

    A class with a `check_values(prefix)` method checks its values' ranges and choices there once built,
    naming each key under the prefix it is read at (`papo.temperature` for PAPO's GRPO options,
    `gan_rm.dpo.beta` for a nested section).
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "method_args"]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key(prefix + key, [prefix + n for n in names], reader)
        kwargs[key] = _convert(value, hints[key], prefix + key)
    built = cls(**kwargs)
    if hasattr(built, "check_values"):
        built.check_values(prefix)
    return built
