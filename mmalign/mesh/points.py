"""A mesh as the reward encoder sees it: `(N, 6)` surface samples with normals, whatever its vertex and face order.

With `parts=True` a 7th channel holds the part (connected component) each sample lies on, for
rewards whose encoder reads contact between parts (`MeshEncoderConfig.part_contact`).

`mesh_points` loads and validates the mesh (`mmalign.mesh.io.load_mesh`: unit box), puts it in a
canonical order, and draws seeded area-weighted samples. The canonical order makes the draw,
and so any reward computed from it, exactly invariant to how a file happens to list its vertices
and faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import trimesh

from mmalign.losses import mesh_edges
from mmalign.mesh.io import load_mesh
from mmalign.mesh.parts import face_parts, vertex_components
from mmalign.mesh.sampling import sample_surface


def canonical_order(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A copy with vertices sorted by (x, y, z) and faces sorted, each rotated to start at its smallest index.

    Rotating a face keeps its winding (its normal). Two meshes that differ only in the order of
    their vertices or faces become identical; `mesh` is not modified.
    """
    vertices = np.asarray(mesh.vertices)
    order = np.lexsort(vertices.T[::-1])  # x is the primary key
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    faces = rank[np.asarray(mesh.faces)]
    start = faces.argmin(axis=1)
    faces = np.take_along_axis(faces, (start[:, None] + np.arange(3)) % 3, axis=1)
    faces = faces[np.lexsort(faces.T[::-1])]
    return trimesh.Trimesh(vertices[order], faces, process=False)


def mesh_points(
    source: str | Path | trimesh.Trimesh | trimesh.Scene,
    n: int,
    seed: int,
    name: str | None = None,
    parts: bool = False,
) -> torch.Tensor:
    """`(n, 6)` float32: xyz in the unit box, then unit face normals, of a mesh file or object.

    `parts`: `(n, 7)`, the last channel the part label of each sample's face (0, 1, …, in the
    canonical order, so labels too ignore how the file lists its vertices and faces).
    Bad meshes raise `MeshInputError` naming `name` (default: the file, or "mesh object").
    """
    mesh = canonical_order(load_mesh(source, name=name))
    points, normals, face_index = sample_surface(mesh, n, seed)
    channels = [points, normals]
    if parts:
        faces = torch.from_numpy(np.asarray(mesh.faces))
        labels = face_parts(faces, vertex_components(mesh_edges(faces), len(mesh.vertices)))
        channels.append(labels[face_index].to(torch.float32)[:, None])
    return torch.cat(channels, dim=1)
