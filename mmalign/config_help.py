"""The config keys a run reads, listed with their types, defaults and help: `mmalign train --help` and the
docs' option tables (`scripts/docs_hooks.py`) both read them from the config dataclasses here."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from mmalign.config import SHARED_SECTIONS, RunConfig, TrainConfig, section_classes


@dataclass(frozen=True)
class OptionInfo:
    """One config key as `--help` and the docs show it: dotted key, type, default and help."""

    key: str
    type: str
    default: Any
    help: str


def type_name(annotation: Any) -> str:
    """A field annotation as written in the source: `int | None`, `list[str]`, `dict[str, Any]`."""
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation).removeprefix("typing."))


def iter_options(cls: type, prefix: str = "", shown: dict[str, Any] | None = None) -> typing.Iterator[OptionInfo]:
    """Every field of dataclass `cls` as an `OptionInfo` keyed `prefix + name`, nested sections flattened;
    `shown` replaces the default shown for some keys (of `cls` itself)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "method_args" or f.name in SHARED_SECTIONS and cls is RunConfig:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_options(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = (shown or {}).get(f.name, default)
        yield OptionInfo(f"{prefix}{f.name}", type_name(hints[f.name]), default, f.metadata.get("help", ""))


def run_options(method: str | None = None) -> list[OptionInfo]:
    """The top-level keys every run has (`method`, `seed`, …), `method` shown as `method` when given."""
    return list(iter_options(RunConfig, "", {"method": method} if method else None))


def method_sections(method: str) -> dict[str, type | None]:
    """`{section: dataclass or None}` of every section a run of `method` reads: the shared sections
    (`section_classes`), then the method's own (`diffusion_dpo` for `diffusion-dpo`)."""
    from mmalign.registry import METHODS, load

    method_class = load(METHODS, "method", method)
    return {**section_classes(method_class), method.replace("-", "_"): method_class.config_class}


def _option_lines(options: typing.Iterable[OptionInfo]) -> list[str]:
    return [f"  {o.key} = {o.default!r}\n      {o.help}" for o in options]


def help_text(method: str | None = None) -> str:
    """Every config key a run of `method` reads, with its default and help (`mmalign train --help`);
    without a method, the keys every run shares."""
    lines = _option_lines(run_options(method))
    if method is None:
        lines += _option_lines(iter_options(TrainConfig, "train."))
        lines.append(
            "\n  The model, data and eval sections and the method's own section depend on the method: "
            "`mmalign train CONFIG --help` or `mmalign train --help METHOD` lists them."
        )
        return "\n".join(lines)
    sections = method_sections(method)
    own = method.replace("-", "_")
    for name, cls in sections.items():
        if cls is None:
            lines.append(f"\n  [{name}] method {method} has no {name} section")
            continue
        lines.append(f"\n  [{name}] options of method {method}:" if name == own else f"\n  [{name}]")
        lines += _option_lines(iter_options(cls, f"{name}."))
    return "\n".join(lines)
