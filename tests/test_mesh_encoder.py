"""The mesh reward network: permutation and mesh-order invariance, frozen text tower, LayerNorm embeddings."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import trimesh

from mmalign.mesh import world
from mmalign.mesh.encoder import (
    CONTACT_SATURATION,
    HASHED_NGRAMS,
    WINDING_AREA,
    HashedNgrams,
    MeshEncoderConfig,
    MeshRewardNet,
    TextTower,
    contact_features,
    knn_indices,
    local_spacing,
)
from mmalign.mesh.points import canonical_order, mesh_points

SMALL = MeshEncoderConfig(points=128, neighbours=8, local_width=16, width=32, embed_dim=32, head_hidden=32)


@pytest.fixture(scope="module")
def tower() -> TextTower:
    return TextTower()


def _net(text_dim: int | None = None, seed: int = 0) -> MeshRewardNet:
    torch.manual_seed(seed)
    config = MeshEncoderConfig(**{**vars(SMALL), "text_conditioning": text_dim is not None})
    net = MeshRewardNet(config, text_dim)
    if net.film is not None:  # FiLM starts as the identity; give it weights so the text matters
        torch.nn.init.normal_(net.film.weight, std=0.5)
    return net


def _random_points(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    xyz = torch.rand(batch, n, 3, generator=generator) - 0.5
    normals = torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=generator), dim=-1)
    return torch.cat([xyz, normals], dim=-1)


def _rows(a: np.ndarray) -> np.ndarray:
    """Rows in lexicographic order (a multiset of vectors)."""
    return a[np.lexsort(np.round(a, 9).T)]


def _shuffled(mesh: trimesh.Trimesh, seed: int) -> trimesh.Trimesh:
    """The same surface with its vertices renumbered, its faces reordered and each face's corners rotated."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(mesh.vertices))
    inverse = np.argsort(perm)
    faces = inverse[mesh.faces][rng.permutation(len(mesh.faces))]
    faces = np.roll(faces, int(rng.integers(3)), axis=1)  # a cyclic rotation keeps the winding
    return trimesh.Trimesh(mesh.vertices[perm], faces, process=False)


def test_embedding_is_invariant_to_the_order_of_the_points(tower):
    points = _random_points(3, 128)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    for net, text in ((_net(), None), (_net(tower.dim), tower(["a torus", "a cube", "a cone on a cylinder"]))):
        net.eval()
        with torch.no_grad():
            z, r = net(points, text)
            z_perm, r_perm = net(points[:, perm], text)
        torch.testing.assert_close(z_perm, z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r_perm, r, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(z[0], z[1], atol=1e-3)  # and it does depend on the points


def test_reward_is_invariant_to_vertex_and_face_order():
    mesh = world.bad_mesh("a sphere on a cube", np.random.default_rng(3), "flipped")
    shuffled = _shuffled(mesh, seed=4)
    assert not np.array_equal(shuffled.faces, mesh.faces)
    canonical, canonical_shuffled = canonical_order(mesh), canonical_order(shuffled)
    np.testing.assert_array_equal(canonical.vertices, canonical_shuffled.vertices)
    np.testing.assert_array_equal(canonical.faces, canonical_shuffled.faces)
    np.testing.assert_allclose(_rows(canonical.face_normals), _rows(mesh.face_normals), atol=1e-9)  # windings kept
    points = mesh_points(mesh, 128, seed=0)
    torch.testing.assert_close(mesh_points(shuffled, 128, seed=0), points, atol=0, rtol=0)
    net = _net()
    with torch.no_grad():
        assert net(points[None])[1].item() == net(mesh_points(shuffled, 128, seed=0)[None])[1].item()
    assert not torch.equal(mesh_points(mesh, 128, seed=1), points)  # the seed does pick other samples


def test_text_tower_is_frozen_and_outside_the_trained_weights(tower):
    net = _net(tower.dim)
    clip_params = list(tower.clip.backend.model.parameters())
    assert clip_params and not any(p.requires_grad for p in clip_params)
    assert not {id(p) for p in clip_params} & {id(p) for p in net.parameters()}
    assert not any(k.startswith(("text", "clip")) for k in net.state_dict())
    before = [p.detach().clone() for p in clip_params]
    prompts = ["a torus", "a tall box"]
    text = tower(prompts)
    assert text.shape == (2, tower.dim) and not text.requires_grad
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(text[0], text[1], atol=1e-3)  # prompts are told apart
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    net(_random_points(2, 128), text)[1].sum().backward()
    optimizer.step()
    assert net.film.weight.grad is not None and net.film.weight.grad.abs().sum() > 0
    for old, new in zip(before, clip_params):
        assert torch.equal(old, new) and new.grad is None
    torch.testing.assert_close(tower(prompts), text)


def test_prompt_changes_the_embedding_only_through_film(tower):
    points = _random_points(1, 128).expand(2, -1, -1)
    text = tower(["a torus", "a cube"])
    net = _net(tower.dim)
    with torch.no_grad():
        z, _ = net(points, text)
        assert not torch.allclose(z[0], z[1], atol=1e-4)
        torch.nn.init.zeros_(net.film.weight)
        torch.nn.init.zeros_(net.film.bias)  # identity FiLM, as a fresh network starts
        z, _ = net(points, text)
    torch.testing.assert_close(z[0], z[1])


def test_embeddings_are_layer_normed_and_scale_free():
    net = _net()
    points = _random_points(4, 128)
    with torch.no_grad():
        z, _ = net(points)
        torch.testing.assert_close(z.mean(dim=1), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.var(dim=1, unbiased=False), torch.ones(4), atol=5e-3, rtol=0)  # LayerNorm's ε
        net.project.weight.mul_(10.0)
        net.project.bias.mul_(10.0)
        torch.testing.assert_close(net(points)[0], z, atol=5e-3, rtol=0)  # ten times the features: the same embedding


def test_rewards_have_gradients_to_the_points_and_inputs_are_checked(tower):
    net = _net()
    points = _random_points(2, 128).requires_grad_(True)
    net(points)[1].sum().backward()
    assert points.grad is not None and torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, N, 6\)"):
        net(torch.zeros(2, 128, 3))
    with pytest.raises(ValueError, match="takes no text"):
        net(_random_points(1, 128), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="needs text"):
        _net(tower.dim)(_random_points(1, 128))
    with pytest.raises(ValueError, match="neighbours"):
        MeshRewardNet(MeshEncoderConfig(**{**vars(SMALL), "text_conditioning": False, "neighbours": 500}))(
            _random_points(1, 128)
        )


