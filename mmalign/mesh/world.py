"""The embedded mesh world: prompts about primitives and simple compositions, good and bad meshes, a gold score.

A prompt names one part ("a torus", "a tall box") or two parts related by "on" or "next to"
("a sphere on a cube", "a cone next to a cube"). Meshes are z-up and axis-aligned, resting on
z = 0, in arbitrary units (the gold score normalises to the unit box first). `good_mesh` builds a
clean, watertight, outward-wound mesh that matches its prompt with random proportions within the
prompt's meaning; `bad_mesh` corrupts one (`BAD_KINDS`) or builds another prompt's mesh.

The gold score (`gold_checks`) judges any triangle mesh against a prompt with plain geometry, so
it is a fair judge of any generator of this world; no training objective may use it. It is the
product of geometry checks (closed, consistently and outward oriented, no zero-area faces, smooth,
no folds) and prompt checks (one connected component per part, each part's shape class from how
much of its bounding box its convex hull fills and whether its vertical axis is empty, its
proportions, and the relation between parts). Each check lies in [0, 1], with linear ramps where
a defect has a size, so a clean mesh of the right shape scores near 1 and any clear defect pulls
the product down.

Prompts are split by an explicit list into `train` and `heldout`; held-out prompts combine the
same part names and relations in combinations training never sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.spatial import ConvexHull, QhullError

from mmalign.mesh.io import normalise_to_unit_box


@dataclass(frozen=True)
class Part:
    """One named primitive: its shape class and the proportions its name asks for."""

    shape: str  # "box" | "sphere" | "cylinder" | "cone" | "torus"
    form: str  # "cube" | "tall" | "flat" | "round" | "regular" | "upright" | "lying"


PARTS: dict[str, Part] = {
    "sphere": Part("sphere", "round"),
    "cube": Part("box", "cube"),
    "tall box": Part("box", "tall"),
    "flat box": Part("box", "flat"),
    "cylinder": Part("cylinder", "regular"),
    "tall cylinder": Part("cylinder", "tall"),
    "cone": Part("cone", "upright"),
    "torus": Part("torus", "lying"),
}
RELATIONS: tuple[str, ...] = ("on", "next to")
PROMPTS: tuple[str, ...] = (
    "a sphere",
    "a cube",
    "a tall box",
    "a flat box",
    "a cylinder",
    "a tall cylinder",
    "a cone",
    "a torus",
    "a sphere on a cube",
    "a cone on a cylinder",
    "a cube on a flat box",
    "a sphere on a cylinder",
    "a torus on a cube",
    "a cube next to a sphere",
    "a cone next to a cube",
    "a sphere next to a torus",
)
HELDOUT: tuple[str, ...] = ("a tall cylinder", "a sphere on a cylinder", "a torus on a cube", "a cone next to a cube")
BAD_KINDS: tuple[str, ...] = ("noisy", "holed", "crumpled", "flipped", "wrong", "deformed", "intersecting")

_SECTIONS = 32  # around the axis of revolved parts; their profiles are cut into edges of the same length

# Shape classes: convex-hull volume ÷ axis-aligned bounding-box volume of a clean part.
_FILL = {"box": 1.0, "cylinder": 0.78, "sphere": 0.52, "cone": 0.26}
_FILL_TOLERANCE = (0.05, 0.2)  # |fill − target| up to the first scores 1, from the second 0
_AXIS_RADIUS = 0.25  # share of the half-width around the vertical axis searched for surface
_HOLLOW_SHARE = 0.003  # less surface than this share near the axis: the axis is empty (a torus)
_SURFACE_SAMPLES = 2048
_TOUCH = 0.03  # unit-box tolerance for "resting on" and "beside"
_ZERO_AREA = 1e-10  # in unit-box units²
_DEGENERATE_SHARE = 0.02  # this share of zero-area faces scores 0
_SMOOTH_DEGREES = (12.0, 30.0)  # median dihedral angle between adjacent face normals: 1 below, 0 above
_FOLD_DEGREES = 140.0  # adjacent faces turned further than this are folded over each other
_FOLD_SHARE = 0.03  # this share of folded adjacencies scores 0
_MISWOUND_SHARE = 0.01  # this share of edges traversed the same way by both their faces scores 0
_HOLE_SHARE = 0.05  # this share of boundary edges scores 0 (any boundary at all halves the score)


@dataclass(frozen=True)
class MeshPrompt:
    """A parsed prompt; `relation` relates `parts[0]` to `parts[1]` ("on": parts[0] rests on parts[1])."""

    parts: tuple[Part, ...]
    names: tuple[str, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        if self.relation is None:
            return f"a {self.names[0]}"
        return f"a {self.names[0]} {self.relation} a {self.names[1]}"


def parse_prompt(prompt: str) -> MeshPrompt:
    """Any prompt of the grammar `a P` | `a P on a Q` | `a P next to a Q`; ValueError otherwise."""
    text = " ".join(prompt.strip().lower().split())
    for relation in RELATIONS:
        head, sep, tail = text.partition(f" {relation} a ")
        if sep:
            names = (head.removeprefix("a "), tail)
            if head.startswith("a ") and all(name in PARTS for name in names):
                return MeshPrompt(tuple(PARTS[name] for name in names), names, relation)
            raise ValueError(f"not a mesh-world prompt: {prompt!r}")
    name = text.removeprefix("a ")
    if text.startswith("a ") and name in PARTS:
        return MeshPrompt((PARTS[name],), (name,))
    raise ValueError(f"not a mesh-world prompt: {prompt!r} (parts: {', '.join(PARTS)})")


def _same_meaning(prompt: str) -> tuple[tuple[str, ...], str | None]:
    """A key equal for prompts that mean the same ("a P next to a Q" = "a Q next to a P")."""
    spec = parse_prompt(prompt)
    return (tuple(sorted(spec.names)) if spec.relation == "next to" else spec.names), spec.relation


def _grammar_prompts() -> tuple[str, ...]:
    """`PROMPTS` first, then every other prompt the grammar makes, one wording per meaning."""
    names = list(PARTS)
    candidates = [f"a {a}" for a in names]
    candidates += [f"a {a} on a {b}" for a in names for b in names if a != b]
    candidates += [f"a {a} next to a {b}" for i, a in enumerate(names) for b in names[i + 1 :]]
    out, seen = list(PROMPTS), {_same_meaning(p) for p in PROMPTS}
    for prompt in candidates:
        if _same_meaning(prompt) not in seen:
            seen.add(_same_meaning(prompt))
            out.append(prompt)
    return tuple(out)


#: "core": the 16 hand-picked prompts; "grammar": every prompt of the grammar (92), for a reward
#: that must generalise to new compositions. Held-out prompts (and their rewordings) are the same.
PROMPT_SETS: dict[str, tuple[str, ...]] = {"core": PROMPTS, "grammar": _grammar_prompts()}


def prompts(split: str, prompt_set: str = "core") -> list[str]:
    """The prompts of a split (`"train"` or `"heldout"`) of a prompt set, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; expected one of {', '.join(PROMPT_SETS)}")
    return [p for p in PROMPT_SETS[prompt_set] if (p in HELDOUT) == (split == "heldout")]


