"""Best-of-N sampling: draw N candidates per prompt, keep the one a reward scores highest.

The noise of candidate k for prompt i is keyed by `(seed, i, k)`, so a prompt's candidates do
not depend on the batch it is generated in, and N = 1 draws exactly the candidate 0 of any N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mmalign.rewards.base import Reward
from mmalign.train.rng import keyed_generator


@dataclass
class BestOfN:
    """`images (P, 3, H, W)` in [0, 1]: the chosen candidate per prompt; `scores (P, N)` every
    candidate's reward; `chosen (P,)` the argmax index; `candidates (P, N, 3, H, W)`."""

    images: torch.Tensor
    scores: torch.Tensor
    chosen: torch.Tensor
    candidates: torch.Tensor


def sample_candidates(
    model,
    prompts: list[str],
    n: int,
    *,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 32,
    use_reference: bool = False,
    index_offset: int = 0,
) -> torch.Tensor:
    """`n` samples per prompt of `model` (a `DiffusionModel`): `(P, n, 3, H, W)` in [0, 1].

    Candidate k of prompt i starts from noise keyed by `(seed, index_offset + i, k)`;
    `use_reference` samples with the frozen reference weights instead of the trained ones.
    """
    if n < 1:
        raise ValueError(f"need N ≥ 1 samples per prompt, got {n}")
    if not prompts:
        raise ValueError("need at least one prompt")
    shape = model.latent_shape(1, model.default_resolution)[1:]
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n)]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"sampling {n} per prompt", unit="batch", leave=False):
        batch = jobs[start : start + batch_size]
        noise = torch.stack(
            [torch.randn(shape, generator=keyed_generator(seed, index_offset + i, k)) for i, k in batch]
        )
        images.append(
            model.generate(
                [prompts[i] for i, _ in batch],
                num_steps=num_steps,
                guidance_scale=guidance_scale,
                noise=noise,
                use_reference=use_reference,
            ).cpu()
        )
    return torch.cat(images).view(len(prompts), n, *images[0].shape[1:])


def best_of_n(model, prompts: list[str], n: int, reward: Reward, **sample_kwargs) -> BestOfN:
    """Best-of-`n` samples of `model` for each prompt under `reward`; `sample_kwargs` as in
    `sample_candidates` (steps, guidance, seed, batch size, reference weights, index offset)."""
    candidates = sample_candidates(model, prompts, n, **sample_kwargs)
    scores = reward(candidates.flatten(0, 1), [p for p in prompts for _ in range(n)] if reward.needs_prompts else None)
    scores = scores.view(len(prompts), n)
    chosen = scores.argmax(dim=1)
    return BestOfN(candidates[torch.arange(len(prompts)), chosen], scores, chosen, candidates)
