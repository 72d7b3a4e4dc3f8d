"""The mesh reward network: permutation and mesh-order invariance, frozen text tower, LayerNorm embeddings."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import trimesh

from mmalign.mesh import world
from mmalign.mesh.encoder import HASHED_NGRAMS, HashedNgrams, MeshEncoderConfig, MeshRewardNet, TextTower
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
