"""Points and normals on a mesh surface, area-weighted: a seeded trimesh sampler and a differentiable one.

`sample_surface` reads a `trimesh.Trimesh` (data preparation, scoring). `SurfaceDraw` fixes face
indices and barycentric weights once, then places the points on any vertex positions of the same
topology, so points and normals carry gradients back to the vertices (reward-guided optimisation).
Positions are in the mesh's units; normals are unit vectors, outward for a consistently wound
mesh (counter-clockwise seen from outside).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import trimesh


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` area-weighted surface points `(n, 3)`, their face normals `(n, 3)` (float32) and faces `(n,)` (int64).

    Reproducible by `seed`.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    points, face_index = trimesh.sample.sample_surface(mesh, n, seed=np.random.default_rng(seed))
    normals = mesh.face_normals[face_index]
    points, normals = (torch.from_numpy(np.asarray(a, np.float32)) for a in (points, normals))
    return points, normals, torch.from_numpy(face_index)


def face_cross(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """`(v1 − v0) × (v2 − v0)` per face, `(F, 3)`: the normal direction, with length twice the face's area."""
    corners = vertices[faces]  # (F, 3, 3)
    return torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)


@dataclass(frozen=True)
class SurfaceDraw:
    """Fixed sample locations on a triangle mesh: `face_index (N,)` long, `barycentric (N, 3)` summing to 1."""

    face_index: torch.Tensor
    barycentric: torch.Tensor

    @classmethod
    def draw(
        cls, vertices: torch.Tensor, faces: torch.Tensor, n: int, generator: torch.Generator | None = None
    ) -> SurfaceDraw:
        """Draw `n` locations, faces with probability proportional to their area at `vertices (V, 3)` now.

        Barycentric weights `(1 − √r₁, √r₁(1 − r₂), √r₁·r₂)` with `r₁, r₂ ~ U(0, 1)` are uniform on
        each triangle. Random numbers come from `generator` (on its own device; the global CPU
        generator when None); the draw lives on the vertices' device.
        """
        _check_mesh_tensors(vertices, faces)
        if faces.min() < 0 or faces.max() >= vertices.shape[0]:
            raise ValueError(f"faces index vertices outside 0..{vertices.shape[0] - 1}")
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        device = generator.device if generator is not None else torch.device("cpu")
        areas = face_cross(vertices.detach(), faces).norm(dim=-1).to(device=device, dtype=torch.float64)
        if not areas.sum() > 0:
            raise ValueError("cannot sample a surface whose faces all have zero area")
        face_index = torch.multinomial(areas, n, replacement=True, generator=generator)
        r = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
        root = r[:, 0].sqrt()
        barycentric = torch.stack([1 - root, root * (1 - r[:, 1]), root * r[:, 1]], dim=1)
        return cls(face_index.to(vertices.device), barycentric.to(device=vertices.device, dtype=vertices.dtype))

    def __len__(self) -> int:
        return self.face_index.shape[0]

    def sample(self, vertices: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Points `(N, 3)` and unit face normals `(N, 3)` at the drawn locations, differentiable in `vertices`.

        A face that has collapsed to zero area gets a zero normal (finite gradients) rather than NaN.
        """
        _check_mesh_tensors(vertices, faces)
        corners = vertices[faces[self.face_index]]  # (N, 3, 3)
        points = (self.barycentric.to(vertices.dtype)[:, :, None] * corners).sum(dim=1)
        normals = F.normalize(face_cross(vertices, faces)[self.face_index], dim=-1, eps=1e-12)
        return points, normals


def _check_mesh_tensors(vertices: torch.Tensor, faces: torch.Tensor) -> None:
    """Shapes and dtypes only: no device synchronisation, so `sample` stays cheap inside a training step."""
    if vertices.ndim != 2 or vertices.shape[1] != 3 or not vertices.is_floating_point():
        raise ValueError(f"vertices must be a float (V, 3) tensor, got {vertices.dtype} {tuple(vertices.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.is_floating_point() or faces.numel() == 0:
        raise ValueError(f"faces must be a non-empty integer (F, 3) tensor, got {faces.dtype} {tuple(faces.shape)}")