# ----------------------------------------------------------------------------------------------
# Good meshes


def _part_mesh(part: Part, rng: np.random.Generator) -> trimesh.Trimesh:
    """A clean part centred on the z axis, resting on z = 0, with random proportions within its form.

    Triangles are close to uniform in size (no long slivers), so vertex noise and folds show the
    same way on every part.
    """
    u = rng.uniform
    if part.shape == "sphere":
        mesh = trimesh.creation.icosphere(subdivisions=3, radius=u(0.35, 0.6))
    elif part.shape == "box":
        if part.form == "cube":
            extents = np.full(3, u(0.7, 1.1))
        elif part.form == "tall":
            w, d = u(0.35, 0.55), u(0.35, 0.55)
            extents = np.array([w, d, max(w, d) * u(2.2, 3.0)])
        else:  # flat
            w, d = u(0.9, 1.3), u(0.9, 1.3)
            extents = np.array([w, d, min(w, d) * u(0.12, 0.25)])
        mesh = _grid_box(extents, step=float(extents.max()) / 12)
    elif part.shape == "cylinder":
        radius = u(0.3, 0.5) if part.form == "regular" else u(0.2, 0.35)
        height = 2 * radius * (u(0.8, 1.25) if part.form == "regular" else u(2.2, 3.0))
        mesh = _revolved([(0, 0), (radius, 0), (radius, height), (0, height)], radius)
    elif part.shape == "cone":
        radius = u(0.35, 0.55)
        mesh = _revolved([(0, 0), (radius, 0), (0, radius * u(1.5, 2.5))], radius)
    elif part.shape == "torus":
        major = u(0.4, 0.6)
        mesh = trimesh.creation.torus(major, major * u(0.2, 0.4), major_sections=_SECTIONS, minor_sections=16)
    else:
        raise ValueError(f"unknown shape {part.shape!r}")
    lower, upper = mesh.bounds
    mesh.apply_translation([-(lower[0] + upper[0]) / 2, -(lower[1] + upper[1]) / 2, -lower[2]])
    return mesh


