"""Surface sampling: points on the surface, unit outward normals, area weighting, seeds, gradients to vertices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from mmalign.mesh.sampling import SurfaceDraw, face_cross, sample_surface


def _sphere() -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=3, radius=1.0)


def _tensors(mesh: trimesh.Trimesh, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mesh.vertices, dtype=dtype), torch.tensor(mesh.faces, dtype=torch.long)


def _distance_to(mesh: trimesh.Trimesh, points: torch.Tensor) -> np.ndarray:
    """`(P,)`: each point's distance to the nearest face plane among faces holding its projection.

    Brute force over all faces (trimesh's closest-point query needs the optional rtree package).
    """
    p = points.detach().double().numpy()[:, None, :]  # (P, 1, 3)
    a, b, c = (np.asarray(mesh.vertices)[mesh.faces][None, :, i] for i in range(3))  # (1, F, 3) each
    normal = np.cross(b - a, c - a)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    height = ((p - a) * normal).sum(-1)  # (P, F)
    e0, e1, q = b - a, c - a, p - height[..., None] * normal - a
    d00, d01, d11 = (e0 * e0).sum(-1), (e0 * e1).sum(-1), (e1 * e1).sum(-1)
    d20, d21 = (q * e0).sum(-1), (q * e1).sum(-1)
    den = d00 * d11 - d01 * d01
    v, w = (d11 * d20 - d01 * d21) / den, (d00 * d21 - d01 * d20) / den
    inside = (v >= -1e-9) & (w >= -1e-9) & (v + w <= 1 + 1e-9)
    return np.where(inside, np.abs(height), np.inf).min(axis=1)


# ---------------------------------------------------------------------------------------------- trimesh sampler


def test_trimesh_sampler_points_lie_on_the_surface_with_unit_outward_normals():
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    points, normals, _ = sample_surface(box, 500, seed=0)
    assert points.shape == normals.shape == (500, 3)
    assert points.dtype == normals.dtype == torch.float32
    assert _distance_to(box, points).max() < 1e-6
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(500))
    # On a box centred at the origin each normal points along the axis of the face its point is on.
    scaled = points / torch.tensor([1.0, 0.5, 0.25])
    assert ((scaled * normals).sum(dim=1) > 0.99).all()

    sphere = _sphere()
    points, normals, _ = sample_surface(sphere, 500, seed=1)
    radius = points.norm(dim=1)
    assert ((radius > 0.98) & (radius <= 1.0 + 1e-6)).all()  # flat faces lie just inside the sphere
    assert ((normals * points / radius[:, None]).sum(dim=1) > 0.99).all()


def test_trimesh_sampler_is_reproducible_by_seed_and_area_weighted():
    box = trimesh.creation.box(extents=(4.0, 1.0, 1.0))
    first, *_ = sample_surface(box, 4000, seed=7)
    again, *_ = sample_surface(box, 4000, seed=7)
    other, *_ = sample_surface(box, 4000, seed=8)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    # The two 1×1 end caps hold 2 of the 18 area units.
    on_caps = (first[:, 0].abs() > 2.0 - 1e-6).float().mean().item()
    assert on_caps == pytest.approx(2 / 18, abs=0.02)
    with pytest.raises(ValueError, match="positive"):
        sample_surface(box, 0, seed=0)


# ---------------------------------------------------------------------------------------------- torch sampler


def test_differentiable_samples_lie_on_the_surface_with_unit_outward_normals():
    sphere = _sphere()
    vertices, faces = _tensors(sphere)
    draw = SurfaceDraw.draw(vertices, faces, 2000, torch.Generator().manual_seed(0))
    assert len(draw) == 2000 and draw.face_index.dtype == torch.long
    assert (draw.barycentric >= 0).all()
    torch.testing.assert_close(draw.barycentric.sum(dim=1), torch.ones(2000))
    points, normals = draw.sample(vertices, faces)
    assert points.shape == normals.shape == (2000, 3)
    assert _distance_to(sphere, points).max() < 1e-5
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2000))
    assert ((normals * points / points.norm(dim=1, keepdim=True)).sum(dim=1) > 0.99).all()
    # The normals are the faces' own (trimesh agrees on every sampled face).
    expected = torch.tensor(sphere.face_normals, dtype=torch.float32)[draw.face_index]
    torch.testing.assert_close(normals, expected, atol=1e-5, rtol=0)


def test_draw_is_area_weighted_and_uniform_within_a_face():
    # Two separate right triangles with areas 1/2 and 3/2.
    vertices = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 0, 0], [8, 0, 0], [5, 1, 0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
    draw = SurfaceDraw.draw(vertices, faces, 20000, torch.Generator().manual_seed(1))
    assert (draw.face_index == 1).double().mean().item() == pytest.approx(0.75, abs=0.015)
    points, _ = draw.sample(vertices, faces)
    small = points[draw.face_index == 0]
    assert (small[:, 0] + small[:, 1] <= 1 + 1e-12).all() and (small[:, :2] >= 0).all()
    centroid = torch.tensor([1 / 3, 1 / 3, 0], dtype=torch.float64)
    torch.testing.assert_close(small.mean(dim=0), centroid, atol=0.01, rtol=0)
    # Uniform on the triangle: a quarter of the area (the corner triangle x + y < ½) gets a quarter of the points.
    assert ((small[:, 0] + small[:, 1]) < 0.5).double().mean().item() == pytest.approx(0.25, abs=0.02)


def test_same_seed_same_draw_and_other_seed_other_draw():
    vertices, faces = _tensors(_sphere())
    a = SurfaceDraw.draw(vertices, faces, 256, torch.Generator().manual_seed(3))
    b = SurfaceDraw.draw(vertices, faces, 256, torch.Generator().manual_seed(3))
    c = SurfaceDraw.draw(vertices, faces, 256, torch.Generator().manual_seed(4))
    assert torch.equal(a.face_index, b.face_index) and torch.equal(a.barycentric, b.barycentric)
    assert not torch.equal(a.barycentric, c.barycentric)


def test_gradients_reach_the_vertices():
    vertices, faces = _tensors(_sphere())
    vertices.requires_grad_(True)
    draw = SurfaceDraw.draw(vertices, faces, 512, torch.Generator().manual_seed(5))
    points, normals = draw.sample(vertices, faces)
    weights = torch.randn(2, 512, 3, generator=torch.Generator().manual_seed(6))
    ((points * weights[0]).sum() + (normals * weights[1]).sum()).backward()
    grad = vertices.grad
    assert torch.isfinite(grad).all()
    touched = torch.zeros(len(vertices), dtype=torch.bool)
    touched[faces[draw.face_index].reshape(-1)] = True
    assert (grad[touched].norm(dim=1) > 0).all()  # every vertex of a sampled face gets a gradient
    assert (grad[~touched] == 0).all()  # and no other vertex does


def test_gradients_match_finite_differences():
    vertices = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64) + 0.1
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    draw = SurfaceDraw.draw(vertices, faces, 16, torch.Generator().manual_seed(7))
    assert torch.autograd.gradcheck(lambda v: draw.sample(v, faces), (vertices.clone().requires_grad_(True),))


def test_samples_follow_the_vertices_where_they_move():
    vertices, faces = _tensors(_sphere(), dtype=torch.float64)
    draw = SurfaceDraw.draw(vertices, faces, 300, torch.Generator().manual_seed(8))
    points, normals = draw.sample(vertices, faces)
    shift = torch.tensor([0.3, -2.0, 1.0], dtype=torch.float64)
    moved, moved_normals = draw.sample(2.0 * vertices + shift, faces)
    torch.testing.assert_close(moved, 2.0 * points + shift)
    torch.testing.assert_close(moved_normals, normals)
    flipped_points, flipped_normals = draw.sample(vertices, faces.flip(1))  # reversed winding: normals inwards
    torch.testing.assert_close(flipped_normals, -normals)
    assert not torch.allclose(flipped_points, points)  # the weights follow the corners, not the positions


def test_collapsed_faces_give_zero_normals_and_finite_gradients():
    vertices = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    draw = SurfaceDraw.draw(vertices, faces, 4, torch.Generator().manual_seed(9))
    collapsed = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    points, normals = draw.sample(collapsed, faces)
    (points.sum() + normals.sum()).backward()
    assert (normals == 0).all()
    assert torch.isfinite(collapsed.grad).all()


def test_face_cross_is_twice_the_area_along_the_normal():
    vertices, faces = _tensors(trimesh.creation.box(extents=(2.0, 3.0, 4.0)), dtype=torch.float64)
    cross = face_cross(vertices, faces)
    box = trimesh.creation.box(extents=(2.0, 3.0, 4.0))
    torch.testing.assert_close(cross.norm(dim=1) / 2, torch.tensor(box.area_faces))
    torch.testing.assert_close(cross / cross.norm(dim=1, keepdim=True), torch.tensor(box.face_normals))


def test_bad_inputs_are_rejected():
    vertices, faces = _tensors(_sphere())
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="vertices must be"):
        SurfaceDraw.draw(vertices[:, :2], faces, 8, g)
    with pytest.raises(ValueError, match="faces must be"):
        SurfaceDraw.draw(vertices, faces.float(), 8, g)
    with pytest.raises(ValueError, match="outside"):
        SurfaceDraw.draw(vertices, faces + len(vertices), 8, g)
    with pytest.raises(ValueError, match="positive"):
        SurfaceDraw.draw(vertices, faces, 0, g)
    with pytest.raises(ValueError, match="zero area"):
        SurfaceDraw.draw(torch.zeros_like(vertices), faces, 8, g)
