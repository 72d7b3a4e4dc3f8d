"""The embedded shapes world: captions, splits, renderer and gold metric."""

from __future__ import annotations

import numpy as np
import pytest

from mmalign.data import shapes_world as w
from mmalign.rewards import load_reward


def test_caption_round_trip_and_grammar_errors():
    for scene in w.all_scenes()[::37]:
        assert w.parse_caption(scene.caption) == scene
    for bad in ("a pink circle", "two red circles", "a red circle near a blue square", "", "a red hexagon"):
        with pytest.raises(ValueError, match="shapes-world caption"):
            w.parse_caption(bad)


def test_splits_are_disjoint_stable_and_sized():
    train, heldout = set(w.captions("train")), set(w.captions("heldout"))
    assert not train & heldout
    assert len(train) + len(heldout) == len(w.all_scenes()) == 18 + 18 * 15 * 4
    assert 0.1 < len(heldout) / (len(w.all_scenes()) - 18) < 0.2
    assert w.captions("heldout") == w.captions("heldout")
    assert all(len(c.split()) > 3 for c in heldout)  # single shapes are all in train


def test_true_renders_score_near_one_and_wrong_captions_low():
    rng = np.random.default_rng(0)
    captions = w.sample_captions(300, "train", rng)
    right = np.mean([w.gold_checks(w.render(c, rng), c)["score"] for c in captions])
    wrong = np.mean([w.gold_checks(w.render(c, rng), d)["score"] for c, d in zip(captions, captions[1:])])
    noise = np.mean(
        [w.gold_checks(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8), c)["score"] for c in captions[:50]]
    )
    assert right > 0.98
    assert wrong < 0.5
    assert noise < 0.05


def test_each_check_detects_its_error():
    rng = np.random.default_rng(1)
    image = w.render("a red circle left of a blue square", rng)
    assert w.gold_checks(image, "a red circle left of a blue square")["all"] == 1.0
    assert w.gold_checks(image, "a red circle right of a blue square")["relation"] == 0.0
    assert w.gold_checks(image, "a green circle left of a blue square")["colour"] == 0.5
    assert w.gold_checks(image, "a red triangle left of a blue square")["shape"] == 0.5
    assert w.gold_checks(image, "a red circle")["count"] == 0.0


def test_gold_reward_scores_batches_and_breaks_down():
    gold = load_reward("shapes-gold")
    rng = np.random.default_rng(2)
    captions = ["a yellow triangle above a cyan circle", "a purple square"]
    images = [w.render(c, rng) for c in captions]
    scores = gold(images, captions)
    assert scores.shape == (2,) and (scores > 0.8).all()
    import torch

    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(gold(batch, captions), scores)
    parts = gold.breakdown(batch, captions)
    assert set(parts) == {"colour", "shape", "count", "relation", "all"}