def test_hashed_ngram_tower_builds_prompts_from_their_words_and_word_pairs():
    tower = TextTower(HASHED_NGRAMS)
    prompts = ["a sphere on a cube", "a cube on a sphere", "A sphere, on a cube!", "a torus"]
    text = tower(prompts)
    assert text.shape == (4, HashedNgrams.DIM) == (4, tower.dim) and tower.clip is None
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(text[0], text[2])  # case and punctuation are not words
    assert text[0] @ text[1] < 0.99  # the same words in another order: different pairs
    # an independent count: 5 words + 4 pairs, each a ±1 in its bucket
    words = ["a", "sphere", "on", "a", "cube"]
    features = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    expected = torch.zeros(HashedNgrams.DIM)
    for feature in features:
        code = zlib.crc32(feature.encode())
        expected[code % HashedNgrams.DIM] += 1.0 if (code >> 16) & 1 else -1.0
    torch.testing.assert_close(text[0], expected / expected.norm())
    # a new combination of known words lies in the span of the known prompts' features
    known = tower(["a tall box", "a cylinder", "a cylinder on a cube"])
    new = tower(["a tall cylinder"])[0]
    assert (known @ new).max() > 0.4
    torch.testing.assert_close(TextTower(HASHED_NGRAMS)(prompts), text)  # no state: the same in any process


# ----------------------------------------------------------------------------------------------
# Part contact


def _stacked_boxes(gap: float) -> trimesh.Trimesh:
    """A 0.6-wide cube resting on a 1 × 1 × 0.4 slab (`gap` = 0), lifted by `gap` > 0 or sunk by `gap` < 0."""
    slab = trimesh.creation.box([1.0, 1.0, 0.4])
    slab.apply_translation([0, 0, 0.2])
    cube = trimesh.creation.box([0.6, 0.6, 0.6])
    cube.apply_translation([0, 0, 0.4 + 0.3 + gap])
    return trimesh.util.concatenate([slab, cube])


def _contact(points: torch.Tensor, neighbours: int = 12) -> torch.Tensor:
    xyz, normals, parts = points[..., :3], points[..., 3:6], points[..., 6]
    return contact_features(xyz, normals, parts, local_spacing(xyz, knn_indices(xyz, neighbours)))


def test_mesh_points_label_each_sample_with_its_part():
    mesh = _stacked_boxes(0.1)
    plain, labelled = mesh_points(mesh, 256, seed=0), mesh_points(mesh, 256, seed=0, parts=True)
    assert labelled.shape == (256, 7)
    assert torch.equal(labelled[:, :6], plain)  # the same samples, one channel more
    # in the unit box the slab ends below the cube: the label splits the samples by height
    upper = labelled[:, 2] > labelled[:, 2].min() + 0.4 * (labelled[:, 2].max() - labelled[:, 2].min())
    labels = labelled[:, 6]
    assert set(labels.tolist()) == {0.0, 1.0}
    assert len(set(labels[upper].tolist())) == 1 and len(set(labels[~upper].tolist())) == 1
    assert labels[upper][0] != labels[~upper][0]
    shuffled = mesh_points(_shuffled(mesh, 3), 256, seed=0, parts=True)
    assert torch.equal(shuffled, labelled)  # labels ignore the file's vertex and face order


