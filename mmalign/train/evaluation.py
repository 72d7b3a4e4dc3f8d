"""Held-out evaluation of a text-to-image `DiffusionModel`: sample, score, grid.

The same prompts and the same noise (keyed by the eval seed and the prompt's position) are used
at every evaluation, so "before" and "after" differ only through the model, and the grids can
be compared image by image.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mmalign.config import ConfigError, EvalConfig
from mmalign.data import balls_world, shapes_world
from mmalign.data.prompts import read_prompts
from mmalign.models.diffusion import DiffusionModel
from mmalign.rewards import Reward, load_reward
from mmalign.train.grids import image_grid, video_grid_frames, video_strips
from mmalign.train.method import Evaluation
from mmalign.train.rng import keyed_generator


def eval_prompts(config: EvalConfig, world=shapes_world) -> list[str]:
    """The evaluation prompts: a split of the embedded `world` (`heldout`, `train`) or a prompt file."""
    prompts = read_prompts(config.prompts, world, "eval.prompts")
    return prompts[: config.num_prompts] if config.num_prompts else prompts


class DiffusionEvaluator:
    """The `Evaluator` of a diffusion `model`: samples every prompt `samples_per_prompt` times at
    `resolution` (height, width in pixels; default: the model's) and scores the samples with the gold
    and other rewards."""

    world = shapes_world  #: the embedded world whose caption splits `eval.prompts` may name

    def __init__(
        self,
        config: EvalConfig,
        model: DiffusionModel,
        device: torch.device | str = "cpu",
        resolution: tuple[int, int] | None = None,
    ):
        self.config, self.model = config, model
        self.resolution = resolution or model.default_resolution
        self.prompts = [p for p in eval_prompts(config, self.world) for _ in range(config.samples_per_prompt)]
        names = ([config.gold] if config.gold else []) + [r for r in config.rewards if r != config.gold]
        if not names:
            raise ConfigError("eval needs a gold metric or at least one reward")
        self.gold_metric = names[0]
        self.rewards: dict[str, Reward] = {
            name: load_reward(name, **{"device": device, **config.reward_args.get(name, {})}) for name in names
        }

    def roles(self) -> str:
        """Which reward plays which role in the report (markdown)."""
        others = [f"`{name}`" for name in self.rewards if name != self.gold_metric]
        if self.config.gold:
            head = f"the gold metric `{self.gold_metric}` (never trained on)"
        else:
            head = (
                f"no gold metric (`eval.gold: null`): `{self.gold_metric}`, the first of `eval.rewards`, "
                "is reported as gold"
            )
        return head + (f"; also reported: {', '.join(others)}" if others else "")

    def sample(self, use_reference: bool = False, show_progress: bool = False) -> torch.Tensor:
        """Images `(N, 3, H, W)` in [0, 1] for every evaluation prompt, with the fixed eval noise."""
        c, model = self.config, self.model
        shape = self.latent_shape()
        images = []
        for start in tqdm(
            range(0, len(self.prompts), c.batch_size), desc="evaluating", leave=False, disable=not show_progress
        ):
            prompts = self.prompts[start : start + c.batch_size]
            noise = torch.stack(
                [torch.randn(shape, generator=keyed_generator(c.seed, start + i)) for i in range(len(prompts))]
            )
            latents = model.sample(
                prompts,
                num_steps=c.num_steps,
                guidance_scale=c.guidance_scale,
                guidance_scale_2=c.guidance_scale_2,
                noise=noise,
                use_reference=use_reference,
                **self.sample_kwargs(),
            )
            images.append(model.decode_latents(latents).cpu())
        return torch.cat(images)

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latents (no batch axis)."""
        return self.model.latent_shape(1, self.resolution)[1:]

    def sample_kwargs(self) -> dict:
        return {"resolution": self.resolution}

    def score(self, images: torch.Tensor) -> dict[str, float]:
        metrics = {}
        for name, reward in self.rewards.items():
            metrics[name] = float(reward(images, self.prompts).mean())
            if hasattr(reward, "breakdown"):
                for check, value in reward.breakdown(images, self.prompts).items():
                    metrics[f"{name}/{check}"] = value
        return metrics

    def evaluate(self, step: int, show_progress: bool = False) -> Evaluation:
        images = self.sample(show_progress=show_progress)
        n = min(self.config.grid_size, len(images))
        grid = image_grid(images[:n], self.prompts[:n])
        return Evaluation(self.score(images), grid, {"images": images})


class VideoEvaluator(DiffusionEvaluator):
    """Held-out evaluation of a text-to-video model: clips of `num_frames` frames at `resolution`,
    scored by video rewards; the grid is one row of frames per clip, the animation a GIF of all."""

    world = balls_world

    def __init__(
        self,
        config: EvalConfig,
        model: DiffusionModel,
        resolution: tuple[int, int],
        num_frames: int,
        fps: float,
        device: torch.device | str = "cpu",
    ):
        super().__init__(config, model, device, resolution)
        self.num_frames, self.fps = num_frames, fps

    def latent_shape(self) -> tuple[int, ...]:
        return self.model.latent_shape(1, self.resolution, self.num_frames)[1:]

    def evaluate(self, step: int, show_progress: bool = False) -> Evaluation:
        videos = self.sample(show_progress=show_progress)
        n = min(self.config.grid_size, len(videos))
        return Evaluation(
            self.score(videos), video_strips(videos[:n], self.prompts[:n]), {"images": videos},
            animation=video_grid_frames(videos[:n], self.prompts[:n]), fps=self.fps,
        )  # fmt: skip
