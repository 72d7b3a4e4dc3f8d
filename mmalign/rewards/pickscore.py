"""PickScore (Kirstain et al. 2023): `logit_scale.exp() · cos(image embedding, prompt embedding)`.

The formula is the one of the PickScore README's `calc_probs` (yuvalkirstain/PickScore, README.md,
"Inference with PickScore"): image and text features of a transformers `CLIPModel` are L2-normalised,
their dot product is multiplied by `model.logit_scale.exp()` (about 100 in the release). The README
then takes a softmax over several images of one prompt; this reward returns the per-image score
before that softmax.

Files: the release `yuvalkirstain/PickScore_v1` (a CLIP-H `CLIPModel`: `config.json` + weights) and,
when that folder holds no tokenizer / image-processor config, the processor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (224 px, bicubic short-side resize, centre crop, OpenAI
mean/std). Images are preprocessed in torch, so `differentiable_score` passes gradients to pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmalign.registry import resolve_model_path
from mmalign.rewards.clip_score import ClipScore, _TransformersCLIP

DEFAULT_PICKSCORE = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json")


def processor_source(path: str, processor: str | None) -> str:
    """`processor` if given; else `path` when it holds a tokenizer or image-processor config; else the
    LAION CLIP-H processor the README names."""
    if processor:
        return resolve_model_path(processor)
    if any((Path(path) / name).is_file() for name in _PROCESSOR_FILES):
        return path
    return DEFAULT_PROCESSOR


class PickScore(ClipScore):
    """PickScore of `(N, 3, H, W)` images in [0, 1] against their prompts; scores about 15–25 on real data.

    Args:
        path: the PickScore `CLIPModel` folder or Hub id (default `yuvalkirstain/PickScore_v1`).
        processor: folder or Hub id of the tokenizer + image processor when `path` has none
            (default: `path` if it has them, else `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`).
        device: where the model runs (default CPU).
        batch_size: images embedded per forward pass.
        allow_pickle: also read a pickled `pytorch_model.bin`, with `torch.load(weights_only=True)`.
    """

    name = "pickscore"

    def __init__(
        self,
        path: str | None = None,
        processor: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        allow_pickle: bool = False,
    ):
        resolved = resolve_model_path(path or DEFAULT_PICKSCORE)
        self.device = torch.device(device)
        self.backend = _TransformersCLIP(resolved, self.device, allow_pickle, processor_source(resolved, processor))
        self.batch_size = batch_size
        self._text_cache: dict[str, torch.Tensor] = {}

    def differentiable_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """`logit_scale.exp() · cos` per image `(N,)`, with gradients flowing back to `images`."""
        scale = self.backend.model.logit_scale.exp().float()
        return scale * (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
