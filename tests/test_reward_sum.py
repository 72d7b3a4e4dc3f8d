"""Weighted sums of rewards: raw, per-batch z-scored and fixed-normalised terms; specs as mappings or strings."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.cli import main
from mmalign.config import load_config
from mmalign.rewards import RewardInputError, load_reward
from mmalign.rewards.combine import WeightedSum

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle left of a blue square"]


@pytest.fixture(scope="module")
def parts(tiny_clip_dir):
    """clip-score and shapes-gold scores of 4 images, and the images."""
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[1] = 1.0  # a white image: shapes-gold 0
    clip = load_reward("clip-score", path=str(tiny_clip_dir))(images, PROMPTS)
    gold = load_reward("shapes-gold")(images, PROMPTS)
    return images, clip, gold


def test_raw_sum_is_the_weighted_sum_of_scores(parts, tiny_clip_dir):
    images, clip, gold = parts
    spec = {"clip-score": {"weight": 0.25, "args": {"path": str(tiny_clip_dir)}}, "shapes-gold": 2.0}
    reward = load_reward(spec, device="cpu")  # device= goes to every term, args to its own
    assert isinstance(reward, WeightedSum) and reward.needs_prompts
    assert torch.allclose(reward(images, PROMPTS), 0.25 * clip + 2.0 * gold, atol=1e-4)
    terms = reward.term_scores(images, PROMPTS)
    assert torch.allclose(terms["clip-score"], clip, atol=1e-4) and torch.equal(terms["shapes-gold"], gold)


def test_batch_normalisation_is_a_z_score_over_the_call(parts, tiny_clip_dir):
    images, clip, gold = parts
    reward = load_reward({"clip-score": {"weight": 1.0, "normalise": "batch"}}, path=str(tiny_clip_dir))
    z = (clip - clip.mean()) / clip.std(unbiased=False)
    assert torch.allclose(reward(images, PROMPTS), z, atol=1e-4)
    assert abs(float(reward(images, PROMPTS).std(unbiased=False)) - 1) < 1e-4
    assert reward(images[:1], PROMPTS[:1]).tolist() == [0.0]  # one sample: nothing to rank it against


def test_fixed_normalisation_uses_the_given_constants(parts, tiny_clip_dir):
    images, clip, gold = parts
    spec = f'{{clip-score: {{weight: 0.5, mean: 10, std: 4, args: {{path: "{tiny_clip_dir}"}}}}, shapes-gold: 1}}'
    reward = load_reward(spec)  # a YAML string: how string-valued config keys take a sum
    assert torch.allclose(reward(images, PROMPTS), 0.5 * (clip - 10) / 4 + gold, atol=1e-4)
    as_json = json.dumps({"shapes-gold": {"weight": 3, "mean": 0.5, "std": 0.25}})
    assert torch.allclose(load_reward(as_json)(images, PROMPTS), 3 * (gold - 0.5) / 0.25)


def test_bad_specs_name_the_key():
    cases = {
        "unknown key 'scale'": {"shapes-gold": {"scale": 2}},
        "normalise='zscore'": {"shapes-gold": {"normalise": "zscore"}},
        "fixed needs mean and a positive std": {"shapes-gold": {"normalise": "fixed", "mean": 1}},
        "weight must be a finite number": {"shapes-gold": {"weight": "high"}},
        "expected a weight or a mapping": {"shapes-gold": [1]},
        "unknown reward 'no-such-reward'": {"no-such-reward": 1},
        "cannot sum rewards of mesh and video": {"mesh-views:shapes-gold": 1, "motion-smoothness": 1},
        "needs at least one reward": {},
    }
    for message, spec in cases.items():
        with pytest.raises(Exception, match=message):
            load_reward(spec)
    with pytest.raises(RewardInputError, match="not a YAML mapping"):
        load_reward("{shapes-gold: [1")


def test_sums_go_where_reward_names_go(parts, tiny_clip_dir, tmp_path):
    images, clip, gold = parts
    spec = "{shapes-gold: 0.5, 'video:shapes-gold': 0.5}"
    # a weighted sum written as one string is one entry of eval.rewards
    config = load_config("configs/image/diffusion_dpo.yaml", [f'eval.rewards=["{spec}"]'])
    assert config.eval.rewards == [spec]
    reward = load_reward(config.eval.rewards[0], device="cpu")  # as DiffusionEvaluator loads it
    clips = images[:, :, None].expand(-1, -1, 3, -1, -1)  # 3-frame still clips
    assert torch.equal(reward(clips, PROMPTS), gold)
    # an image reward sums with a video reward: the sum reads videos
    mixed = load_reward({"shapes-gold": 1.0, "motion-smoothness": 2.0})
    assert mixed.file_kind == "video" and mixed.needs_prompts
    clips = images[:, :, None].expand(-1, -1, 5, -1, -1)
    motion = load_reward("motion-smoothness")(clips)
    assert torch.isfinite(motion).all()
    assert torch.allclose(mixed(clips, PROMPTS), gold + 2 * motion)
    spec = "{shapes-gold: 1.0}"
    # and on the command line
    for i, image in enumerate(images):
        from PIL import Image

        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    code = main(["score", *[str(tmp_path / f"{i}.png") for i in range(4)], "--reward", spec,
                 "--prompts-file", str(tmp_path / "prompts.txt"), "--json", str(tmp_path / "s.json")])  # fmt: skip
    assert code == 0
    scores = [row["score"] for row in json.loads((tmp_path / "s.json").read_text())["scores"]]
    assert scores == pytest.approx(gold.tolist(), abs=1e-6)
