"""Best-of-N: the chosen sample is the reward's argmax; candidates are keyed per (prompt, k)."""

from __future__ import annotations

import torch

from mmalign.best_of_n import best_of_n, sample_candidates
from mmalign.models.diffusion import DiffusionModel
from mmalign.rewards.base import Reward


class _Brightness(Reward):
    name = "brightness"
    needs_prompts = False

    def score_batch(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


def test_best_is_the_argmax_and_candidates_do_not_depend_on_batching(tiny_pipelines):
    model = DiffusionModel.from_pretrained(str(tiny_pipelines["sd"]), lora_rank=None, reference=False)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    result = best_of_n(model, prompts, 4, _Brightness(), num_steps=2, batch_size=5)
    assert result.candidates.shape[:2] == (3, 4) and result.scores.shape == (3, 4)
    assert torch.equal(result.chosen, result.scores.argmax(1))
    for i in range(3):
        assert torch.equal(result.images[i], result.candidates[i, result.chosen[i]])
    alone = sample_candidates(model, prompts[1:2], 2, num_steps=2, batch_size=1, index_offset=1)
    assert torch.allclose(alone, result.candidates[1:2, :2], atol=1e-5)
    single = best_of_n(model, prompts[:1], 1, _Brightness(), num_steps=2)  # N = 1 returns the only sample
    assert single.chosen.tolist() == [0] and torch.allclose(single.images[0], result.candidates[0, 0], atol=1e-5)
