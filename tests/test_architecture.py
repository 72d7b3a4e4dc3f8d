"""The import rules of the package: the core never imports a modality, a modality never imports another."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmalign"
MODALITIES = ("image", "video", "mesh", "vlm")
CORE = ("models", "train", "data", "rewards", "losses.py", "config.py", "registry.py", "io.py", "errors.py")


def imports(file: Path) -> set[str]:
    """Every `mmalign...` module a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "mmalign"}


def part_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in MODALITIES else None


def test_the_core_never_imports_a_modality():
    for entry in CORE:
        for file in [PACKAGE / entry] if entry.endswith(".py") else sorted((PACKAGE / entry).rglob("*.py")):
            bad = sorted(m for m in imports(file) if part_of(m))
            assert not bad, f"{file.relative_to(PACKAGE)} imports {bad}"


def test_a_modality_never_imports_another():
    for modality in MODALITIES:
        for file in sorted((PACKAGE / modality).rglob("*.py")):
            bad = sorted(m for m in imports(file) if part_of(m) not in (None, modality))
            assert not bad, f"{file.relative_to(PACKAGE)} imports {bad}"


def test_losses_import_torch_only():
    tree = ast.parse((PACKAGE / "losses.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert {m.split(".")[0] for m in modules if m} <= {"torch", "__future__", "math", "collections", "typing"}


def test_every_registered_evaluator_is_an_evaluator():
    from mmalign.registry import EVALUATORS, load

    for name in EVALUATORS:
        evaluator = load(EVALUATORS, "evaluator", name)
        assert callable(getattr(evaluator, "evaluate", None)), name
