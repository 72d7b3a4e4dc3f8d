"""Reward-guided mesh generation: regulariser maths, the smooth parametrisation, templates, renders, the recipe."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh

from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.data.pairs import DataError
from mmalign.losses import (
    edge_length_loss,
    face_adjacency,
    guidance_weight,
    laplacian_smoothing_loss,
    mesh_edges,
    normal_consistency_loss,
)
from mmalign.mesh import world
from mmalign.mesh.guided import (
    MeshGuided,
    PartTranslations,
    SmoothingSolver,
    combine_rewards,
    unit_box,
)
from mmalign.mesh.io import MeshInputError, normalise_to_unit_box
from mmalign.mesh.parts import vertex_components
from mmalign.mesh.render import BACK, FRONT, render_mesh, render_views
from mmalign.mesh.templates import EmbeddedTemplatesConfig, embedded_templates, load_templates, read_templates

ROOT = Path(__file__).resolve().parents[1]


def _sphere() -> tuple[torch.Tensor, torch.Tensor]:
    mesh = trimesh.creation.icosphere(subdivisions=2)
    return torch.tensor(mesh.vertices, dtype=torch.float64), torch.tensor(mesh.faces)


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.det(q))


# ---------------------------------------------------------------------------------------------- losses


def test_mesh_edges_of_a_closed_mesh_are_three_halves_of_its_faces():
    _, faces = _sphere()
    edges = mesh_edges(faces)
    assert edges.shape == (faces.shape[0] * 3 // 2, 2) and bool((edges[:, 0] < edges[:, 1]).all())
    with pytest.raises(ValueError, match="integer"):
        mesh_edges(faces.double())


def test_laplacian_energy_matches_a_loop_and_is_translation_invariant():
    vertices, faces = _sphere()
    vertices = vertices + 0.02 * torch.randn(vertices.shape, generator=torch.Generator().manual_seed(0))
    edges = mesh_edges(faces)
    neighbours: dict[int, set[int]] = {}
    for a, b in edges.tolist():
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    reference = np.mean(
        [float((vertices[i] - vertices[sorted(n)].mean(dim=0)).pow(2).sum()) for i, n in sorted(neighbours.items())]
    )
    energy = laplacian_smoothing_loss(vertices, edges)
    assert energy.item() == pytest.approx(reference, rel=1e-10)
    shifted = laplacian_smoothing_loss(vertices + torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64), edges)
    assert shifted.item() == pytest.approx(energy.item(), rel=1e-9)


def test_laplacian_energy_grows_with_roughness_and_a_descent_step_lowers_it():
    vertices, faces = _sphere()
    edges = mesh_edges(faces)
    noise = torch.randn(vertices.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    energies = [laplacian_smoothing_loss(vertices + s * noise, edges).item() for s in (0.0, 0.01, 0.03)]
    assert energies[0] < energies[1] < energies[2]
    rough = (vertices + 0.03 * noise).requires_grad_(True)
    laplacian_smoothing_loss(rough, edges).backward()
    assert laplacian_smoothing_loss(rough.detach() - 0.1 * rough.grad, edges).item() < energies[2]


def test_edge_length_loss_is_zero_at_rest_and_under_rigid_motion_and_scale_free():
    vertices, faces = _sphere()
    edges = mesh_edges(faces)
    rest = (vertices[edges[:, 0]] - vertices[edges[:, 1]]).norm(dim=-1)
    assert edge_length_loss(vertices, edges, rest).item() == 0.0
    moved = vertices @ _rotation(2).T + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert edge_length_loss(moved, edges, rest).item() == pytest.approx(0.0, abs=1e-20)
    grown = edge_length_loss(1.1 * vertices, edges, rest).item()
    assert grown == pytest.approx(0.01 * float((rest / rest.mean()).pow(2).mean()), rel=1e-9)
    assert edge_length_loss(10 * 1.1 * vertices, edges, 10 * rest).item() == pytest.approx(grown, rel=1e-9)


def test_face_adjacency_pairs_the_two_faces_of_every_edge_and_skips_boundaries():
    _, faces = _sphere()
    pairs = face_adjacency(faces)
    assert pairs.shape == (faces.shape[0] * 3 // 2, 2)  # closed: one pair per edge
    reference = trimesh.Trimesh(np.zeros((int(faces.max()) + 1, 3)), faces.numpy(), process=False).face_adjacency
    assert {tuple(sorted(p)) for p in pairs.tolist()} == {tuple(sorted(p)) for p in reference.tolist()}
    assert face_adjacency(torch.tensor([[0, 1, 2], [2, 1, 3]])).tolist() == [[0, 1]]  # one shared edge, 4 open
    with pytest.raises(ValueError, match="integer"):
        face_adjacency(faces.double())


def test_normal_consistency_matches_dihedral_angles_and_is_zero_on_a_plane():
    vertices, faces = _sphere()
    generator = torch.Generator().manual_seed(3)
    vertices = vertices + 0.02 * torch.randn(vertices.shape, generator=generator, dtype=torch.float64)
    pairs = face_adjacency(faces)
    loss = normal_consistency_loss(vertices, faces, pairs)
    mesh = trimesh.Trimesh(vertices.numpy(), faces.numpy(), process=False)
    assert loss.item() == pytest.approx(float(np.mean(1 - np.cos(mesh.face_adjacency_angles))), rel=1e-9)
    moved = 3.0 * vertices @ _rotation(4).T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert normal_consistency_loss(moved, faces, pairs).item() == pytest.approx(loss.item(), rel=1e-9)
    square = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float64)
    two = torch.tensor([[0, 1, 2], [2, 1, 3]])
    assert normal_consistency_loss(square, two, face_adjacency(two)).item() == pytest.approx(0.0, abs=1e-15)
    folded = square.clone()
    folded[3] = torch.tensor([0.1, 0.1, 0.01], dtype=torch.float64)  # the second face turned back over the first
    assert normal_consistency_loss(folded, two, face_adjacency(two)).item() > 1.9
    box = trimesh.creation.box()
    box_faces = torch.tensor(box.faces)
    value = normal_consistency_loss(torch.tensor(box.vertices), box_faces, face_adjacency(box_faces))
    assert value.item() == pytest.approx(12 / 18)  # 12 right-angled edges, 6 flat diagonals


def test_a_descent_step_on_normal_consistency_unfolds_a_rough_surface():
    vertices, faces = _sphere()
    noise = torch.randn(vertices.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rough = (vertices + 0.03 * noise).requires_grad_(True)
    pairs = face_adjacency(faces)
    loss = normal_consistency_loss(rough, faces, pairs)
    loss.backward()
    assert torch.isfinite(rough.grad).all()
    assert normal_consistency_loss(rough.detach() - 1e-3 * rough.grad, faces, pairs).item() < loss.item()
    collapsed = vertices.clone()
    collapsed[faces[0]] = vertices[faces[0, 0]]  # a face of zero area counts as orthogonal, no NaN
    assert torch.isfinite(normal_consistency_loss(collapsed, faces, pairs))


def test_guidance_weight_runs_from_alpha_min_to_alpha_max_monotonically():
    weights = [guidance_weight(t, 200, 10.0, 20.0) for t in range(0, 201, 10)]
    assert weights[0] == 10.0 and weights[-1] == 20.0 and weights == sorted(weights)
    assert guidance_weight(100, 200, 10.0, 20.0) == 15.0
    assert guidance_weight(-5, 200, 10.0, 20.0) == 10.0 and guidance_weight(500, 200, 10.0, 20.0) == 20.0
    with pytest.raises(ValueError, match="total_steps"):
        guidance_weight(0, 0, 10.0, 20.0)


def test_an_ensemble_combines_by_mean_or_by_its_least_convinced_member():
    members = torch.tensor([[0.2, 0.9], [0.6, 0.1], [0.4, 0.5]], requires_grad=True)
    torch.testing.assert_close(combine_rewards(members, "mean"), torch.tensor([0.4, 0.5]))
    low = combine_rewards(members, "min")
    torch.testing.assert_close(low, torch.tensor([0.2, 0.1]))
    low.sum().backward()  # only the least convinced member of each mesh is pushed
    torch.testing.assert_close(members.grad, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="mean or min"):
        combine_rewards(members, "max")


# ---------------------------------------------------------------------------------------------- parametrisation


def test_smoothing_solver_solves_the_dense_system_and_backpropagates_the_same_solve():
    vertices, faces = _sphere()
    edges = mesh_edges(faces)
    n = vertices.shape[0]
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    adjacency[edges[:, 0], edges[:, 1]] = adjacency[edges[:, 1], edges[:, 0]] = 1
    system = torch.eye(n, dtype=torch.float64) + 5.0 * (torch.diag(adjacency.sum(1)) - adjacency)
    solver = SmoothingSolver(edges, n, 5.0)
    u = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = solver(u)
    torch.testing.assert_close(out, torch.linalg.solve(system, u.detach()), rtol=1e-9, atol=1e-12)
    weights = torch.randn(n, 3, dtype=torch.float64)
    (out * weights).sum().backward()
    torch.testing.assert_close(u.grad, torch.linalg.solve(system, weights), rtol=1e-9, atol=1e-12)
    # a translation (the Laplacian's null space) passes through unchanged; bumps are smoothed out
    shift = torch.ones(n, 3, dtype=torch.float64)
    torch.testing.assert_close(solver(shift), shift)
    spike = torch.zeros(n, 3, dtype=torch.float64)
    spike[0] = 1.0
    assert 0 < solver(spike)[0, 0].item() < 0.5


def test_a_low_pass_anchor_holds_the_shape_and_lets_surface_noise_go(tmp_path):
    def anchors(anchor_smoothing: float) -> tuple[float, float]:
        overrides = [f"mesh_guided.anchor_smoothing={anchor_smoothing}", "mesh_guided.templates.per_prompt=1"]
        method = MeshGuided(load_config(ROOT / "configs/mesh/guided.yaml", overrides))
        method.setup(SimpleNamespace(device=torch.device("cpu")))
        rest = method.rest[0]
        noise = 0.01 * torch.randn(rest.shape, generator=torch.Generator().manual_seed(0))
        shift = torch.full_like(rest, 0.01)  # the same mean squared displacement as the noise, in expectation
        return tuple(method.regularisers(d, 0)[3].item() for d in (shift, noise))

    raw_shift, raw_noise = anchors(0.0)
    low_shift, low_noise = anchors(10.0)
    assert low_shift == pytest.approx(raw_shift, rel=1e-5)  # a translation is all low frequency: held in full
    assert raw_noise == pytest.approx(raw_shift, rel=0.1)
    assert low_noise < 0.05 * raw_noise  # per-vertex noise is almost all high frequency: nearly free


def test_vertex_components_are_the_parts_trimesh_splits():
    mesh = world.good_mesh("a sphere on a cube", np.random.default_rng(0))
    faces = torch.tensor(mesh.faces)
    labels = vertex_components(mesh_edges(faces), len(mesh.vertices))
    parts = mesh.split(only_watertight=False)
    assert bool((labels[faces] == labels[faces][:, :1]).all())  # a face never spans two parts
    assert sorted(torch.bincount(labels).tolist()) == sorted(len(part.vertices) for part in parts)


def test_part_translations_move_parts_rigidly_and_no_regulariser_resists_them(tmp_path):
    overrides = [
        "mesh_guided.templates.per_prompt=1",
        "mesh_guided.templates.kinds=[intersecting]",
        "mesh_guided.part_translation_scale=20",
        "mesh_guided.anchor_smoothing=0",
    ]
    method = MeshGuided(load_config(ROOT / "configs/mesh/guided.yaml", overrides))
    method.setup(SimpleNamespace(device=torch.device("cpu")))
    i = method.prompts.index("a torus on a cube")
    parts = method.deformation.parts
    assert isinstance(parts, PartTranslations) and parts.translations[i].shape == (2, 3)
    with torch.no_grad():
        parts.translations[i][1] = torch.tensor([0.0, 0.0, 0.01])  # 20 · 0.01 = 0.2 up, for part 1 only
    offsets, vertices = method.deform()
    moved = vertices[i] - method.rest[i]
    label = vertex_components(method.edges[i], len(method.rest[i]))
    torch.testing.assert_close(moved[label == 1], torch.tensor([0.0, 0.0, 0.2]).expand_as(moved[label == 1]))
    assert bool((moved[label == 0] == 0).all()) and bool((offsets[i] == 0).all())
    # the regularisers read the template and its offsets only: a part's position gets no gradient from them
    sum(method.regularisers(offsets[i], i)).backward()
    assert parts.translations[i].grad is None
    loss, _ = method.compute_loss(0, 0, 0)  # with the reward: parts get a gradient
    loss.backward()
    assert float(parts.translations[i].grad.abs().max()) > 0
    with pytest.raises(ConfigError, match="part_translation_scale"):
        bad = MeshGuided(
            load_config(ROOT / "configs/mesh/guided.yaml", [*overrides, "mesh_guided.part_translation_scale=-1"])
        )
        bad.setup(SimpleNamespace(device=torch.device("cpu")))


def test_unit_box_matches_the_loader_normalisation():
    mesh = world.good_mesh("a cone on a cylinder", np.random.default_rng(0))
    ours = unit_box(torch.tensor(mesh.vertices))
    np.testing.assert_allclose(ours.numpy(), normalise_to_unit_box(mesh).vertices, atol=1e-12)


# ---------------------------------------------------------------------------------------------- templates and renders


def test_embedded_templates_are_corrupted_heldout_meshes_at_the_given_strength():
    config = EmbeddedTemplatesConfig(per_prompt=2, kinds=["noisy", "crumpled"], strength=0.5)
    templates = embedded_templates(config)
    assert [t.prompt for t in templates] == [p for p in world.prompts("heldout") for _ in range(2)]
    assert len({t.name for t in templates}) == len(templates)
    for t in templates:
        assert t.mesh.extents.max() == pytest.approx(1.0)
    milder = embedded_templates(EmbeddedTemplatesConfig(per_prompt=1, strength=0.2))
    stronger = embedded_templates(EmbeddedTemplatesConfig(per_prompt=1, strength=1.0))
    gold = [np.mean([world.gold_score(t.mesh, t.prompt) for t in ts]) for ts in (milder, stronger)]
    assert gold[0] > gold[1] + 0.2, gold
    with pytest.raises(ConfigError, match="strength"):
        embedded_templates(EmbeddedTemplatesConfig(strength=0.0))
    with pytest.raises(ConfigError, match="kinds"):
        embedded_templates(EmbeddedTemplatesConfig(kinds=["melted"]))


def test_template_files_are_read_and_bad_rows_are_named(tmp_path):
    world.good_mesh("a torus", np.random.default_rng(0)).export(tmp_path / "torus.glb")
    rows = [{"prompt": "a torus", "mesh": "torus.glb"}]
    (tmp_path / "templates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (template,) = read_templates(tmp_path)
    assert template.prompt == "a torus" and template.name == "000-a-torus" and len(template.mesh.faces) > 0
    assert load_templates(str(tmp_path / "templates.jsonl"), EmbeddedTemplatesConfig())[0].prompt == "a torus"

    def fails(lines: list[str], match: str, error: type[Exception] = DataError) -> None:
        (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(error, match=match):
            read_templates(tmp_path / "bad.jsonl")

    fails(['{"mesh": "torus.glb"}'], r"bad.jsonl, row 1, field 'prompt'")
    fails(['{"prompt": "a torus", "mesh": "torus.glb"}', '{"prompt": "", "mesh": "torus.glb"}'], r"row 2.*'prompt'")
    fails(['{"prompt": "a torus", "mesh": "notes.txt"}'], r"row 1, field 'mesh'")
    fails(["not json"], r"row 1: not valid JSON")
    fails([""], "no templates")
    trimesh.PointCloud(np.random.default_rng(0).random((50, 3))).export(tmp_path / "cloud.ply")
    fails(['{"prompt": "a torus", "mesh": "cloud.ply"}'], "cloud.ply.*point cloud", MeshInputError)
    with pytest.raises(DataError, match="templates.jsonl"):
        read_templates(tmp_path / "missing")


def test_renders_show_outward_faces_in_front_colour_and_inside_out_ones_in_back_colour():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    image = render_mesh(sphere, size=64)
    assert image.shape == (64, 64, 3) and (image[0, 0] == 1.0).all()  # white background
    centre = image[32, 32]
    assert centre[2] > centre[0]  # grey-blue front side
    np.testing.assert_allclose(centre / centre.max(), FRONT / FRONT.max(), atol=1e-6)
    inside_out = trimesh.Trimesh(sphere.vertices, sphere.faces[:, ::-1], process=False)
    back = render_mesh(inside_out, size=64)[32, 32]
    np.testing.assert_allclose(back / back.max(), BACK / BACK.max(), atol=1e-6)
    views = render_views(sphere, size=32)
    assert views.shape == (3, 32, 64) and views.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory) -> tuple[Path, dict]:
    """`mmalign train configs/mesh/guided.yaml` (a noisy and an intersecting template per held-out prompt), 40 steps."""
    out = tmp_path_factory.mktemp("guided")
    overrides = [
        f"output_dir={out}", "train.max_steps=40", "train.threads=1", "eval.every=20", "train.checkpoint_every=20",
        "mesh_guided.draws=2", "mesh_guided.render_size=48",
        "train.learning_rate=1e-3",  # twice the recipe's steps: 40 of them move the meshes most of the way its 200 do
    ]  # fmt: skip
    assert main(["train", str(ROOT / "configs/mesh/guided.yaml"), *overrides]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_guidance_raises_the_reward_on_heldout_prompts_and_keeps_the_meshes_meshes(guided_run):
    out, report = guided_run
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert report["gold_metric"] == "heldout_gold" and 0.0 <= report["after"] <= 1.0
    assert after["reward"] > before["reward"] + 0.05, (before["reward"], after["reward"])
    assert after["heldout_gold"] > before["heldout_gold"] + 0.1, (before["heldout_gold"], after["heldout_gold"])
    assert after["gold/relation"] > before["gold/relation"]  # the reward moved parts into place
    assert after["gold/count"] == before["gold/count"]  # no part torn off or merged
    assert after["gold/closed"] == 1.0 and after["gold/oriented"] == 1.0
    assert 0.5 < report["train"]["alpha"] <= 0.6 and [e["step"] for e in report["evaluations"]] == [0, 20, 40]
    start = read_templates(out / "meshes" / "step-000000")
    final = read_templates(out / "final" / "meshes")
    assert [t.prompt for t in final] == [p for p in world.prompts("heldout") for _ in range(2)]
    for a, b in zip(start, final):
        assert len(a.mesh.faces) == len(b.mesh.faces) and np.isfinite(b.mesh.vertices).all()
        assert not np.allclose(a.mesh.vertices, b.mesh.vertices)
    assert (out / "samples" / "before_after.png").is_file() and (out / "meshes" / "step-000020").is_dir()
    assert "heldout_gold" in (out / "report.md").read_text()


def test_a_non_mesh_reward_is_refused(tmp_path, capsys):
    args = [
        "train",
        str(ROOT / "configs/mesh/guided.yaml"),
        f"output_dir={tmp_path}",
        "mesh_guided.rewards=[clip-score]",
    ]
    assert main(args) == 2
    assert "mesh_guided.rewards: 'clip-score' is not a mesh reward" in capsys.readouterr().err
