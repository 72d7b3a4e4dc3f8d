"""The docs site: a page per registered method listing every option it reads, and a strict mkdocs build."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import typing
from pathlib import Path
from types import ModuleType

import pytest

from mmalign.config import RunConfig
from mmalign.config_help import method_sections
from mmalign.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _hooks() -> ModuleType:
    """`scripts/docs_hooks.py`, the mkdocs hook that writes the options tables."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dotted_keys(cls: type, prefix: str) -> list[str]:
    """Every key of dataclass `cls` as a run config spells it, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _dotted_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _method_keys(method: str) -> list[str]:
    """Every config key a run of `method` reads: the top-level scalars, then each section's keys."""
    sections = method_sections(method)
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in sections and f.name != "method_args"]
    for name, cls in sections.items():
        if cls is not None:
            keys += _dotted_keys(cls, f"{name}.")
    return keys


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_page_lists_every_option(method):
    page = ROOT / "docs" / "methods" / f"{method}.md"
    assert page.is_file(), f"method {method} has no docs page {page.relative_to(ROOT)}"
    text = page.read_text()
    assert f"<!-- options: {method} -->" in text, f"{page.name} lacks its options marker"
    rendered = _hooks().render_markers(text)
    missing = [key for key in _method_keys(method) if f"| `{key}` |" not in rendered]
    assert not missing, f"{page.name} does not list {missing}"
    for name, cls in method_sections(method).items():
        if cls is None:
            assert f"has no `{name}` section" in rendered


def test_mkdocs_build_strict(tmp_path):
    """`mkdocs build --strict`, through mkdocs' own build function so the methods imported above are reused."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (it comes with `pip install -e '.[dev]'`)")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    config = load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
    config.plugins.on_startup(command="build", dirty=False)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mkdocs").addHandler(handler)
    try:
        build(config)
    except Abort as exc:
        pytest.fail(f"mkdocs build --strict failed: {exc}; warnings: {warnings}")
    finally:
        logging.getLogger("mkdocs").removeHandler(handler)
        config.plugins.on_shutdown()
    assert (tmp_path / "site" / "methods" / "diffusion-dpo" / "index.html").is_file()
