"""mkdocs hook: writes every config option of a method into its docs page.

A page marks the place with `<!-- options: METHOD -->`; `on_page_markdown` replaces the marker with
one Markdown table per section the method reads (key, type, default, help), built from the config
dataclasses' field help (`mmalign.config_help.iter_options`), so the pages and `mmalign train --help`
show the same text. Loading a method imports only that method's module (`mmalign.registry.load`).
"""

from __future__ import annotations

import re
from typing import Any

from mmalign.config_help import OptionInfo, iter_options, method_sections, run_options

#: `<!-- options: diffusion-dpo -->`: the marker a method page carries, group 1 the method name
MARKER = re.compile(r"<!--\s*options:\s*([\w-]+)\s*-->")


CODE_SPAN = re.compile(r"(`[^`]*`)")


def _cell(text: str) -> str:
    """Help text made safe for a Markdown table cell: outside its code spans, no HTML and no column
    breaks (inside a code span Python-Markdown shows every character as written)."""
    parts = CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return "".join(parts)


def _code(value: str) -> str:
    """`value` as an inline code span (Python-Markdown's tables do not split a row inside one)."""
    return f"`{value}`"


def options_table(options: list[OptionInfo]) -> str:
    """A Markdown table of options: key, type, default, help."""
    rows = ["| key | type | default | help |", "|---|---|---|---|"]
    for o in options:
        rows.append(f"| {_code(o.key)} | {_code(o.type)} | {_code(repr(o.default))} | {_cell(o.help)} |")
    return "\n".join(rows)


def options_markdown(method: str) -> str:
    """Every config key a run of `method` reads, as Markdown: the run's top-level keys, then one
    table per section (a sentence where the method has no such section)."""
    own = method.replace("-", "_")
    parts = [f"#### Top level\n\n{options_table(run_options(method))}"]
    for name, cls in method_sections(method).items():
        title = f"#### `{name}`" + (f" (the options of {method})" if name == own else "")
        if cls is None:
            parts.append(f"{title}\n\n`{method}` has no `{name}` section; a `{name}.*` key is an error.")
        else:
            parts.append(f"{title}\n\n{options_table(list(iter_options(cls, f'{name}.')))}")
    return "\n\n".join(parts)


def render_markers(markdown: str) -> str:
    """`markdown` with every options marker replaced by `options_markdown` of its method."""
    return MARKER.sub(lambda match: options_markdown(match.group(1)), markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """The mkdocs event: runs on every page's Markdown before it is rendered."""
    return render_markers(markdown)
