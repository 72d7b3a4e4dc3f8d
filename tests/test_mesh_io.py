"""Mesh loading: every format, scene merging, normalisation, and clear errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trimesh

from mmalign.errors import UserInputError
from mmalign.mesh.io import MeshInputError, load_mesh, normalise_to_unit_box


def _box(extents=(2.0, 1.0, 0.5), offset=(3.0, -1.0, 7.0)) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=extents).apply_translation(offset)


def _assert_unit_box(mesh: trimesh.Trimesh) -> None:
    lower, upper = mesh.bounds
    np.testing.assert_allclose((lower + upper) / 2, 0.0, atol=1e-9)
    assert (upper - lower).max() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("suffix", [".obj", ".glb", ".ply", ".stl", ".off"])
def test_every_format_loads_watertight_and_normalised(tmp_path: Path, suffix: str):
    source = _box()
    path = tmp_path / f"box{suffix}"
    source.export(path)
    mesh = load_mesh(path)
    assert isinstance(mesh, trimesh.Trimesh)
    assert len(mesh.faces) == 12 and len(mesh.vertices) == 8  # an STL triangle soup is merged too
    assert mesh.is_watertight
    _assert_unit_box(mesh)
    np.testing.assert_allclose(np.sort(mesh.extents), [0.25, 0.5, 1.0], atol=1e-6)  # proportions kept
    raw = load_mesh(path, normalise=False)
    np.testing.assert_allclose(raw.bounds, source.bounds, atol=1e-6)


def test_glb_scene_is_merged_with_its_transforms(tmp_path: Path):
    scene = trimesh.Scene()
    shift = trimesh.transformations.translation_matrix([4, 0, 0])
    scene.add_geometry(trimesh.creation.box(extents=(1, 1, 1)), transform=shift)
    scene.add_geometry(trimesh.creation.icosphere(subdivisions=1, radius=0.5))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path, normalise=False)
    assert len(mesh.faces) == 12 + 80
    assert len(mesh.split(only_watertight=False)) == 2
    np.testing.assert_allclose(mesh.bounds, [[-0.5, -0.5, -0.5], [4.5, 0.5, 0.5]], atol=1e-6)
    _assert_unit_box(load_mesh(path))


def test_trimesh_objects_are_accepted_and_left_unchanged():
    source = _box()
    before = source.vertices.copy()
    mesh = load_mesh(source)
    _assert_unit_box(mesh)
    np.testing.assert_array_equal(source.vertices, before)
    scene_mesh = load_mesh(trimesh.Scene([_box(), _box(offset=(0, 0, 0))]), normalise=False)
    assert len(scene_mesh.faces) == 24


def test_normalise_to_unit_box_returns_a_scaled_copy():
    source = _box(extents=(4.0, 2.0, 1.0))
    out = normalise_to_unit_box(source)
    _assert_unit_box(out)
    np.testing.assert_allclose(out.extents, [1.0, 0.5, 0.25])
    assert source.extents[0] == pytest.approx(4.0)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("points.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\n", "point cloud"),
        ("empty.obj", "", "no triangle mesh"),
        ("nan.obj", "v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\n", "NaN or infinite"),
        ("flat.obj", "v 0 0 0\nv 1 0 0\nv 2 0 0\nv 3 0 0\nf 1 2 3\nf 2 3 4\n", "degenerate"),
        ("huge.obj", "v 0 0 0\nv 1e7 0 0\nv 0 1e7 0\nf 1 2 3\n", "absurd size"),
        ("tiny.obj", "v 0 0 0\nv 1e-12 0 0\nv 0 1e-12 0\nf 1 2 3\n", "absurd size"),
        ("junk.glb", "definitely not a GLB", "not a readable GLB"),
        ("model.pkl", "not opened", "unsupported mesh format"),
        ("model.npz", "not opened", "unsupported mesh format"),
    ],
)
def test_bad_files_get_clear_errors_naming_the_file(tmp_path: Path, name: str, content: str, message: str):
    path = _write(tmp_path / name, content)
    with pytest.raises(MeshInputError, match=message) as info:
        load_mesh(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, UserInputError)


def test_point_cloud_files_and_scenes_without_triangles_are_rejected(tmp_path: Path):
    cloud = trimesh.PointCloud(np.random.default_rng(0).random((20, 3)))
    ply = tmp_path / "cloud.ply"
    cloud.export(ply)
    with pytest.raises(MeshInputError, match="cloud.ply: is a point cloud"):
        load_mesh(ply)
    glb = tmp_path / "cloud.glb"
    trimesh.Scene([cloud]).export(glb)
    with pytest.raises(MeshInputError, match="cloud.glb: the scene holds no triangle mesh .*PointCloud"):
        load_mesh(glb)


def test_missing_file_and_bad_objects(tmp_path: Path):
    with pytest.raises(MeshInputError, match="nowhere.obj: no such file"):
        load_mesh(tmp_path / "nowhere.obj")
    with pytest.raises(MeshInputError, match="no faces"):
        load_mesh(trimesh.Trimesh(np.eye(3), np.zeros((0, 3), int), process=False))
    with pytest.raises(MeshInputError, match=r"my mesh: faces index vertices outside 0\.\.2"):
        load_mesh(trimesh.Trimesh(np.eye(3), [[0, 1, 5]], process=False, validate=False), name="my mesh")
    with pytest.raises(MeshInputError, match="expected a triangle mesh, got dict"):
        load_mesh({"vertices": [], "faces": []})