def _revolved(profile: list[tuple[float, float]], radius: float) -> trimesh.Trimesh:
    """Revolve a closed `(r, z)` profile (from and to the axis) about z, its edges cut to the section width."""
    step = 2 * np.pi * radius / _SECTIONS
    points = [np.asarray(profile[0], float)]
    for a, b in zip(np.asarray(profile[:-1], float), np.asarray(profile[1:], float)):
        pieces = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        points.extend(a + (b - a) * t for t in np.linspace(0, 1, pieces + 1)[1:])
    return trimesh.creation.revolve(np.array(points), sections=_SECTIONS)


def _grid_box(extents: np.ndarray, step: float) -> trimesh.Trimesh:
    """A closed box centred at the origin, each side a grid of squares-ish cells no wider than `step`."""
    cells = np.maximum(1, np.ceil(extents / step)).astype(int)
    axes = [np.linspace(-e / 2, e / 2, n + 1) for e, n in zip(extents, cells)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (n0+1, n1+1, n2+1, 3)
    on_surface = np.zeros(grid.shape[:3], bool)
    for a in range(3):
        on_surface[(slice(None),) * a + (0,)] = on_surface[(slice(None),) * a + (-1,)] = True
    index = np.full(grid.shape[:3], -1)
    index[on_surface] = np.arange(on_surface.sum())
    faces = []
    for a in range(3):  # the two sides normal to axis a; (b, c) follow a cyclically, so b × c points along +a
        b, c = (a + 1) % 3, (a + 2) % 3
        for side, outward in ((0, False), (cells[a], True)):
            layer = np.moveaxis(index, (a, b, c), (0, 1, 2))[side]  # (n_b+1, n_c+1)
            q00, q10, q11, q01 = layer[:-1, :-1], layer[1:, :-1], layer[1:, 1:], layer[:-1, 1:]
            tris = np.concatenate([np.stack([q00, q10, q11], -1), np.stack([q00, q11, q01], -1)]).reshape(-1, 3)
            faces.append(tris if outward else tris[:, ::-1])
    return trimesh.Trimesh(grid[on_surface], np.concatenate(faces), process=False)


def good_mesh(prompt: str, rng: np.random.Generator, overlap: float = 0.0) -> trimesh.Trimesh:
    """A clean watertight mesh for `prompt`: one component per part, placed as the relation says.

    `overlap` > 0 (for `bad_mesh`'s `intersecting`) pushes the parts into each other: the upper
    part sinks by that share of its height, or side-by-side parts overlap by that share of the
    narrower one's width. Without it the random draws and the mesh are those of a clean mesh.
    """
    spec = parse_prompt(prompt)
    meshes = [_part_mesh(part, rng) for part in spec.parts]
    if spec.relation == "on":
        upper, lower = meshes
        half = lower.extents[:2] / 2
        sunk = overlap * upper.extents[2]
        upper.apply_translation([*(rng.uniform(-0.2, 0.2, 2) * half), lower.bounds[1, 2] - sunk])
    elif spec.relation == "next to":
        axis = int(rng.integers(2))  # side by side along x or y, in either order
        sign = 1.0 if rng.random() < 0.5 else -1.0
        gap = rng.uniform(0.1, 0.3)
        if overlap > 0:
            gap = -overlap * min(m.extents[axis] for m in meshes)
        for mesh, direction in zip(meshes, (-sign, sign)):
            offset = np.zeros(3)
            offset[axis] = direction * (mesh.extents[axis] + gap) / 2
            mesh.apply_translation(offset)
    return meshes[0] if len(meshes) == 1 else trimesh.util.concatenate(meshes)


# ----------------------------------------------------------------------------------------------
# Bad meshes


def bad_mesh(prompt: str, rng: np.random.Generator, kind: str, strength: float = 1.0) -> trimesh.Trimesh:
    """A dispreferred mesh for `prompt`: a good one corrupted by `kind`, or (`"wrong"`) another prompt's.

    - `noisy`: every vertex jittered by 0.2–0.35 mean edge lengths (a roughness that shows the same
      whatever the tessellation);
    - `holed`: 2–4 patches of faces removed;
    - `crumpled`: 8–15 % of vertices thrown 10–25 % of the size in random directions, so faces fold
      over and pass through each other;
    - `flipped`: the winding of 2–4 patches reversed (their normals point inwards);
    - `wrong`: a clean mesh for a different prompt of `PROMPTS`;
    - `intersecting`: parts that pass through each other: a composition's parts pushed 15–40 %
      into one another, or a single part with a half-size copy of itself stuck through its side;
    - `deformed`: a smooth warp (three random sine waves across the mesh, each moving vertices by
      4–10 % of the size along a random direction): a clean surface whose boxes bend and whose
      cylinders bulge, so the shape or proportions no longer match the prompt (spheres, cones and
      tori often survive it).

    `strength` in (0, 1] scales the displacements of `noisy`, `crumpled`, `deformed` and
    `intersecting` (a milder, "immature" mesh, as a generator's intermediate state; the other kinds
    ignore it). The random draws do not depend on it: the same `rng` state gives the same mesh
    moved `strength` of the way from clean.
    """
    if kind not in BAD_KINDS:
        raise ValueError(f"unknown bad kind {kind!r}; expected one of {BAD_KINDS}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    if kind == "wrong":
        others = [p for p in PROMPTS if p != parse_prompt(prompt).text]
        return good_mesh(others[int(rng.integers(len(others)))], rng)
    if kind == "intersecting":
        overlap = strength * rng.uniform(0.15, 0.4)
        mesh = good_mesh(prompt, rng, overlap=overlap)
        if len(parse_prompt(prompt).parts) == 2:
            return mesh
        stray = mesh.copy().apply_scale(0.5)
        centre = mesh.bounds.mean(axis=0)
        centre[0] = mesh.bounds[1, 0] - overlap * mesh.extents[0]  # half-size copy through the +x side
        stray.apply_translation(centre - stray.bounds.mean(axis=0))
        return trimesh.util.concatenate([mesh, stray])
    mesh = good_mesh(prompt, rng)
    size = float(mesh.extents.max())
    vertices = mesh.vertices.copy()
    faces = mesh.faces.copy()
    if kind == "noisy":
        vertices += strength * rng.normal(0.0, rng.uniform(0.2, 0.35) * mesh.edges_unique_length.mean(), vertices.shape)
    elif kind == "deformed":
        for _ in range(3):
            frequency = rng.normal(size=3)
            frequency *= 2 * np.pi * rng.uniform(0.5, 1.2) / size / np.linalg.norm(frequency)
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            wave = np.sin(mesh.vertices @ frequency + rng.uniform(0, 2 * np.pi))
            vertices += strength * wave[:, None] * direction * rng.uniform(0.04, 0.1) * size
    elif kind == "crumpled":
        chosen = rng.random(len(vertices)) < rng.uniform(0.08, 0.15)
        directions = rng.normal(size=(int(chosen.sum()), 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        vertices[chosen] += strength * directions * rng.uniform(0.1, 0.25, (len(directions), 1)) * size
    else:  # holed or flipped: patches of faces around random faces
        patch = _random_patches(mesh, rng, count=int(rng.integers(2, 5)), radius=rng.uniform(0.08, 0.14) * size)
        if kind == "holed":
            faces = faces[~patch]
        else:
            faces[patch] = faces[patch][:, ::-1]
    out = trimesh.Trimesh(vertices, faces, process=False)
    out.remove_unreferenced_vertices()
    return out


def floating_mesh(prompt: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """A clean mesh for an `on` prompt whose upper part floats: lifted 8–30 % of the larger part's size.

    Not in `BAD_KINDS` (it exists for `on` prompts only): a dispreferred mesh that teaches a reward
    that resting parts touch, which meshes pushed into each other (`intersecting`) alone do not.
    """
    spec = parse_prompt(prompt)
    if spec.relation != "on":
        raise ValueError(f"a floating mesh needs an 'on' prompt, got {prompt!r}")
    upper, lower = sorted(good_mesh(prompt, rng).split(only_watertight=False), key=lambda c: -c.bounds[0, 2])
    upper.apply_translation([0.0, 0.0, rng.uniform(0.08, 0.3) * max(upper.extents.max(), lower.extents.max())])
    return trimesh.util.concatenate([upper, lower])


def displaced_mesh(prompt: str, rng: np.random.Generator, reach: float = 0.1) -> trimesh.Trimesh:
    """A clean composition in the unit box whose parts sit just off contact: within `reach` of touching.

    The parts are moved to a gap `g ~ U(−reach, reach)` (`parts_at_gap`; g < 0: into each other). The
    gold judge accepts |g| up to `_TOUCH` on `on` (and any g ≥ −`_TOUCH` beside), so these meshes lie on
    both sides of its contact tolerance: the near misses a guided part ends in, which clean, floating and
    intersecting meshes (all well away from it) never show a reward.
    """
    spec = parse_prompt(prompt)
    if len(spec.parts) != 2:
        raise ValueError(f"a displaced mesh needs a two-part prompt, got {prompt!r}")
    mesh = normalise_to_unit_box(good_mesh(prompt, rng))
    return parts_at_gap(mesh, spec.relation, rng.uniform(-reach, reach))


def parts_at_gap(mesh: trimesh.Trimesh, relation: str, gap: float) -> trimesh.Trimesh:
    """A two-part `mesh` with its higher part moved so that the parts' gap is `gap` (mesh units; < 0: overlap).

    `on`: the upper part's bottom lies `gap` above the lower part's top; `next to`: the parts' boxes are
    `gap` apart along the horizontal axis their centres differ most on.
    """
    if relation not in ("on", "next to"):
        raise ValueError(f"unknown relation {relation!r}; expected 'on' or 'next to'")
    parts = mesh.split(only_watertight=False)
    if len(parts) != 2:
        raise ValueError(f"parts_at_gap needs a mesh of two parts, got {len(parts)}")
    first, second = sorted(parts, key=lambda c: -c.bounds[0, 2])
    offset = np.zeros(3)
    if relation == "on":
        offset[2] = gap - (first.bounds[0, 2] - second.bounds[1, 2])
    else:
        axis = int(np.argmax(np.abs(first.centroid - second.centroid)[:2]))
        if first.centroid[axis] > second.centroid[axis]:
            offset[axis] = gap - (first.bounds[0, axis] - second.bounds[1, axis])
        else:
            offset[axis] = (second.bounds[0, axis] - first.bounds[1, axis]) - gap
    return trimesh.util.concatenate([first.apply_translation(offset), second])


def _random_patches(mesh: trimesh.Trimesh, rng: np.random.Generator, count: int, radius: float) -> np.ndarray:
    """`(F,)` bool: faces whose centroid lies within `radius` of one of `count` random face centroids."""
    centres = mesh.triangles_center
    seeds = centres[rng.choice(len(centres), size=count, replace=False)]
    return (np.linalg.norm(centres[:, None] - seeds[None], axis=-1) < radius).any(axis=1)


# ----------------------------------------------------------------------------------------------
# Gold score


def _ramp(value: float, one: float, zero: float) -> float:
    """1 at `one`, 0 at `zero`, linear between and clipped (either order)."""
    return float(np.clip((value - zero) / (one - zero), 0.0, 1.0))


def geometry_checks(mesh: trimesh.Trimesh) -> dict[str, float]:
    """Mesh quality in [0, 1] each, for a mesh in the unit box: closed, oriented, nondegenerate, smooth, unfolded."""
    n = len(mesh.vertices)
    _, edge_counts = np.unique(mesh.edges_sorted @ np.array([n, 1]), return_counts=True)  # one int key per edge
    boundary = float(np.mean(edge_counts == 1))
    closed = 1.0 if mesh.is_watertight else 0.5 * _ramp(boundary, 0.0, _HOLE_SHARE)
    # A directed edge used twice means two faces traverse it the same way: their windings disagree.
    _, directed_counts = np.unique(mesh.edges @ np.array([n, 1]), return_counts=True)
    inconsistent = float(np.sum(directed_counts[directed_counts > 1]) / len(mesh.edges))
    oriented = _ramp(inconsistent, 0.0, _MISWOUND_SHARE)
    if mesh.is_watertight and inconsistent == 0.0 and mesh.volume <= 0:
        oriented = 0.0  # consistently wound, but inside out
    degenerate = float(np.mean(mesh.area_faces < _ZERO_AREA))
    angles = np.degrees(mesh.face_adjacency_angles)
    median_angle = float(np.median(angles)) if len(angles) else 0.0
    folded = float(np.mean(angles > _FOLD_DEGREES)) if len(angles) else 0.0
    return {
        "closed": closed,
        "oriented": oriented,
        "nondegenerate": _ramp(degenerate, 0.0, _DEGENERATE_SHARE),
        "smooth": _ramp(median_angle, *_SMOOTH_DEGREES),
        "unfolded": _ramp(folded, 0.0, _FOLD_SHARE),
    }


@dataclass(frozen=True)
class PartFeatures:
    """What the gold score reads off one connected component (unit-box units)."""

    lower: np.ndarray  # (3,) bounding-box corners
    upper: np.ndarray
    fill: float  # convex-hull volume ÷ bounding-box volume
    hollow: bool  # no surface near the vertical axis through the box centre
    height_of_mass: float  # mean surface-sample height as a share of the box height (cone apex up: < ½)

    @property
    def extents(self) -> np.ndarray:
        return self.upper - self.lower


def part_features(component: trimesh.Trimesh) -> PartFeatures:
    """Features of one component; deterministic (fixed sampling seed)."""
    lower, upper = component.bounds
    extents = np.maximum(upper - lower, 1e-12)
    try:
        fill = float(ConvexHull(component.vertices).volume / np.prod(extents))
    except (QhullError, ValueError):  # flat or too few points: no volume
        fill = 0.0
    if component.area > 0:
        points, _ = trimesh.sample.sample_surface(component, _SURFACE_SAMPLES, seed=np.random.default_rng(0))
    else:
        points = component.vertices
    centre = (lower + upper) / 2
    radius = _AXIS_RADIUS * min(extents[0], extents[1]) / 2
    near_axis = np.linalg.norm(points[:, :2] - centre[:2], axis=1) < radius
    height = float((points[:, 2].mean() - lower[2]) / extents[2])
    return PartFeatures(lower, upper, fill, bool(near_axis.mean() < _HOLLOW_SHARE), height)


def part_checks(part: Part, features: PartFeatures) -> tuple[float, float]:
    """`(shape, proportion)` scores in [0, 1] of one component against the part its name asks for."""
    if part.shape == "torus":
        shape = float(features.hollow)
    else:
        distance = abs(features.fill - _FILL[part.shape])
        shape = 0.0 if features.hollow else _ramp(distance, *_FILL_TOLERANCE)
    ex, ey, ez = np.maximum(features.extents, 1e-12)
    if part.form in ("round", "cube"):
        proportion = _ramp(max(ex, ey, ez) / min(ex, ey, ez), 1.1, 1.3)
    elif part.form == "tall":
        proportion = _ramp(ez / max(ex, ey), 1.8, 1.3)
    elif part.form == "flat":
        proportion = _ramp(ez / min(ex, ey), 0.35, 0.6)
    elif part.form == "regular":
        aspect = ez / max(ex, ey)
        proportion = min(_ramp(aspect, 0.7, 0.45), _ramp(aspect, 1.4, 1.8))
    elif part.form == "upright":
        proportion = _ramp(features.height_of_mass, 0.4, 0.5)
    elif part.form == "lying":
        proportion = _ramp(ez / min(ex, ey), 0.5, 0.8)
    else:
        raise ValueError(f"unknown form {part.form!r}")
    return shape, proportion


def relation_holds(relation: str, first: PartFeatures, second: PartFeatures) -> bool:
    """`"on"`: `first` rests on top of `second` (its bottom at `second`'s top, within `_TOUCH`: neither sunk
    into it nor floating above it), its centre over `second`'s footprint; `"next to"`: side by side."""
    if relation == "on":
        centre = (first.lower[:2] + first.upper[:2]) / 2
        over = bool(np.all(centre >= second.lower[:2]) and np.all(centre <= second.upper[:2]))
        return over and abs(first.lower[2] - second.upper[2]) <= _TOUCH
    if relation == "next to":
        stacked = first.lower[2] >= second.upper[2] - _TOUCH or second.lower[2] >= first.upper[2] - _TOUCH
        apart = np.any((first.lower[:2] >= second.upper[:2] - _TOUCH) | (second.lower[:2] >= first.upper[:2] - _TOUCH))
        return bool(apart) and not stacked
    raise ValueError(f"unknown relation {relation!r}")


def match_checks(mesh: trimesh.Trimesh, spec: MeshPrompt) -> dict[str, float]:
    """Prompt match in [0, 1] each, for a mesh in the unit box: count, shape, proportion, relation."""
    components = mesh.split(only_watertight=False)
    checks = {"count": float(len(components) == len(spec.parts)), "shape": 0.0, "proportion": 0.0}
    if spec.relation is not None:
        checks["relation"] = 0.0
    if not checks["count"]:
        return checks
    features = [part_features(c) for c in components]
    if spec.relation == "on":
        orders = [sorted(range(2), key=lambda i: -features[i].lower[2])]  # parts[0] is the higher one
    else:
        orders = [[0, 1], [1, 0]] if len(features) == 2 else [[0]]
    best: dict[str, float] = {}
    for order in orders:
        scores = [part_checks(part, features[i]) for part, i in zip(spec.parts, order)]
        candidate = {
            "count": 1.0,
            "shape": float(np.prod([s for s, _ in scores])),
            "proportion": float(np.prod([p for _, p in scores])),
        }
        if spec.relation is not None:
            candidate["relation"] = float(relation_holds(spec.relation, features[order[0]], features[order[1]]))
        if not best or np.prod(list(candidate.values())) > np.prod(list(best.values())):
            best = candidate
    return best


def gold_checks(mesh: trimesh.Trimesh, prompt: str) -> dict[str, float]:
    """Every check in [0, 1], their products `geometry` and `match`, and `score = geometry · match`.

    The mesh is first normalised to the unit box, so the score ignores position and overall size.
    A mesh without faces, with non-finite vertices or of zero size scores 0.
    """
    spec = parse_prompt(prompt)
    if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all() or not mesh.extents.max() > 0:
        return {"geometry": 0.0, "match": 0.0, "score": 0.0}
    mesh = normalise_to_unit_box(mesh)
    geometry = geometry_checks(mesh)
    match = match_checks(mesh, spec)
    out = {**geometry, **match}
    out["geometry"] = float(np.prod(list(geometry.values())))
    out["match"] = float(np.prod(list(match.values())))
    out["score"] = out["geometry"] * out["match"]
    return out


def gold_score(mesh: trimesh.Trimesh, prompt: str) -> float:
    """The gold quality of `mesh` for `prompt`, in [0, 1] (see `gold_checks`)."""
    return gold_checks(mesh, prompt)["score"]
