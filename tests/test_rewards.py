"""The Reward protocol, CLIP score on both backends, loading by name and by folder, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mmalign
from mmalign.models.tiny import tiny_open_clip
from mmalign.rewards import RewardInputError, load_reward


def _images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_clip_score_equals_an_independent_cosine(tiny_clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    reward = load_reward("clip-score", path=str(tiny_clip_dir))
    images = _images(3)
    prompts = ["a red circle", "a blue square left of a green circle", "a cat"]
    scores = reward(images, prompts)

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        image_out = model.vision_model(pixel_values=(images - mean) / std).pooler_output
        img = F.normalize(model.visual_projection(image_out), dim=-1)
        ids = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        text_out = model.text_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output
        txt = F.normalize(model.text_projection(text_out), dim=-1)
    assert torch.allclose(scores, 100 * (img * txt).sum(-1), atol=1e-4)


def test_batching_and_input_kinds_agree(tiny_clip_dir, tmp_path):
    reward = load_reward("clip-score", path=str(tiny_clip_dir), batch_size=2)
    images = _images(5)
    reference = reward(images, "a red circle")
    arrays = [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in images]
    paths = []
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    for samples in (arrays, [Image.fromarray(a) for a in arrays], [str(p) for p in paths]):
        assert torch.allclose(reward(samples, "a red circle"), reference, atol=0.5)  # uint8 rounding only
    assert torch.allclose(
        load_reward("clip-score", path=str(tiny_clip_dir), batch_size=64)(images, "a red circle"), reference, atol=1e-4
    )


def test_clip_score_is_differentiable_in_the_pixels(tiny_clip_dir):
    reward = load_reward("clip-score", path=str(tiny_clip_dir))
    images = _images(2).requires_grad_(True)
    reward.differentiable_score(images, ["a red circle", "a cat"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_open_clip_backend_from_a_local_folder(tmp_path):
    folder = tiny_open_clip(tmp_path / "oc")
    reward = load_reward("clip-score", path=str(folder))
    assert type(reward.backend).__name__ == "_OpenCLIP"
    scores = reward(_images(3), ["a red circle", "a red circle", "a dog"])
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores.abs() <= 100).all()


def test_reward_input_errors(tiny_clip_dir, tmp_path):
    reward = load_reward("clip-score", path=str(tiny_clip_dir))
    with pytest.raises(RewardInputError, match="got 3 samples but 2 prompts"):
        reward(_images(3), ["a", "b"])
    with pytest.raises(RewardInputError, match="pass prompts="):
        reward(_images(1))
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(RewardInputError, match=r"broken\.png: not a readable image"):
        reward([str(tmp_path / "broken.png")], "a red circle")
    with pytest.raises(RewardInputError, match="no such file"):
        reward([str(tmp_path / "missing.png")], "a red circle")
    with pytest.raises(RewardInputError, match=r"expected an \(N, 3, H, W\)"):
        reward(torch.zeros(2, 32, 32), "a")
    with pytest.raises(RewardInputError, match="not a shapes-world caption"):
        load_reward("shapes-gold")(_images(1), "a photo of a cat")


def test_load_reward_by_folder_manifest_and_unknown_names(tiny_clip_dir, tmp_path):
    import shutil

    folder = tmp_path / "my-reward"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "mmalign_reward.json").write_text(json.dumps({"reward": "clip-score"}))
    by_folder = load_reward(str(folder))
    by_name = load_reward("clip-score", path=str(tiny_clip_dir))
    images = _images(2)
    assert torch.allclose(by_folder(images, "a red circle"), by_name(images, "a red circle"))
    with pytest.raises(KeyError, match="did you mean 'clip-score'"):
        load_reward("clip-scor")
    assert torch.allclose(mmalign.score(images, "a red circle", reward=str(folder)), by_name(images, "a red circle"))


def test_every_registered_reward_takes_the_device_training_passes():
    """Training and evaluation load every reward with `device=`; a reward that refused it could not be trained on."""
    import inspect

    from mmalign.registry import REWARDS, load

    for name in REWARDS:
        parameters = inspect.signature(load(REWARDS, "reward", name).__init__).parameters
        assert "device" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values()), name
