"""`embedded:meshes`: an unpaired, scored mesh set generated from the embedded mesh world and cached.

For every prompt of the world, `good_per_prompt` clean meshes and `bad_per_prompt` corrupted
ones (cycling through `bad_kinds`; noisy, crumpled and deformed ones at random strengths, so the set
holds mild, immature geometry as well as plainly broken meshes) are built, scored
`5 × gold_score` (the programmatic judge stands in for a human rater here; the reward is then
measured on held-out prompts the training rows never show), and written as a `meshes.jsonl`
folder in the format a user's data takes, with `split` (the world's train / held-out prompts)
and `kind` (`good` or the corruption) per row.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mmalign.config import ConfigError, option
from mmalign.io import atomic_directory
from mmalign.mesh import world

EMBEDDED_MESHES = "meshes"
MESHES_JSONL = "meshes.jsonl"


@dataclass
class EmbeddedMeshesConfig:
    """How `data.path: embedded:meshes` is generated from the mesh world."""

    prompts: str = option(
        "core (the world's 16 hand-picked prompts) or grammar (all 92 the grammar makes: more compositions to "
        "generalise from; the held-out prompts are the same)",
        "core",
    )
    good_per_prompt: int = option("clean meshes per prompt", 8)
    bad_per_prompt: int = option("dispreferred meshes per prompt, cycling through bad_kinds", 8)
    bad_kinds: list[str] = option(
        "corruptions used: noisy, holed, crumpled, flipped, wrong (another prompt's clean mesh)",
        default_factory=lambda: list(world.BAD_KINDS),
    )
    floating_per_prompt: int = option(
        "extra dispreferred meshes per `on` prompt whose upper part floats above the lower one (kind floating): "
        "they teach a reward that parts rest on each other; 0 = none (the shipped rewards' set)",
        0,
    )
    displaced_per_prompt: int = option(
        "extra meshes per two-part prompt whose parts sit just off contact, within ±0.1 (unit box) of touching "
        "(kind displaced, `world.displaced_mesh`): scored like any mesh, so they fall on both sides of the judge's "
        "contact tolerance and teach a reward where resting ends; 0 = none",
        0,
    )
    min_strength: float = option(
        "noisy, crumpled and deformed meshes are corrupted with a strength drawn uniformly from [min_strength, 1]: "
        "milder ones are the immature states a generator passes through (1 = full corruption only)",
        0.25,
    )
    seed: int = option("seed of the meshes' proportions and corruptions", 0)


def embedded_meshes_directory(config: EmbeddedMeshesConfig, cache: Path) -> Path:
    """The cache folder of this configuration: keyed by the options and the world's source code."""
    blob = json.dumps([asdict(config), inspect.getsource(world)], sort_keys=True)
    return cache / EMBEDDED_MESHES / hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_embedded_meshes(config: EmbeddedMeshesConfig, directory: Path) -> Path:
    """Write the mesh folder (PLY files + `meshes.jsonl`) to `directory` atomically; return it."""
    unknown = sorted(set(config.bad_kinds) - set(world.BAD_KINDS))
    if unknown or not config.bad_kinds:
        raise ConfigError(
            f"meshes.embedded.bad_kinds must be a non-empty subset of {world.BAD_KINDS}, got {config.bad_kinds}"
        )
    if config.good_per_prompt < 1 or config.bad_per_prompt < 1:
        raise ConfigError("meshes.embedded.good_per_prompt and bad_per_prompt must be at least 1")
    if not 0.0 < config.min_strength <= 1.0:
        raise ConfigError(f"meshes.embedded.min_strength must lie in (0, 1], got {config.min_strength}")
    if config.prompts not in world.PROMPT_SETS:
        known = ", ".join(world.PROMPT_SETS)
        raise ConfigError(f"meshes.embedded.prompts must be one of {known}, got {config.prompts!r}")
    heldout, good = set(world.HELDOUT), config.good_per_prompt
    if config.floating_per_prompt < 0 or config.displaced_per_prompt < 0:
        raise ConfigError("meshes.embedded.floating_per_prompt and displaced_per_prompt must be non-negative")
    jobs = []
    for index, prompt in enumerate(world.PROMPT_SETS[config.prompts]):
        kinds = ["good"] * good + [config.bad_kinds[j % len(config.bad_kinds)] for j in range(config.bad_per_prompt)]
        spec = world.parse_prompt(prompt)
        if spec.relation == "on":
            kinds += ["floating"] * config.floating_per_prompt
        if len(spec.parts) == 2:
            kinds += ["displaced"] * config.displaced_per_prompt
        jobs += [(index, prompt, kind) for kind in kinds]
    rows = []
    with atomic_directory(directory) as tmp:
        (tmp / "meshes").mkdir()
        for number, (index, prompt, kind) in enumerate(tqdm(jobs, desc="building embedded:meshes", unit="mesh")):
            rng = np.random.default_rng([config.seed, index, number])
            if kind == "good":
                mesh = world.good_mesh(prompt, rng)
            elif kind == "floating":
                mesh = world.floating_mesh(prompt, rng)
            elif kind == "displaced":
                mesh = world.displaced_mesh(prompt, rng)
            else:
                mesh = world.bad_mesh(prompt, rng, kind, strength=rng.uniform(config.min_strength, 1.0))
            name = f"meshes/{number:05d}.ply"
            mesh.export(tmp / name)
            split = "heldout" if prompt in heldout else "train"
            score = round(5.0 * world.gold_score(mesh, prompt), 4)
            rows.append({"prompt": prompt, "mesh": name, "score": score, "split": split, "kind": kind})
        (tmp / MESHES_JSONL).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory
