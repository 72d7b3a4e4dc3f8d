"""`DiffusionPairMethod`: the shared base of methods that train a `DiffusionModel` on image pairs.

It loads the model (LoRA or full fine-tuning) and the preference pairs, builds the keyed noise
and timesteps of each sample, evaluates with `DiffusionEvaluator`, and saves the result.
Subclasses (Diffusion-DPO, SFT, SmPO, …) implement only `compute_loss`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig
from mmalign.data.latent_cache import CachedPairs, cached_pairs
from mmalign.data.pairs import collate_pairs, load_pairs
from mmalign.data.sources import cache_root, resolve_pairs_path
from mmalign.models.diffusion import DiffusionModel
from mmalign.models.families import Conditioning
from mmalign.models.state import is_sharded
from mmalign.registry import resolve_model_path
from mmalign.train.evaluation import DiffusionEvaluator
from mmalign.train.method import Method
from mmalign.train.rng import keyed_generator

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_diffusion_model(m: ModelConfig, device: torch.device, reference: bool) -> DiffusionModel:
    """The `model` section's pipeline as a `DiffusionModel` on `device`, with a reference when asked."""
    model = DiffusionModel.from_pretrained(
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
    if m.embedded_guidance is not None:
        if not model.embeds_guidance:
            raise ConfigError(
                f"config key 'model.embedded_guidance': this {type(model.pipe).__name__} has no guidance input "
                "(guidance-distilled transformers such as FLUX.1-dev have one)"
            )
        model.embedded_guidance = m.embedded_guidance
    return model


def check_guidance_scale_2(run: RunConfig, model: DiffusionModel) -> None:
    """Refuse the run's `guidance_scale_2` options (`eval.guidance_scale_2`, `<method>.guidance_scale_2`) on a
    model without a low-noise expert: they guide `transformer_2` of a two-expert pipeline (Wan 2.2 A14B)."""
    options = {
        "eval.guidance_scale_2": getattr(run.eval, "guidance_scale_2", None),
        f"{run.method_section}.guidance_scale_2": getattr(run.method_args, "guidance_scale_2", None),
    }
    for key, value in options.items():
        if value is not None and model.experts is None:
            raise ConfigError(
                f"config key {key!r} guides the low-noise expert (transformer_2) of a two-expert pipeline such as "
                f"Wan 2.2 A14B; this {type(model.pipe).__name__} has one denoiser: remove it"
            )


def check_sharded_save(m: ModelConfig, denoiser: torch.nn.Module) -> None:
    """Refuse `model.save_pipeline` with LoRA on an FSDP-sharded denoiser: merging the adapter copies the
    denoiser, which FSDP2 cannot copy."""
    if m.save_pipeline and m.lora_rank is not None and is_sharded(denoiser):
        raise ConfigError(
            "model.save_pipeline=true with LoRA merges the adapter into a copy of the denoiser, which FSDP cannot "
            "copy: train with model.save_pipeline=false and fuse final/lora afterwards "
            "(pipe.load_lora_weights(...); pipe.fuse_lora())"
        )


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
        self.resolution = (resolution, resolution)
        with accelerator.main_process_first():
            path = resolve_pairs_path(d, self.model, resolve_model_path(m.path))
            self.pairs = load_pairs(
                path,
                split=d.split,
                resolution=resolution,
                drop_ties=d.drop_ties,
                max_pairs=d.max_pairs,
                random_crop=d.random_crop,
                random_flip=d.random_flip,
                seed=self.run.seed,
            )
            self.dataset = self.pairs
            if d.cache_latents:
                self.dataset = cached_pairs(self.pairs, self.model, cache_root(d), m.dtype, log=accelerator.print)
        self.evaluator = DiffusionEvaluator(self.run.eval, self.model, device=self.device)

    def load_model(self, accelerator) -> None:
        """`self.model`: the `model` section's pipeline on the accelerator's device."""
        self.device = accelerator.device
        self.model = load_diffusion_model(self.run.model, self.device, self.needs_reference)
        check_guidance_scale_2(self.run, self.model)
        self.policy = self.model

    # ------------------------------------------------------------------ Method plumbing
    def set_trainable_module(self, module: torch.nn.Module) -> None:
        check_sharded_save(self.run.model, self.model.base_denoiser)
        self.model.denoiser = module  # the prepared (possibly DDP-wrapped or sharded) denoiser that training calls

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self.dataset

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_pairs(items)

    def data_used(self) -> dict[str, Any]:
        used = super().data_used()
        if isinstance(getattr(self, "dataset", None), CachedPairs):
            used["latent_cache"] = str(self.dataset.directory)
        return used

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

    def clean_latents(self, batch: dict[str, Any], roles: tuple[str, ...], step: int) -> torch.Tensor:
        """Latents `x0 (k·B, C, h, w)` of the batch's images `roles` (`("w", "l")`: winners then losers):
        encoded from `pixels_<role>`, or drawn from the cached `posterior_<role>` (`data.cache_latents`).
        Group k draws its posterior samples from the stream `vae<k>` of each sample id, so both give the
        same latents."""
        index = batch["index"]
        generators = [g for k in range(len(roles)) for g in self.sample_generators(index, step, f"vae{k}")]
        if f"posterior_{roles[0]}" in batch:
            return self.model.sample_posterior(torch.cat([batch[f"posterior_{r}"] for r in roles]), generators)
        return self.model.encode_images(torch.cat([batch[f"pixels_{r}"] for r in roles]), generator=generators)

    def noise_latents(
        self, x0: torch.Tensor, index: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise, timesteps and noised latents for clean latents `x0 (k·B, …)` (`index (B,)`: the sample
        ids). The k groups of B latents (e.g. winners then losers) share each id's noise and timestep,
        as Diffusion-DPO requires. Returns `x0`, `noise`, `t` (each with k·B rows) and `x_t`."""
        groups = x0.shape[0] // index.shape[0]
        noise_gens = self.sample_generators(index, step, "noise")
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in noise_gens]).to(x0.device)
        t = torch.cat([self.model.noise.sample_timesteps(1, g) for g in noise_gens]).to(x0.device)
        noise, t = noise.repeat(groups, *[1] * (noise.ndim - 1)), t.repeat(groups)
        return x0, noise, t, self.model.noise.add_noise(x0, noise, t)

    def conditioning(self, prompts: list[str], groups: int, resolution: tuple[int, int] | None = None) -> Conditioning:
        """Prompt conditioning tiled over `groups` ([p1..pB, p1..pB, …]) at `resolution` (default: the
        training resolution); read from the latent cache when the run has one."""
        if isinstance(getattr(self, "dataset", None), CachedPairs):
            cond = self.dataset.prompts.conditioning(prompts).to(self.device)
        else:
            cond = self.model.encode_prompt(prompts, resolution or self.resolution)
        return cond.tile(groups)
