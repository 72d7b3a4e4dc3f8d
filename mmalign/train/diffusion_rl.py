"""`DiffusionRLMethod`: what online RL methods for diffusion models share (Flow-GRPO, DiffusionNFT).

Each micro-batch is a rollout (`mmalign.train.rollouts`): `train.batch_size` prompts of the training
stream (split over processes), each sampled `group_size` times by the policy, decoded, scored by the
training reward, and turned into group-normalised advantages (`mmalign.losses.reward_advantages`):

- the reward (`rewards`) is any `load_reward` spec: a name, a folder, `http://host:port/name` (a
  `mmalign serve-reward` server), or `{name: weight, …}`; with `per_reward_normalisation` each term
  of a weighted sum is normalised within its group before the weighted mean (GDPO-style), otherwise
  the weighted sum is;
- the prompt stream is the training prompts reshuffled every pass, a pure function of the seed;
  rollout noise is keyed by (seed, rollout, process), so a resumed run repeats every rollout;
- with `ema`, an exponential moving average of the trained weights (`mmalign.train.ema`) is updated
  after every optimizer step, checkpointed, and is what evaluation samples and the run saves;
- evaluation samples the held-out prompts (`eval`) and adds the training reward on them as the
  metric `reward`, beside the gold metric, so the trainer's reward-hacking monitor
  (`eval.monitor`) can compare the two.

A subclass sets `config_class` and writes `generate(prompts, generator, step)` (the rollout's
samples) and `compute_loss`.
"""

from __future__ import annotations

import contextlib
import random
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, EvalConfig, ModelConfig, check_range, option
from mmalign.data import balls_world, shapes_world
from mmalign.data.prompts import read_prompts
from mmalign.losses import reward_advantages
from mmalign.models.state import full_tensor, holds_whole_state, named_parameters, shard_like
from mmalign.models.trajectory import Trajectory
from mmalign.rewards import load_reward
from mmalign.rewards.combine import WeightedSum
from mmalign.train.diffusion_method import check_guidance_scale_2, check_sharded_save, load_diffusion_model
from mmalign.train.ema import EMA
from mmalign.train.evaluation import DiffusionEvaluator, VideoEvaluator
from mmalign.train.method import Evaluation, Method
from mmalign.train.rng import key_seed, keyed_generator
from mmalign.train.rollouts import RolloutSchedule, RolloutSource

EMA_PREFIX = "ema/"


@dataclass
class PromptDataConfig:
    """The `data` section of online diffusion methods: the prompts rollouts are sampled from."""

    prompts: str = option(
        "training prompts: train (the embedded world's training captions), a text file with one prompt per "
        "line, or a .jsonl file of rows with a prompt field",
        default="train",
    )
    resolution: list[int] | None = option(
        "[height, width] of rollouts and evaluation samples; null = the model's default (the balls world's "
        "size for a video model on embedded prompts)",
        default=None,
    )
    num_frames: int | None = option(
        "video models: pixel frames per sample; null = the balls world's with embedded prompts, else the "
        "pipeline's default",
        default=None,
    )
    fps: float = option("video models: frame rate of the samples (for video rewards and GIFs)", default=8.0)

    def __post_init__(self) -> None:
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 8):
            raise ConfigError(f"data.resolution must be [height, width] of at least 8 px, got {self.resolution}")
        check_range("data.num_frames", self.num_frames, 1)
        check_range("data.fps", self.fps, 0, open_low=True)


@dataclass
class DiffusionRLConfig:
    """Options every online diffusion method has; Flow-GRPO's and DiffusionNFT's configs extend it."""

    rewards: Any = option(
        "the training reward: a reward name, folder or http:// URL, or {name: weight, …} (a weighted sum; "
        "docs/rewards.md)",
        default="clip-score",
    )
    reward_args: dict[str, Any] = option(
        "keyword arguments for the training reward, e.g. {path: /models/PickScore_v1}", default_factory=dict
    )
    per_reward_normalisation: bool = option(
        "normalise each reward of a weighted sum within its group before the weighted mean (GDPO-style); "
        "false: normalise the weighted sum",
        default=False,
    )
    group_size: int = option("samples per prompt (G); advantages are normalised within each group", default=8)
    num_steps: int = option("sampling steps of a rollout", default=10)
    guidance_scale: float = option("classifier-free guidance during rollouts (1 = off)", default=1.0)
    guidance_scale_2: float | None = option(
        "two-expert models (Wan 2.2 A14B): guidance of the rollout steps on the low-noise expert (transformer_2), "
        "as WanPipeline's guidance_scale_2; null = guidance_scale; an error on a model with one denoiser",
        default=None,
    )
    iterations: int = option("optimizer steps per rollout (μ)", default=1)
    ema: bool = option("keep an EMA of the trained weights; evaluation samples and the run saves it", default=False)
    ema_decay: float = option("the EMA's largest decay (it warms up as (1 + step) / (10 + step))", default=0.99)

    def check_values(self, prefix: str) -> None:
        if isinstance(self.rewards, bool) or not isinstance(self.rewards, (str, dict)) or not self.rewards:
            raise ConfigError(
                f"config key '{prefix}rewards' must be a reward name or a {{name: weight}} mapping, "
                f"got {self.rewards!r}"
            )
        check_range(f"{prefix}group_size", self.group_size, 2)  # a group of one has no advantage
        check_range(f"{prefix}num_steps", self.num_steps, 1)
        check_range(f"{prefix}guidance_scale", self.guidance_scale, 1)
        check_range(f"{prefix}guidance_scale_2", self.guidance_scale_2, 1)
        check_range(f"{prefix}iterations", self.iterations, 1)
        check_range(f"{prefix}ema_decay", self.ema_decay, 0, 1)


