"""The embedded mesh world: prompts and splits, good and bad meshes, and the gold score that judges them."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from mmalign.mesh import world


@pytest.fixture(scope="module")
def good() -> dict[str, trimesh.Trimesh]:
    return {p: world.good_mesh(p, np.random.default_rng(i)) for i, p in enumerate(world.PROMPTS)}


def test_every_prompt_parses_back_to_itself_and_junk_is_rejected():
    for prompt in world.PROMPTS:
        spec = world.parse_prompt(prompt)
        assert spec.text == prompt
        assert len(spec.parts) == (1 if spec.relation is None else 2)
    assert world.parse_prompt("  A Sphere  ON a   cube ").text == "a sphere on a cube"
    for junk in ("a dodecahedron", "two spheres", "a sphere under a cube", "sphere", "a sphere on a pyramid", ""):
        with pytest.raises(ValueError, match="not a mesh-world prompt"):
            world.parse_prompt(junk)


def test_grammar_prompt_set_holds_every_composition_once_and_keeps_heldout_meanings_out_of_training():
    grammar = world.PROMPT_SETS["grammar"]
    assert grammar[: len(world.PROMPTS)] == world.PROMPTS and len(set(grammar)) == len(grammar)
    parts = len(world.PARTS)
    assert len(grammar) == parts + parts * (parts - 1) + parts * (parts - 1) // 2  # singles, "on", unordered "next to"
    assert world.prompts("heldout", "grammar") == world.prompts("heldout")
    train = world.prompts("train", "grammar")
    assert "a cube next to a cone" not in train  # a rewording of the held-out "a cone next to a cube"
    assert "a cylinder on a sphere" in train and "a cone next to a torus" in train
    with pytest.raises(ValueError, match="prompt set"):
        world.prompts("train", "everything")


def test_splits_partition_the_prompts_and_heldout_recombines_trained_words():
    train, heldout = world.prompts("train"), world.prompts("heldout")
    assert sorted(train + heldout) == sorted(world.PROMPTS) and not set(train) & set(heldout)
    assert 10 <= len(world.PROMPTS) <= 20 and len(heldout) >= 3
    seen_words = {word for p in train for word in p.split()}
    seen_shapes = {part.shape for p in train for part in world.parse_prompt(p).parts}
    seen_forms = {part.form for p in train for part in world.parse_prompt(p).parts}
    for prompt in heldout:
        assert set(prompt.split()) <= seen_words, prompt
        assert all(part.shape in seen_shapes and part.form in seen_forms for part in world.parse_prompt(prompt).parts)
    with pytest.raises(ValueError, match="unknown split"):
        world.prompts("test")


def test_good_meshes_are_clean_and_score_high(good):
    for prompt, mesh in good.items():
        spec = world.parse_prompt(prompt)
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0, prompt
        assert len(mesh.split(only_watertight=False)) == len(spec.parts), prompt
        assert mesh.bounds[0, 2] == pytest.approx(0.0, abs=1e-9), prompt  # resting on the ground
        checks = world.gold_checks(mesh, prompt)
        assert checks["score"] > 0.9, (prompt, checks)
        assert all(0.0 <= v <= 1.0 for v in checks.values())


def test_good_meshes_vary_in_proportion_within_their_prompt():
    extents = [world.good_mesh("a tall box", np.random.default_rng(seed)).extents for seed in range(4)]
    assert len({tuple(np.round(e, 6)) for e in extents}) == 4
    assert all(e[2] > 1.8 * max(e[0], e[1]) for e in extents)
    flat = world.good_mesh("a flat box", np.random.default_rng(0)).extents
    assert flat[2] < 0.35 * min(flat[0], flat[1])


@pytest.mark.parametrize("kind", [k for k in world.BAD_KINDS if k != "deformed"])
def test_every_bad_kind_scores_clearly_lower(good, kind):
    expected_failure = {
        "noisy": ("smooth", "unfolded"),
        "holed": ("closed",),
        "crumpled": ("unfolded", "smooth"),
        "flipped": ("oriented",),
        "wrong": ("match",),
        "intersecting": ("relation", "count"),
    }[kind]
    scores = []
    for i, prompt in enumerate(world.PROMPTS):
        mesh = world.bad_mesh(prompt, np.random.default_rng(100 + i), kind)
        checks = world.gold_checks(mesh, prompt)
        scores.append(checks["score"])
        assert checks["score"] < 0.5, (prompt, checks)
        assert min(checks.get(name, 1.0) for name in expected_failure) < 1.0, (prompt, checks)  # the intended reason
        if kind == "holed":
            assert not mesh.is_watertight and checks["closed"] <= 0.5
    assert np.mean(scores) < 0.3
    assert np.mean(scores) < np.mean([world.gold_score(m, p) for p, m in good.items()]) - 0.6


def test_deformed_meshes_keep_a_clean_surface_but_lose_the_prompts_shape(good):
    checks = [
        world.gold_checks(world.bad_mesh(p, np.random.default_rng(7 + i), "deformed"), p)
        for i, p in enumerate(world.PROMPTS)
    ]
    assert all(c["geometry"] > 0.9 for c in checks)  # no roughness, folds or holes: only the shape is wrong
    assert np.mean([c["score"] for c in checks]) < 0.4
    assert np.mean([min(c["shape"], c["proportion"]) for c in checks]) < 0.4
    mild = [
        world.gold_score(world.bad_mesh(p, np.random.default_rng(7 + i), "deformed", strength=0.2), p)
        for i, p in enumerate(world.PROMPTS)
    ]
    assert np.mean(mild) > np.mean([c["score"] for c in checks]) + 0.2


def test_other_prompts_good_meshes_score_low(good):
    prompts = list(good)
    for i, prompt in enumerate(prompts):
        for other in (prompts[(i + 1) % len(prompts)], prompts[(i + 5) % len(prompts)], prompts[i - 1]):
            assert world.gold_score(good[other], prompt) < 0.3, (other, "scored for", prompt)


def test_prompt_checks_see_orientation_arrangement_and_proportion():
    rng = np.random.default_rng(0)
    cone = world.good_mesh("a cone", rng)
    upside_down = cone.copy().apply_transform(trimesh.transformations.rotation_matrix(np.pi, [1, 0, 0]))
    assert world.gold_checks(upside_down, "a cone")["proportion"] == 0.0
    quarter_turn = trimesh.transformations.rotation_matrix(np.pi / 2, [1, 0, 0])
    standing = world.good_mesh("a torus", rng).apply_transform(quarter_turn)
    assert world.gold_score(standing, "a torus") == 0.0
    stacked = world.good_mesh("a sphere on a cube", rng)
    assert world.gold_checks(stacked, "a cube on a sphere")["shape"] == 0.0  # the sphere is the upper part
    assert world.gold_checks(stacked, "a sphere next to a cube")["relation"] == 0.0
    sphere, cube = sorted(stacked.split(only_watertight=False), key=lambda c: -c.bounds[0, 2])
    for lift, holds in ((0.02, 1.0), (-0.1, 0.0), (0.1, 0.0)):  # "on" rests: neither sunk in nor floating above
        moved = trimesh.util.concatenate([sphere.copy().apply_translation([0, 0, lift * stacked.extents[2]]), cube])
        assert world.gold_checks(moved, "a sphere on a cube")["relation"] == holds, lift
    side_by_side = world.good_mesh("a cube next to a sphere", rng)
    assert world.gold_checks(side_by_side, "a sphere on a cube")["relation"] == 0.0
    assert world.gold_score(side_by_side, "a sphere next to a cube") > 0.9  # "next to" is symmetric
    assert world.gold_checks(world.good_mesh("a cube", rng), "a tall box")["proportion"] == 0.0
    assert world.gold_checks(world.good_mesh("a cube", rng), "a sphere")["shape"] == 0.0


def test_displaced_meshes_sit_within_reach_of_contact_on_both_sides_of_the_tolerance():
    """The parts move to a gap g ~ U(−reach, reach) (unit box): the judge's relation holds for |g| ≤ 0.03 on `on`
    (g ≥ −0.03 beside), and fails past it; shapes and surfaces stay clean."""
    for prompt in ("a sphere on a cylinder", "a cone next to a cube"):
        spec = world.parse_prompt(prompt)
        holds = []
        for seed in range(24):
            mesh = world.displaced_mesh(prompt, np.random.default_rng(seed), reach=0.1)
            first, second = sorted(mesh.split(only_watertight=False), key=lambda c: -c.bounds[0, 2])
            if spec.relation == "on":
                gap = first.bounds[0, 2] - second.bounds[1, 2]
            else:
                axis = int(np.argmax(np.abs(first.centroid - second.centroid)[:2]))
                low, high = sorted((first, second), key=lambda c: c.centroid[axis])
                gap = high.bounds[0, axis] - low.bounds[1, axis]
            assert abs(gap) <= 0.1 + 1e-9
            checks = world.gold_checks(mesh, prompt)
            assert checks["geometry"] > 0.9 and checks["count"] == 1.0 and checks["shape"] > 0.9
            holds.append(checks["relation"])
            if abs(gap) > 0.045 and (spec.relation == "on" or gap < 0):  # clear of the rounding of re-normalising
                assert checks["relation"] == 0.0, (prompt, seed, gap)
            if (abs(gap) if spec.relation == "on" else -gap) < 0.015:
                assert checks["relation"] == 1.0, (prompt, seed, gap)
        assert 0 < np.mean(holds) < 1  # both sides of the tolerance
    with pytest.raises(ValueError, match="two-part prompt"):
        world.displaced_mesh("a torus", np.random.default_rng(0))
    stacked = world.good_mesh("a sphere on a cube", np.random.default_rng(0))
    for gap in (-0.2, 0.0, 0.07):
        upper, lower = sorted(world.parts_at_gap(stacked, "on", gap).split(), key=lambda c: -c.bounds[0, 2])
        assert upper.bounds[0, 2] - lower.bounds[1, 2] == pytest.approx(gap)
        assert lower.bounds.tolist() == min(stacked.split(), key=lambda c: c.bounds[0, 2]).bounds.tolist()  # stays
    for left_first in (True, False):  # side by side along x, the moved part on either side
        left, right = trimesh.creation.box([1, 1, 1]), trimesh.creation.box([0.5, 0.5, 0.8])
        left.apply_translation([0.5, 0, 0.5])
        right.apply_translation([1.75, 0, 0.5])  # boxes 0.5 apart, the right one's bottom higher: it moves
        pair = trimesh.util.concatenate([left, right] if left_first else [right, left])
        for gap in (-0.1, 0.05):
            moved = world.parts_at_gap(pair, "next to", gap)
            low, high = sorted(moved.split(), key=lambda c: c.bounds[0, 0])
            assert high.bounds[0, 0] - low.bounds[1, 0] == pytest.approx(gap)
            assert low.bounds.tolist() == left.bounds.tolist()  # the lower-lying box stays
    with pytest.raises(ValueError, match="two parts"):
        world.parts_at_gap(trimesh.creation.box(), "on", 0.0)
    with pytest.raises(ValueError, match="unknown relation"):
        world.parts_at_gap(stacked, "under", 0.0)


def test_gold_ignores_position_and_size_but_not_inside_out(good):
    mesh = good["a sphere on a cube"]
    moved = mesh.copy().apply_scale(7.5).apply_translation([3.0, -20.0, 4.0])
    assert world.gold_score(moved, "a sphere on a cube") == pytest.approx(world.gold_score(mesh, "a sphere on a cube"))
    inverted = good["a cube"].copy()
    inverted.invert()
    assert world.gold_checks(inverted, "a cube")["oriented"] == 0.0
    assert world.gold_score(trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), int)), "a cube") == 0.0


def test_world_is_deterministic_given_the_seed():
    prompt = "a cone on a cylinder"
    for kind in (None, *world.BAD_KINDS):
        meshes = [
            world.good_mesh(prompt, np.random.default_rng(5))
            if kind is None
            else world.bad_mesh(prompt, np.random.default_rng(5), kind)
            for _ in range(2)
        ]
        np.testing.assert_array_equal(meshes[0].vertices, meshes[1].vertices)
        np.testing.assert_array_equal(meshes[0].faces, meshes[1].faces)
        assert world.gold_checks(meshes[0], prompt) == world.gold_checks(meshes[1], prompt)
    first = world.good_mesh(prompt, np.random.default_rng(5))
    other = world.good_mesh(prompt, np.random.default_rng(6))
    assert not np.allclose(first.extents, other.extents)
    with pytest.raises(ValueError, match="unknown bad kind"):
        world.bad_mesh("a cube", np.random.default_rng(0), "melted")
