"""Writing a trained diffusion model the way diffusers reads it back: a mixin of `DiffusionModel`.

`save_lora` writes the adapter for `pipe.load_lora_weights`, `save_pretrained` the whole pipeline
with the LoRA merged (for `DiffusionPipeline.from_pretrained`), and `save` a run's result folder.

The class it mixes into provides: `pipe`, `family`, `lora_rank` (None under full fine-tuning) and
`denoiser_components()` (`{pipeline attribute: denoiser}`, two with Wan 2.2's experts).
"""

from __future__ import annotations

import copy
from pathlib import Path

from peft import get_peft_model_state_dict

from mmalign.models.lora import EXPERT_LORA_FILE, LORA_FILE


class PipelineSaving:
    """`save_lora`, `save_pretrained` and `save` of the host model's trained denoiser(s)."""

    def save_lora(self, directory: str | Path) -> None:
        """Write the LoRA adapter in diffusers' format: `pipe.load_lora_weights(directory)` loads it.

        With two experts (Wan 2.2 A14B) the low-noise expert's adapter is a second file,
        `EXPERT_LORA_FILE`, which `pipe.load_lora_weights(directory, weight_name=EXPERT_LORA_FILE,
        load_into_transformer_2=True)` loads (`mmalign.models.lora.load_lora` loads both)."""
        if self.lora_rank is None:
            raise RuntimeError("this model is fully fine-tuned; use save_pretrained")
        attr = self.family.denoiser_attr
        for name, module in self.denoiser_components().items():
            # peft's key format (`…to_q.lora_A.weight`) for every target: diffusers' converter would rename only
            # the attention projections to its older `lora.down` format, which its loader then drops
            state = get_peft_model_state_dict(module)
            config = module.peft_config["default"].to_dict()
            kwargs = {f"{attr}_lora_layers": state, f"{attr}_lora_adapter_metadata": config}
            weight_name = LORA_FILE if name == attr else EXPERT_LORA_FILE
            type(self.pipe).save_lora_weights(
                str(directory), weight_name=weight_name, safe_serialization=True, **kwargs
            )

    def save(self, directory: str | Path, pipeline: bool = False) -> list[str]:
        """The trained result into `directory`: `lora/` (with LoRA) and `pipeline/` (full fine-tuning, or
        `pipeline=True`: the whole pipeline with the LoRA merged); returns the sub-folders written."""
        directory, saved = Path(directory), []
        if self.lora_rank is not None:
            self.save_lora(directory / "lora")
            saved.append("lora")
        if self.lora_rank is None or pipeline:
            self.save_pretrained(directory / "pipeline")
            saved.append("pipeline")
        return saved

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the whole pipeline with the trained denoiser(s) (LoRA merged into the weights)."""
        originals = self.denoiser_components()
        for name, original in originals.items():
            trained = original
            if self.lora_rank is not None:
                trained = copy.deepcopy(original)
                trained.fuse_lora()
                trained.unload_lora()
            setattr(self.pipe, name, trained)
        try:
            self.pipe.save_pretrained(str(directory), safe_serialization=True)
        finally:
            for name, original in originals.items():
                setattr(self.pipe, name, original)