@dataclass
class RolloutBatch:
    """One rollout: `prompts` (N = B·G, each prompt's G samples consecutive), the clean `latents (N, …)`,
    their `advantages (N,)`, the `trajectory` (methods that train on sampling steps), and what the
    objective fills on first use (`logp_old (N, W)`: the sampling weights' log-probs of the window steps)."""

    prompts: list[str]
    latents: torch.Tensor
    advantages: torch.Tensor
    index: int
    trajectory: Trajectory | None = None
    logp_old: torch.Tensor | None = None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class DiffusionRLMethod(Method):
    """Online RL on a `DiffusionModel` (module doc); subclasses write `generate` and `compute_loss`."""

    model_config_class = ModelConfig
    data_config_class = PromptDataConfig
    eval_config_class = EvalConfig
    config: DiffusionRLConfig

    def needs_reference(self) -> bool:
        """Whether the objective reads the reference (adapters off, or a frozen copy)."""
        return False

    # ------------------------------------------------------------------ setup
    def setup(self, accelerator) -> None:
        c, d = self.config, self.run.data
        self.schedule = RolloutSchedule.of_run(self.run.train, c.iterations, accelerator.num_processes,
                                               accelerator.process_index, self.run.method_section)  # fmt: skip
        if self.run.train.batch_size % accelerator.num_processes:
            raise ConfigError(
                f"train.batch_size={self.run.train.batch_size} prompts must split evenly over "
                f"{accelerator.num_processes} processes"
            )
        self.device = accelerator.device
        self.process_index = accelerator.process_index
        self.model = load_diffusion_model(self.run.model, self.device, self.needs_reference())
        check_guidance_scale_2(self.run, self.model)
        self.policy = self.model
        world = balls_world if self.model.is_video else shapes_world
        self.prompts = read_prompts(d.prompts, world, "data.prompts")
        embedded = d.prompts in ("train", "heldout")
        if d.resolution is not None:
            self.resolution = tuple(d.resolution)
        elif self.model.is_video and embedded:
            self.resolution = (balls_world.SIZE, balls_world.SIZE)
        else:
            self.resolution = self.model.default_resolution
        self.num_frames = d.num_frames or (balls_world.FRAMES if self.model.is_video and embedded else None)
        self.reward = load_reward(c.rewards, device=self.device, **c.reward_args)
        if self.model.is_video:
            frames = self.num_frames or self.model.default_num_frames
            self.evaluator = VideoEvaluator(self.run.eval, self.model, self.resolution, frames, d.fps, self.device)
        else:
            self.evaluator = DiffusionEvaluator(self.run.eval, self.model, self.device, self.resolution)
        self.set_trainable_module(self.model.denoiser)
        self.rollouts = RolloutSource(self.schedule, self.prompt_at, self.rollout)
        self._rollout_index = 0

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        """Train `module` (the prepared denoiser: DDP-wrapped, or sharded in place by FSDP2, whose parameters
        are then new objects) and average its trained parameters."""
        check_sharded_save(self.run.model, self.model.base_denoiser)
        self.model.denoiser = module
        self.average_parameters(self.model.base_denoiser)

    def average_parameters(self, denoiser: torch.nn.Module) -> None:
        """Start the moving averages of `denoiser`'s trained parameters (`averages`, by key prefix)."""
        named = [(n, p) for n, p in named_parameters(denoiser).items() if p.requires_grad]
        self.trainable_names = [n for n, _ in named]
        c = self.config
        self.ema = EMA([p for _, p in named], max_decay=c.ema_decay, module=denoiser) if c.ema else None
        #: moving averages of the trained weights, checkpointed under their key prefix
        self.averages: dict[str, EMA] = {EMA_PREFIX: self.ema} if self.ema is not None else {}

    # ------------------------------------------------------------------ prompts and rollouts
    def prompt_at(self, index: int) -> str:
        """Prompt `index` of the stream: the prompts reshuffled (keyed by the seed) on every pass."""
        n = len(self.prompts)
        order = list(range(n))
        random.Random(key_seed(self.run.seed, index // n, "prompts")).shuffle(order)
        return self.prompts[order[index % n]]

    def next_batch(self, step: int, micro: int) -> RolloutBatch:
        self._rollout_index = (step // self.config.iterations) * self.run.train.gradient_accumulation_steps + micro
        return self.rollouts.batch(step, micro)

    def rollout_generator(self, stream: str) -> torch.Generator:
        """The generator of this process's current rollout for `stream` (a pure function of the key)."""
        return keyed_generator(self.run.seed, self._rollout_index, self.process_index, stream)

    def sample_shape(self, n: int) -> tuple[int, ...]:
        """Latent shape of `n` samples at the run's resolution (and frames)."""
        return self.model.latent_shape(n, self.resolution, self.num_frames)

    @abstractmethod
    def generate(self, prompts: list[str]) -> tuple[torch.Tensor, Trajectory | None]:
        """The rollout's clean latents `(N, …)` for `prompts` (one entry per sample) and, for methods that
        train on sampling steps, the `Trajectory`."""

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> RolloutBatch:
        """Sample `group_size` samples of each prompt, score them, and compute their advantages."""
        c = self.config
        repeated = [p for p in prompts for _ in range(c.group_size)]
        latents, trajectory = self.generate(repeated)
        pixels = self.model.decode_latents(latents)
        scores, weights = self.score(pixels, repeated)
        advantages = reward_advantages(scores, weights, c.group_size, c.per_reward_normalisation)
        total = sum(weights[k] * s for k, s in scores.items())
        groups = total.reshape(-1, c.group_size)
        stats = {
            "reward": total.mean(),
            "reward_std_in_group": groups.std(dim=1).mean(),
            "frac_reward_zero_std": (groups == groups[:, :1]).all(dim=1).float().mean(),
        }
        if len(scores) > 1:
            stats.update({f"reward/{k}": s.mean() for k, s in scores.items()})
        return RolloutBatch(repeated, latents, advantages.to(self.device), self._rollout_index, trajectory, stats=stats)

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Each reward's scores `{name: (N,)}` of `pixels` and its weight; one entry for a single reward.
        A weighted sum's terms are scored once each and normalised as their spec says."""
        if isinstance(self.reward, WeightedSum):
            raw = self.reward.term_scores(pixels, prompts)
            scores = {t.name: t.normalised(raw[t.name]).float().cpu() for t in self.reward.terms}
            return scores, {t.name: t.weight for t in self.reward.terms}
        name = self.reward.name
        return {name: self.reward(pixels, prompts).float().cpu()}, {name: 1.0}

    # ------------------------------------------------------------------ moving averages
    def after_optimizer_step(self, step: int) -> None:
        for average in self.averages.values():
            average.update(step)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The EMA weights in the model inside the block when `ema` is on; the trained weights otherwise."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            yield

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights and every moving average (`<prefix><name>`), for checkpoints (gathered whole
        onto the main process under FSDP: every process calls this)."""
        state = self.model.trainable_state_dict()
        for prefix, average in self.averages.items():
            whole = {prefix + n: full_tensor(a) for n, a in zip(self.trainable_names, average.average)}
            if holds_whole_state(self.model.base_denoiser):
                state.update(whole)
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefixes = tuple(self.averages)
        self.model.load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith(prefixes)})
        for prefix, average in self.averages.items():
            values = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if sorted(values) != sorted(self.trainable_names):
                raise KeyError(f"the checkpoint lacks the moving average {prefix!r} of the trained weights")
            with torch.no_grad():
                for name, tensor in zip(self.trainable_names, average.average):
                    tensor.copy_(shard_like(values[name], tensor))

    # ------------------------------------------------------------------ evaluation and saving
    def evaluate(self, step: int) -> Evaluation:
        """The evaluator's metrics of the (EMA) model plus `reward`: the training reward of its samples."""
        with self.averaged():
            result = self.evaluator.evaluate(step)
        samples = result.details["images"].to(self.device)
        scores, weights = self.score(samples, self.evaluator.prompts)
        result.metrics["reward"] = float(sum(weights[k] * s for k, s in scores.items()).mean())
        return result

    def save_final(self, directory: Path) -> list[str]:
        with self.averaged():
            return self.model.save(directory, pipeline=self.run.model.save_pipeline)

    def data_used(self) -> dict[str, Any]:
        return {"prompts": self.run.data.prompts, "num_prompts": len(self.prompts)}

    def report_description(self) -> str:
        c, e = self.config, self.run.eval
        ema = f", evaluated and saved as an EMA (decay ≤ {c.ema_decay})" if c.ema else ""
        return (
            f"Model `{self.run.model.path}` trained online on `{self.run.data.prompts}` prompts "
            f"({len(self.prompts)}), {c.group_size} samples per prompt, reward `{self.reward.name}`{ema}. "
            f"Evaluated on `{e.prompts}` prompts ({e.samples_per_prompt} sample(s) each, the same noise before "
            f"and after) with {self.evaluator.roles()}; `reward` is the training reward of those samples."
        )
