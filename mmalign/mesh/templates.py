"""Starting meshes for reward-guided generation: (prompt, mesh) rows from a folder, or the mesh world's.

Sources (`data.path` of `method: mesh-guided`):
- a folder holding `templates.jsonl` (or the `.jsonl` file itself): one object per line with
  `prompt` and `mesh` (a path relative to the JSONL's folder: .obj, .glb, .gltf, .ply, .stl or
  .off), e.g. your generator's outputs for each prompt; every problem raises a `DataError` naming
  the file, the row (1-based line) and the field, and a mesh that cannot be used names its file;
- `embedded:mesh-templates`: immature meshes of the embedded mesh world, the stand-in for a
  text-to-3D pipeline's intermediate states (3D-MeshPref includes such states for the same
  reason): for each prompt of a split, `per_prompt` clean meshes corrupted by `kinds` in turn at
  `strength`. The default, noisy surfaces, is a defect that moving vertices can repair and that
  the gold score grades (0.49 on average at strength ½). Crumpled folds score a gold 0 at any
  strength above ≈ 0.4 however they are moved, holes and wrong shapes need a change of topology
  that vertex offsets cannot make, and flipped patches need faces turned over. Compositions whose
  parts are pushed into each other (`intersecting`) need the parts moved apart, which
  `mesh_guided.part_translation_scale` lets the reward do.

Every template is loaded and validated like any mesh (`mmalign.mesh.io.load_mesh`) and put in the
unit box, the frame the reward reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from mmalign.config import ConfigError, DataSource, option
from mmalign.data.pairs import DataError, inside, jsonl_rows
from mmalign.mesh import world
from mmalign.mesh.io import SUFFIXES, load_mesh
from mmalign.registry import EMBEDDED_PREFIX, unknown_name_error

EMBEDDED_TEMPLATES = "mesh-templates"
TEMPLATES_JSONL = "templates.jsonl"


@dataclass
class EmbeddedTemplatesConfig:
    """How `data.path: embedded:mesh-templates` is generated from the mesh world."""

    split: str = option("prompts of this mesh-world split: heldout (never seen by the reward) or train", "heldout")
    per_prompt: int = option("templates per prompt", 2)
    kinds: list[str] = option(
        "corruptions of the clean meshes, used in turn: noisy (also crumpled, holed, flipped, wrong)",
        default_factory=lambda: ["noisy"],
    )
    strength: float = option("corruption strength in (0, 1]: how far from clean the templates start", 0.5)
    seed: int = option("seed of the meshes' proportions and corruptions", 0)


@dataclass(frozen=True)
class Template:
    """One starting mesh (unit box) and the prompt it is optimised for."""

    prompt: str
    mesh: trimesh.Trimesh
    name: str  # a file-name stem for exports: "<row>-<prompt slug>"


def slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:48]


def embedded_templates(config: EmbeddedTemplatesConfig) -> list[Template]:
    """The world's immature meshes (see the module doc), in prompt order."""
    unknown = sorted(set(config.kinds) - set(world.BAD_KINDS))
    if unknown or not config.kinds:
        raise ConfigError(f"templates.kinds must be a non-empty subset of {world.BAD_KINDS}, got {config.kinds}")
    if not 0.0 < config.strength <= 1.0:
        raise ConfigError(f"templates.strength must lie in (0, 1], got {config.strength}")
    if config.per_prompt < 1:
        raise ConfigError(f"templates.per_prompt must be at least 1, got {config.per_prompt}")
    out = []
    for index, prompt in enumerate(world.prompts(config.split)):
        for j in range(config.per_prompt):
            rng = np.random.default_rng([config.seed, index, j])
            mesh = world.bad_mesh(prompt, rng, config.kinds[j % len(config.kinds)], config.strength)
            out.append(Template(prompt, load_mesh(mesh), f"{len(out):03d}-{slug(prompt)}"))
    return out


def read_templates(path: Path) -> list[Template]:
    """Rows of a `templates.jsonl` (a folder holding one, or the file), their meshes loaded and validated."""
    file = path / TEMPLATES_JSONL if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{path}: expected a {TEMPLATES_JSONL} file or a folder holding one")
    out = []
    for line, row in jsonl_rows(file, ("prompt", "mesh")):
        where = f"{file}, row {line}"
        prompt, mesh = row["prompt"], row["mesh"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}, field 'prompt': expected a non-empty string, got {prompt!r}")
        if not isinstance(mesh, str) or Path(mesh).suffix.lower() not in SUFFIXES:
            raise DataError(f"{where}, field 'mesh': expected a mesh path ({', '.join(SUFFIXES)}), got {mesh!r}")
        out.append(
            Template(
                prompt, load_mesh(inside(file.parent, mesh, f"{where}, field 'mesh'")), f"{len(out):03d}-{slug(prompt)}"
            )
        )
    if not out:
        raise DataError(f"{file}: no templates")
    return out


@dataclass
class TemplateDataConfig(DataSource):
    """The `data` section of `mesh-guided`: the starting meshes."""

    path: str = option(
        "a folder with templates.jsonl (or the file), or embedded:mesh-templates", default="embedded:mesh-templates"
    )


def load_templates(source: str, embedded: EmbeddedTemplatesConfig) -> list[Template]:
    """`data.path` → templates (see the module doc)."""
    if source.startswith(EMBEDDED_PREFIX):
        name = source[len(EMBEDDED_PREFIX) :]
        if name != EMBEDDED_TEMPLATES:
            raise unknown_name_error("embedded template set", name, [EMBEDDED_TEMPLATES])
        return embedded_templates(embedded)
    return read_templates(Path(source))
