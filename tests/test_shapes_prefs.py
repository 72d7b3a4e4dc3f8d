"""The embedded preference set: the model's own samples, best vs worst by the proxy, written atomically."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmalign.config import EmbeddedPrefsConfig
from mmalign.data.pairs import read_jsonl
from mmalign.data.shapes_prefs import build_shapes_prefs
from mmalign.models.diffusion import DiffusionModel
from mmalign.rewards import load_reward


@pytest.fixture(scope="module")
def sd_model(tiny_pipelines) -> DiffusionModel:
    return DiffusionModel.from_pretrained(str(tiny_pipelines["sd"]))


def test_pairs_put_the_proxy_winner_first(sd_model, tmp_path):
    config = EmbeddedPrefsConfig(prompts=6, candidates=3, min_margin=0.0, num_steps=2)
    meta = build_shapes_prefs(config, sd_model, tmp_path / "prefs", batch_size=4)
    records, ties = read_jsonl(tmp_path / "prefs" / "pairs.jsonl")
    assert meta["pairs"] == len(records) == 6 and ties == 0
    rows = [json.loads(line) for line in (tmp_path / "prefs" / "pairs.jsonl").read_text().splitlines()]
    assert {r["label"] for r in rows} <= {0, 1}
    proxy = load_reward(config.reward)
    for record, row in zip(records, rows):
        images = [Image.open(tmp_path / "prefs" / p) for p in (record.image_w, record.image_l)]
        scores = proxy(images, record.prompt)
        # PNG rounding moves the proxy a little; the stored margin is what separated them
        margin = row["score_w"] - row["score_l"]
        assert float(scores[0] - scores[1]) == pytest.approx(margin, abs=0.25) and margin >= 0


def test_same_seed_same_pairs(sd_model, tmp_path):
    config = EmbeddedPrefsConfig(prompts=2, candidates=2, min_margin=0.0, num_steps=2)
    build_shapes_prefs(config, sd_model, tmp_path / "a")
    build_shapes_prefs(config, sd_model, tmp_path / "b")
    assert (tmp_path / "a/pairs.jsonl").read_text() == (tmp_path / "b/pairs.jsonl").read_text()
    first = sorted((tmp_path / "a/images").iterdir())[0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "b/images" / first.name)))


def test_no_pair_leaves_no_folder(sd_model, tmp_path):
    config = EmbeddedPrefsConfig(prompts=2, candidates=2, min_margin=1e9, num_steps=2)
    with pytest.raises(ValueError, match="min_margin"):
        build_shapes_prefs(config, sd_model, tmp_path / "prefs")
    assert list(tmp_path.iterdir()) == []
