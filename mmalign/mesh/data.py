"""Unpaired scored mesh sets for reward training: read, validated, thresholded, split, sampled once.

Sources (`data.path`):
- a folder holding `meshes.jsonl` (or the `.jsonl` file): one object per line with `prompt`,
  `mesh` (a path relative to the JSONL's folder: .obj, .glb, .gltf, .ply, .stl or .off),
  `score` (a number in [0, 5]) and optionally `label` (1, 0 or null: when given it must agree
  with the thresholds), `split` (`train` or `heldout`) and `kind` (a free tag, reported per kind);
- a folder with `preferred/` and `dispreferred/` mesh folders and a `prompts.jsonl` whose rows
  `{"mesh": "preferred/a.obj", "prompt": "..."}` give every mesh its prompt. Folders carry no
  score: a preferred mesh stands for score 5 and a dispreferred one for 0;
- `embedded:meshes`: the embedded mesh world's set (`mmalign.mesh.embedded`), generated once
  into the data cache.

Thresholds split rows into preferred (`score ≥ preferred_min`, 4.0) and dispreferred
(`score ≤ dispreferred_max`, 3.5); rows in between are dropped. Without `split` fields a seeded
`holdout_fraction` of the prompts is held out. Every problem raises a `DataError` naming the file,
the row (1-based line) and the field. Each mesh is sampled once (`mesh_points`, seeded) and the
`(K, N, 6)` samples are cached under the data cache, keyed by the files and the sampling options.

`StratifiedDraws` and `PairDraws` turn a set into training items `{"preferred": i,
"dispreferred": j}`: unpaired stratified draws for RewardCS, same-prompt pairs for Bradley–Terry.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from mmalign.config import CachedDataSource, ConfigError, option
from mmalign.data.pairs import DataError, inside, jsonl_rows
from mmalign.data.sources import cache_root
from mmalign.io import atomic_write_bytes, cache_lock
from mmalign.mesh.embedded import (
    EMBEDDED_MESHES,
    MESHES_JSONL,
    EmbeddedMeshesConfig,
    build_embedded_meshes,
    embedded_meshes_directory,
)
from mmalign.mesh.io import SUFFIXES, MeshInputError
from mmalign.mesh.points import mesh_points
from mmalign.registry import EMBEDDED_PREFIX, unknown_name_error

PROMPTS_JSONL = "prompts.jsonl"
CLASS_FOLDERS = ("preferred", "dispreferred")
SPLITS = ("train", "heldout")
MAX_SCORE = 5.0
CACHE_BLOCK = 256  # rows per cached block of surface samples (`sample_rows`)


@dataclass
class MeshDataConfig(CachedDataSource):
    """The `data` section of the mesh reward methods."""

    path: str = option(
        "a folder with meshes.jsonl (or the file), a folder with preferred/, dispreferred/ and "
        "prompts.jsonl, or embedded:meshes",
        default="embedded:meshes",
    )


@dataclass
class MeshSetConfig:
    """Which meshes count as preferred and dispreferred, and how the held-out split is made."""

    preferred_min: float = option("a score at or above this is preferred", 4.0)
    dispreferred_max: float = option("a score at or below this is dispreferred (scores between are dropped)", 3.5)
    holdout_fraction: float = option(
        "share of prompts held out for evaluation when rows carry no split (at least one, never all)", 0.25
    )
    split_seed: int = option("seed of that prompt split", 0)
    embedded: EmbeddedMeshesConfig = option(
        "generation of data.path=embedded:meshes", default_factory=EmbeddedMeshesConfig
    )


@dataclass(frozen=True)
class MeshRow:
    """One usable mesh: `preferred` from the thresholds, `where` = "<file>, row N" for messages."""

    prompt: str
    mesh: Path
    score: float
    preferred: bool
    where: str
    split: str | None = None
    kind: str | None = None


@dataclass
class MeshSet:
    """Rows of one split and their surface samples `points (K, N, C)` (or `(draws, K, N, C)`; C = 6 or 7)."""

    rows: list[MeshRow]
    points: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.rows]

    @property
    def scores(self) -> torch.Tensor:
        """`(K,)` float32 scores in [0, 5]."""
        return torch.tensor([r.score for r in self.rows], dtype=torch.float32)

    @property
    def preferred(self) -> torch.Tensor:
        """`(K,)` bool."""
        return torch.tensor([r.preferred for r in self.rows], dtype=torch.bool)

    @property
    def kinds(self) -> list[str | None]:
        return [r.kind for r in self.rows]


# ----------------------------------------------------------------------------------------------
# Reading and validation


def _check_mesh_path(value: object, root: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected a mesh path, got {value!r}")
    path = inside(root, value, where)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{where}: {value!r} is not a mesh file; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{where}: mesh file not found: {path}")
    return path


def _check_prompt(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: prompt must be a non-empty string, got {value!r}")
    return value


def _check_score(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_SCORE:
        raise DataError(f"{where}: score must be a number in [0, {MAX_SCORE:g}], got {value!r}")
    return float(value)


def classify(score: float, config: MeshSetConfig) -> bool | None:
    """True (preferred), False (dispreferred) or None (between the thresholds: dropped)."""
    if score >= config.preferred_min:
        return True
    if score <= config.dispreferred_max:
        return False
    return None


def read_meshes_jsonl(path: Path, config: MeshSetConfig) -> list[MeshRow]:
    """Rows of a `meshes.jsonl` whose score is outside the dropped band, checked field by field."""
    rows = []
    for line_no, row in jsonl_rows(path, ("prompt", "mesh", "score")):
        where = f"{path}, row {line_no}"
        prompt = _check_prompt(row["prompt"], f"{where}, field 'prompt'")
        mesh = _check_mesh_path(row["mesh"], path.parent, f"{where}, field 'mesh'")
        score = _check_score(row["score"], f"{where}, field 'score'")
        preferred = classify(score, config)
        label = row.get("label")
        if label is not None:
            if label not in (0, 1) or isinstance(label, bool):
                raise DataError(f"{where}, field 'label': expected 1, 0 or null, got {label!r}")
            if preferred is None or preferred != bool(label):
                verdict = {True: "preferred", False: "dispreferred", None: "between the thresholds"}[preferred]
                raise DataError(
                    f"{where}, field 'label': label {label} contradicts score {score:g}, which is {verdict} "
                    f"(preferred ≥ {config.preferred_min:g}, dispreferred ≤ {config.dispreferred_max:g})"
                )
        split = row.get("split")
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}, field 'split': expected train, heldout or null, got {split!r}")
        kind = row.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise DataError(f"{where}, field 'kind': expected a string, got {kind!r}")
        if preferred is not None:
            rows.append(MeshRow(prompt, mesh, score, preferred, where, split, kind))
    return rows


def read_class_folders(root: Path) -> list[MeshRow]:
    """Rows of a `preferred/` + `dispreferred/` folder pair; prompts from `root/prompts.jsonl`."""
    prompts_file = root / PROMPTS_JSONL
    if not prompts_file.is_file():
        raise DataError(f"{prompts_file}: missing; it gives each mesh of {'/ and '.join(CLASS_FOLDERS)}/ its prompt")
    prompts: dict[Path, tuple[str, str]] = {}
    for line_no, row in jsonl_rows(prompts_file, ("mesh", "prompt")):
        where = f"{prompts_file}, row {line_no}"
        mesh = _check_mesh_path(row["mesh"], root, f"{where}, field 'mesh'")
        if mesh.relative_to(root).parts[0] not in CLASS_FOLDERS:
            raise DataError(f"{where}, field 'mesh': {row['mesh']!r} is not inside {' or '.join(CLASS_FOLDERS)}/")
        if mesh in prompts:
            raise DataError(f"{where}, field 'mesh': {row['mesh']!r} already has a prompt ({prompts[mesh][1]})")
        prompts[mesh] = (_check_prompt(row["prompt"], f"{where}, field 'prompt'"), where)
    rows = []
    for folder in CLASS_FOLDERS:
        for mesh in sorted(p for p in (root / folder).rglob("*") if p.suffix.lower() in SUFFIXES):
            if mesh not in prompts:
                raise DataError(f"{mesh}: no prompt for this mesh in {prompts_file}")
            prompt, where = prompts[mesh]
            preferred = folder == "preferred"
            rows.append(MeshRow(prompt, mesh, MAX_SCORE if preferred else 0.0, preferred, where))
    return rows


def read_mesh_rows(source: Path, config: MeshSetConfig) -> list[MeshRow]:
    """The usable rows of a mesh set (see the module doc); a `DataError` when none are left."""
    if not config.dispreferred_max < config.preferred_min:
        raise ConfigError(
            f"meshes.dispreferred_max ({config.dispreferred_max:g}) must be below meshes.preferred_min "
            f"({config.preferred_min:g})"
        )
    if source.is_dir() and (source / MESHES_JSONL).is_file():
        source = source / MESHES_JSONL
    if source.is_file() and source.suffix == ".jsonl":
        rows = read_meshes_jsonl(source, config)
    elif source.is_dir() and all((source / name).is_dir() for name in CLASS_FOLDERS):
        rows = read_class_folders(source)
    else:
        raise DataError(
            f"{source}: not a mesh set; expected a {MESHES_JSONL} (or a folder holding one) or a folder with "
            f"{' and '.join(f'{name}/' for name in CLASS_FOLDERS)} and {PROMPTS_JSONL}"
        )
    if not rows:
        raise DataError(
            f"{source}: no meshes outside the dropped score band ({config.dispreferred_max:g}, "
            f"{config.preferred_min:g})"
        )
    return rows


def split_rows(rows: list[MeshRow], config: MeshSetConfig, source: str) -> tuple[list[MeshRow], list[MeshRow]]:
    """`(train, heldout)`: by the rows' `split` fields, else a seeded share of prompts held out.

    Both splits must hold both classes.
    """
    with_split = [r for r in rows if r.split is not None]
    if with_split and len(with_split) != len(rows):
        missing = next(r for r in rows if r.split is None)
        raise DataError(
            f"{missing.where}, field 'split': missing, but other rows have one; give all rows a split or none"
        )
    if with_split:
        held = {i for i, r in enumerate(rows) if r.split == "heldout"}
    else:
        prompts = sorted({r.prompt for r in rows})
        order = np.random.default_rng(config.split_seed).permutation(len(prompts))
        count = min(len(prompts) - 1, max(1, math.ceil(config.holdout_fraction * len(prompts))))
        chosen = {prompts[i] for i in order[:count]}
        held = {i for i, r in enumerate(rows) if r.prompt in chosen}
    splits = ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])
    for name, part in zip(SPLITS, splits):
        for preferred, label in ((True, "preferred"), (False, "dispreferred")):
            if not any(r.preferred == preferred for r in part):
                raise DataError(
                    f"{source}: the {name} split holds no {label} meshes ({len(part)} rows); reward training needs "
                    "both classes in both splits (check the scores, thresholds, split fields or holdout_fraction)"
                )
    return splits


# ----------------------------------------------------------------------------------------------
# Surface samples


def sample_rows(rows: list[MeshRow], n: int, seed: int, cache: Path | None = None, parts: bool = False) -> torch.Tensor:
    """`(K, n, 6)` surface samples of every row's mesh (`(K, n, 7)` with `parts`: `mesh_points`), cached.

    The cache holds blocks of `CACHE_BLOCK` consecutive rows, each keyed by its files (resolved path,
    size, modification time), `n`, `seed` and `parts`: rows appended to a set (a rounds run adding
    rated meshes) re-sample only the last block.
    """
    blocks = [rows[start : start + CACHE_BLOCK] for start in range(0, len(rows), CACHE_BLOCK)]
    with tqdm(total=len(rows), desc="sampling meshes", unit="mesh", disable=len(rows) < 64) as bar:
        return torch.cat([_sample_block(block, n, seed, cache, parts, bar) for block in blocks])


def _sample_block(rows: list[MeshRow], n: int, seed: int, cache: Path | None, parts: bool, bar: tqdm) -> torch.Tensor:
    file = None
    if cache is not None:
        stats = [(str(r.mesh.resolve()), r.mesh.stat().st_size, r.mesh.stat().st_mtime_ns) for r in rows]
        key_fields = [n, seed, "parts", stats] if parts else [n, seed, stats]  # labelled samples: their own key
        key = hashlib.sha256(json.dumps(key_fields).encode()).hexdigest()[:24]
        file = cache / f"{key}.safetensors"
        if file.is_file():
            bar.update(len(rows))
            return load_file(file)["points"]
    samples = []
    for row in rows:
        try:
            samples.append(mesh_points(row.mesh, n, seed, parts=parts))
        except MeshInputError as exc:
            raise DataError(f"{row.where}, field 'mesh': {exc}") from None
        bar.update(1)
    points = torch.stack(samples)
    if file is not None:
        atomic_write_bytes(file, save({"points": points.contiguous()}))
    return points


def resolve_mesh_source(data: CachedDataSource, config: MeshSetConfig) -> Path:
    """`data.path` as a path; `embedded:meshes` is generated into the data cache on first use."""
    if not data.path.startswith(EMBEDDED_PREFIX):
        return Path(data.path)
    name = data.path[len(EMBEDDED_PREFIX) :]
    if name != EMBEDDED_MESHES:
        raise unknown_name_error("embedded mesh set", name, [EMBEDDED_MESHES])
    directory = embedded_meshes_directory(config.embedded, cache_root(data))
    with cache_lock(directory):
        if not (directory / MESHES_JSONL).is_file():
            build_embedded_meshes(config.embedded, directory)
    return directory


def load_mesh_sets(
    data: CachedDataSource, config: MeshSetConfig, points: int, seed: int, train_draws: int = 1, parts: bool = False
) -> tuple[MeshSet, MeshSet]:
    """`(train, heldout)` sets of `data.path` with `points` surface samples per mesh drawn with `seed`.

    The training set holds `train_draws` independent draws per mesh (seeds `seed`, `seed + 1`, …):
    its `points` are `(train_draws, K, N, 6)`; the held-out set holds the `seed` draw, `(K, N, 6)`.
    `parts` adds each sample's part label as a 7th channel.
    """
    source = resolve_mesh_source(data, config)
    train, heldout = split_rows(read_mesh_rows(source, config), config, str(source))
    cache = cache_root(data) / "mesh-points"
    train_points = torch.stack([sample_rows(train, points, seed + d, cache, parts) for d in range(train_draws)])
    return MeshSet(train, train_points), MeshSet(heldout, sample_rows(heldout, points, seed, cache, parts))


# ----------------------------------------------------------------------------------------------
# Training items


def same_prompt_pairs(prompts: list[str], preferred: torch.Tensor, every: bool, seed: int = 0) -> torch.Tensor:
    """`(P, 2)` long: (preferred index, dispreferred index) pairs that share a prompt.

    `every`: all such combinations (evaluation). Otherwise each prompt's two lists are shuffled
    (seeded) and zipped, the shorter one repeated, so every mesh of a prompt holding both classes
    is in at least one pair and no pair repeats (training). Prompts with one class give no pairs.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for prompt in dict.fromkeys(prompts):
        mine = np.array([i for i, p in enumerate(prompts) if p == prompt])
        wins, losses = mine[preferred[mine].numpy()], mine[~preferred[mine].numpy()]
        if not len(wins) or not len(losses):
            continue
        if every:
            pairs.extend((int(w), int(lo)) for w in wins for lo in losses)
        else:
            wins, losses = rng.permutation(wins), rng.permutation(losses)
            count = max(len(wins), len(losses))
            pairs.extend((int(wins[i % len(wins)]), int(losses[i % len(losses)])) for i in range(count))
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


