"""`DiffusionPairMethod`: the shared base of methods that train a `DiffusionModel` on image pairs.

It loads the model (LoRA or full fine-tuning) and the preference pairs, builds the keyed noise
and timesteps of each sample, evaluates with `DiffusionEvaluator`, and saves the result.
Subclasses (Diffusion-DPO, SFT, SmPO, …) implement only `compute_loss`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.config import DataConfig, EvalConfig, ModelConfig
from mmalign.data.pairs import collate_pairs, load_pairs
from mmalign.data.sources import resolve_pairs_path
from mmalign.models.diffusion import DiffusionModel
from mmalign.models.families import Conditioning
from mmalign.registry import resolve_model_path
from mmalign.train.evaluation import DiffusionEvaluator
from mmalign.train.method import Method
from mmalign.train.rng import keyed_generator

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_diffusion_model(m: ModelConfig, device: torch.device, reference: bool) -> DiffusionModel:
    """The `model` section's pipeline as a `DiffusionModel` on `device`, with a reference when asked."""
    return DiffusionModel.from_pretrained(
        m.path,
        torch_dtype=DTYPES[m.dtype],
        variant=m.variant,
        revision=m.revision,
        allow_pickle=m.allow_pickle,
        lora_rank=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_targets=tuple(m.lora_targets) if m.lora_targets else None,
        reference=reference,
        flow_sampling=m.flow_sampling,
        gradient_checkpointing=m.gradient_checkpointing,
        offload_frozen=m.offload_frozen,
    ).to(device)


class DiffusionPairMethod(Method):
    """Loads a `DiffusionModel` and a pair dataset; subclasses write `compute_loss`."""

    model_config_class = ModelConfig
    data_config_class = DataConfig
    eval_config_class = EvalConfig
    needs_reference: bool = True

    def setup(self, accelerator) -> None:
        self.load_model(accelerator)
        m, d = self.run.model, self.run.data
        resolution = d.resolution or self.model.default_resolution[0]
        with accelerator.main_process_first():
            path = resolve_pairs_path(d, self.model, resolve_model_path(m.path))
            self.dataset = load_pairs(
                path,
                split=d.split,
                resolution=resolution,
                drop_ties=d.drop_ties,
                max_pairs=d.max_pairs,
                random_crop=d.random_crop,
                random_flip=d.random_flip,
                seed=self.run.seed,
            )
        self.evaluator = DiffusionEvaluator(self.run.eval, self.model, device=self.device)

    def load_model(self, accelerator) -> None:
        """`self.model`: the `model` section's pipeline on the accelerator's device."""
        self.device = accelerator.device
        self.model = load_diffusion_model(self.run.model, self.device, self.needs_reference)
        self.policy = self.model

    # ------------------------------------------------------------------ Method plumbing
    def set_trainable_module(self, module: torch.nn.Module) -> None:
        self.model.denoiser = module  # the prepared (possibly DDP-wrapped) denoiser that training calls

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.dataset

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(items)

    def report_description(self) -> str:
        e = self.run.eval
        return (
            f"Model `{self.run.model.path}`, data `{self.run.data.path}`. Evaluated on `{e.prompts}` prompts "
            f"({e.samples_per_prompt} sample(s) each, the same noise before and after) with "
            f"{self.evaluator.roles()}."
        )

    def save_final(self, directory: Path) -> list[str]:
        return self.model.save(directory, pipeline=self.run.model.save_pipeline)

    # ------------------------------------------------------------------ shared maths inputs
    def sample_generators(self, index: torch.Tensor, step: int, stream: str) -> list[torch.Generator]:
        """One keyed generator per sample id and optimizer step: a sample draws the same noise whether
        it is in a large batch, a micro-batch of an accumulated step, or on another process."""
        return [keyed_generator(self.run.seed, step, int(i), stream) for i in index.tolist()]

    def noised_latents(
        self, pixels: torch.Tensor, index: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents, noise, timesteps and noised latents for `pixels (k·B, 3, H, W)`.

        `index (B,)` holds the sample ids; the `k` groups of B images (e.g. winners then losers)
        share each id's noise and timestep, as Diffusion-DPO requires. Returns `x0`, `noise`,
        `t` (each with k·B rows) and `x_t`.
        """
        groups = pixels.shape[0] // index.shape[0]
        vae_gens = [g for k in range(groups) for g in self.sample_generators(index, step, f"vae{k}")]
        x0 = self.model.encode_images(pixels, generator=vae_gens)
        return self.noise_latents(x0, index, step)

    def noise_latents(
        self, x0: torch.Tensor, index: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`noised_latents` for latents `x0 (k·B, …)` already encoded: the k groups share each id's
        noise and timestep. Returns `x0`, `noise`, `t` and `x_t`."""
        groups = x0.shape[0] // index.shape[0]
        noise_gens = self.sample_generators(index, step, "noise")
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in noise_gens]).to(x0.device)
        t = torch.cat([self.model.noise.sample_timesteps(1, g) for g in noise_gens]).to(x0.device)
        noise, t = noise.repeat(groups, *[1] * (noise.ndim - 1)), t.repeat(groups)
        return x0, noise, t, self.model.noise.add_noise(x0, noise, t)

    def conditioning(self, prompts: list[str], groups: int, resolution: tuple[int, int]) -> Conditioning:
        """Prompt conditioning tiled over `groups` ([p1..pB, p1..pB, …])."""
        return self.model.encode_prompt(prompts, resolution).tile(groups)