def test_contact_features_match_a_loop_over_the_points():
    points = mesh_points(_stacked_boxes(-0.05), 128, seed=1, parts=True)[None]
    xyz, normals, parts = (t.numpy().astype(np.float64) for t in (points[0, :, :3], points[0, :, 3:6], points[0, :, 6]))
    spacing = local_spacing(points[..., :3], knn_indices(points[..., :3], 12))[0, :, 0].numpy().astype(np.float64)
    expected = []
    for i in range(len(xyz)):
        others = [j for j in range(len(xyz)) if parts[j] != parts[i]]
        winding = 0.0
        for j in others:
            r2 = float(np.sum((xyz[j] - xyz[i]) ** 2))
            flux = float(np.dot(xyz[j] - xyz[i], normals[j])) / (r2 + (spacing[j] / 2) ** 2) ** 1.5
            winding += WINDING_AREA * spacing[j] ** 2 * flux / (4 * np.pi)
        distance = min(np.linalg.norm(xyz[i] - xyz[j]) for j in others) / spacing[i]
        signed = distance * (1 - 2 * min(max(winding, 0.0), 1.0))
        expected.append([CONTACT_SATURATION * np.tanh(signed / CONTACT_SATURATION), winding, 1.0])
    np.testing.assert_allclose(_contact(points)[0].numpy(), np.array(expected), atol=1e-4)


def test_the_winding_number_tells_inside_from_outside_of_a_closed_part():
    """Samples of a part sunk into another read a winding number well above ½; samples away from it, near 0.

    (At 512 samples the estimate reads about 0.7 deep inside, not 1: the area per sample comes from the
    local spacing, which the cube's own samples near the slab's surface shorten.)
    """
    points = mesh_points(_stacked_boxes(-0.3), 512, seed=0, parts=True)[None]
    winding = _contact(points)[0, :, 1]
    cube = points[0, :, 6] == points[0, points[0, :, 2].argmax(), 6]
    z = points[0, :, 2]
    slab_top = z[~cube].max()  # in the unit box
    deep = cube & (z < slab_top - 0.1) & (points[0, :, 0].abs() < 0.15) & (points[0, :, 1].abs() < 0.15)
    assert deep.any() and (winding[deep] > 0.6).all()  # the cube's bottom, well inside the slab
    assert (winding[cube & (z > slab_top + 0.1)].abs() < 0.2).all()  # its upper part, outside
    assert (winding[~cube & (z < slab_top - 0.2)].abs() < 0.2).all()  # the slab's bottom, below the cube


def test_contact_reads_touching_floating_and_sunk_parts_apart():
    """Read on the upper cube's bottom face: about 0 where it touches the slab, negative inside it, positive above."""
    bottom = {}
    for gap in (-0.15, 0.0, 0.15):
        points = mesh_points(_stacked_boxes(gap), 512, seed=0, parts=True)[None]
        signed = _contact(points)[0, :, 0]
        cube = points[0, :, 6] == points[0, points[0, :, 2].argmax(), 6]
        facing_down = points[0, :, 5] < -0.99
        bottom[gap] = signed[cube & facing_down]
    assert (bottom[-0.15] < -0.5).all()  # inside the other part
    assert (bottom[0.0].abs() < 0.3).all()  # touching
    assert (bottom[0.15] > 0.5).all()  # across a gap
    single = _contact(mesh_points(trimesh.creation.box([1, 1, 1]), 128, seed=0, parts=True)[None])[0]
    assert torch.equal(single, torch.tensor([CONTACT_SATURATION, 0.0, 0.0]).expand(128, 3))  # one part: none


def test_contact_distance_follows_the_upper_part_up_and_down():
    """The signed distance on the upper cube's bottom grows as the cube rises, floating or sunk: its gradient
    tells guidance which way closes a gap or frees a sunk part."""
    for gap in (0.1, -0.1):
        points = mesh_points(_stacked_boxes(gap), 256, seed=0, parts=True)[None]
        lift = torch.zeros((), requires_grad=True)
        cube = (points[..., 6] == points[0, points[0, :, 2].argmax(), 6]).float()
        xyz = points[..., :3] + torch.stack([torch.zeros_like(cube), torch.zeros_like(cube), cube], -1) * lift
        signed = _contact(torch.cat([xyz, points[..., 3:]], dim=-1))[0, :, 0]
        bottom = (cube[0] == 1) & (points[0, :, 5] < -0.99)
        (grad,) = torch.autograd.grad(signed[bottom].mean(), lift)
        assert grad > 0


def test_a_contact_reward_takes_seven_channels_and_is_invariant_to_the_order_of_the_points():
    torch.manual_seed(0)
    net = MeshRewardNet(MeshEncoderConfig(**{**vars(SMALL), "text_conditioning": False, "part_contact": True})).eval()
    points = mesh_points(_stacked_boxes(0.1), 128, seed=0, parts=True)[None]
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(net(points[:, perm])[1], net(points)[1], atol=1e-5, rtol=0)
        lifted = mesh_points(_stacked_boxes(0.2), 128, seed=0, parts=True)[None]
        assert net(lifted)[1] != net(points)[1]
    with pytest.raises(ValueError, match=r"\(B, N, 7\)"):
        net(points[..., :6])
