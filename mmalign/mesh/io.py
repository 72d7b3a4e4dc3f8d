"""Mesh files in, one validated triangle mesh out, normalised to the unit box.

OBJ, GLB/GLTF, PLY, STL and OFF files load through trimesh; a GLB/GLTF scene becomes one mesh
by concatenating its triangle geometries with their scene transforms applied. Already-loaded
`trimesh.Trimesh` (or `trimesh.Scene`) objects take the same path and are never modified.
Validation rejects, with the file's name in the message: unreadable files, point clouds, scenes
without triangles, meshes without faces, faces indexing missing vertices, NaN or infinite
coordinates, sizes outside `[MIN_EXTENT, MAX_EXTENT]`, and meshes whose faces all have zero area.
Only these formats are parsed (never a pickle or an archive), and nothing is fetched remotely.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from mmalign.errors import UserInputError

SUFFIXES: tuple[str, ...] = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")
MAX_EXTENT = 1e6  # longest bounding-box side, in the file's units
MIN_EXTENT = 1e-9
_ZERO_AREA = 1e-12  # a face below this share of the squared longest extent has zero area


class MeshInputError(UserInputError):
    """A mesh file or object that cannot be used; the message names it."""


def load_mesh(
    source: str | Path | trimesh.Trimesh | trimesh.Scene, *, normalise: bool = True, name: str | None = None
) -> trimesh.Trimesh:
    """A validated triangle mesh from a file path or a trimesh object, by default in the unit box.

    Vertices at the same position are merged (so an STL's triangle soup becomes connected) and
    unreferenced ones dropped; faces are kept as they are. With `normalise` the bounding box is
    centred at the origin and its longest side is 1. `name` replaces the file name (or
    `"mesh object"`) in error messages.
    """
    if isinstance(source, (str, Path)):
        where = name or str(source)
        loaded = _read(Path(source), where)
    else:
        where = name or "mesh object"
        loaded = source
    mesh = _as_trimesh(loaded, where)
    validate_mesh(mesh, where)
    mesh.merge_vertices()
    mesh.remove_unreferenced_vertices()
    return normalise_to_unit_box(mesh) if normalise else mesh


def _read(path: Path, where: str) -> trimesh.Trimesh | trimesh.Scene | trimesh.PointCloud:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        found = suffix or "(no suffix)"
        raise MeshInputError(f"{where}: unsupported mesh format {found!r}; expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise MeshInputError(f"{where}: no such file")
    try:
        return trimesh.load(path, file_type=suffix[1:], force=None, process=False)
    except Exception as exc:  # trimesh's parsers raise many types; all mean "not a readable mesh"
        kind = suffix[1:].upper()
        raise MeshInputError(f"{where}: not a readable {kind} mesh ({type(exc).__name__}: {exc})") from None


def _as_trimesh(loaded: object, where: str) -> trimesh.Trimesh:
    """A private copy of a Trimesh, or a Scene's triangle geometries merged in world coordinates."""
    if isinstance(loaded, trimesh.Trimesh):
        return loaded.copy()
    if isinstance(loaded, trimesh.PointCloud):
        raise MeshInputError(f"{where}: is a point cloud ({len(loaded.vertices)} points, no faces), not a mesh")
    if isinstance(loaded, trimesh.Scene):
        return merge_scene(loaded, where)
    raise MeshInputError(f"{where}: expected a triangle mesh, got {type(loaded).__name__}")


def merge_scene(scene: trimesh.Scene, where: str = "scene") -> trimesh.Trimesh:
    """Concatenate every triangle mesh of `scene`, each moved by its node's transform."""
    parts = []
    for node in scene.graph.nodes_geometry:
        transform, geometry_name = scene.graph[node]
        geometry = scene.geometry[geometry_name]
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) > 0:
            parts.append(geometry.copy().apply_transform(transform))
    if not parts:
        kinds = sorted({type(g).__name__ for g in scene.geometry.values()}) or ["nothing"]
        raise MeshInputError(f"{where}: the scene holds no triangle mesh (found {', '.join(kinds)})")
    return parts[0] if len(parts) == 1 else trimesh.util.concatenate(parts)


def validate_mesh(mesh: trimesh.Trimesh, where: str = "mesh") -> None:
    """Raise `MeshInputError` naming `where` unless `mesh` is a usable triangle mesh (see the module doc)."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces)
    if faces.size == 0:
        raise MeshInputError(f"{where}: the mesh has no faces ({len(vertices)} vertices)")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshInputError(f"{where}: faces index vertices outside 0..{len(vertices) - 1}")
    bad = ~np.isfinite(vertices).all(axis=1)
    if bad.any():
        raise MeshInputError(f"{where}: {int(bad.sum())} of {len(vertices)} vertices have NaN or infinite coordinates")
    used = vertices[np.unique(faces)]
    extent = float((used.max(axis=0) - used.min(axis=0)).max())
    if not MIN_EXTENT <= extent <= MAX_EXTENT:
        raise MeshInputError(
            f"{where}: absurd size, longest bounding-box side {extent:.3g} is outside [{MIN_EXTENT:g}, {MAX_EXTENT:g}]"
        )
    corners = vertices[faces]
    areas = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    if (areas <= _ZERO_AREA * extent**2).all():
        raise MeshInputError(f"{where}: all {len(faces)} faces are degenerate (zero area)")


def normalise_to_unit_box(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy whose bounding box is centred at the origin with longest side 1 (vertices in [−½, ½]³)."""
    out = mesh.copy()
    lower, upper = out.bounds
    out.apply_translation(-(lower + upper) / 2)
    out.apply_scale(1.0 / float((upper - lower).max()))
    return out