class PairDraws(torch.utils.data.Dataset):
    """Fixed pairs `(P, 2)` as items `{"preferred": i, "dispreferred": j}` (the Bradley–Terry baseline)."""

    def __init__(self, pairs: torch.Tensor):
        if len(pairs) == 0:
            raise DataError("no same-prompt (preferred, dispreferred) pairs to train on")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"preferred": int(self.pairs[i, 0]), "dispreferred": int(self.pairs[i, 1])}


class StratifiedDraws(torch.utils.data.Dataset):
    """Unpaired, stratified items: item i of an epoch joins the i-th preferred and the i-th dispreferred
    mesh of two seeded per-epoch permutations, the smaller class repeated.

    A batch of B items therefore holds B preferred and B dispreferred meshes, from any prompts
    (the CS term uses no pairing). The length is the larger class's size; the trainer calls
    `set_epoch` so every epoch re-draws the combinations.
    """

    def __init__(self, preferred: torch.Tensor, seed: int):
        """`preferred (K,)` bool over the training rows."""
        self.wins = torch.nonzero(preferred).flatten()
        self.losses = torch.nonzero(~preferred).flatten()
        if not len(self.wins) or not len(self.losses):
            raise DataError("stratified batches need both preferred and dispreferred meshes")
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self.order_w = self.wins[torch.randperm(len(self.wins), generator=generator)]
        self.order_l = self.losses[torch.randperm(len(self.losses), generator=generator)]

    def __len__(self) -> int:
        return max(len(self.wins), len(self.losses))

    def __getitem__(self, i: int) -> dict[str, int]:
        return {
            "preferred": int(self.order_w[i % len(self.order_w)]),
            "dispreferred": int(self.order_l[i % len(self.order_l)]),
        }
