"""CLIP score: `100 · cos(image embedding, text embedding)` (the torchmetrics convention).

Two backends load local folders or Hub ids:
- `transformers`: any `CLIPModel` folder (`config.json` + safetensors + tokenizer + image
  processor config), e.g. `openai/clip-vit-large-patch14` or the embedded toy CLIP.
- `open_clip`: a folder with `open_clip_config.json` + `open_clip_model.safetensors`
  (or a pickled `open_clip_pytorch_model.bin` with `allow_pickle=True`)
  (`local-dir:` in open_clip's terms), or an `hf-hub:org/repo` id.

Images are preprocessed in torch (resize the short side, centre crop, normalise with the
model's mean/std), so scores are differentiable with respect to the pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.models.weights import PICKLE_HINT, reading_weights, use_safetensors
from mmalign.registry import resolve_model_path
from mmalign.rewards.base import Reward, RewardInputError

DEFAULT_CLIP = "embedded:shapes-clip"


def pooled(output) -> torch.Tensor:
    """Projected CLIP features across transformers versions (a tensor in 4.x, an output in 5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def preprocess(images: torch.Tensor, size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """`(N, 3, H, W)` in [0, 1] → resized (short side `size`), centre-cropped, normalised pixels."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    if (h, w) != (size, size):
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        images = images[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


class _TransformersCLIP:
    """A `CLIPModel` folder; tokenizer and image-processor settings from `processor` (default `path`)."""

    def __init__(self, path: str, device: torch.device, allow_pickle: bool, processor_path: str | None = None):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        with reading_weights(path, allow_pickle):
            model = CLIPModel.from_pretrained(path, use_safetensors=use_safetensors(allow_pickle))
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(processor_path or path)
        processor = CLIPImageProcessor.from_pretrained(processor_path or path)
        crop = processor.crop_size  # a dict in transformers 4, a SizeDict in 5, an int in old configs
        self.size = int(crop if isinstance(crop, int) else crop["height"])
        self.mean, self.std = list(processor.image_mean), list(processor.image_std)
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pooled(self.model.get_image_features(pixel_values=pixels))

    def text_features(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return pooled(
            self.model.get_text_features(
                input_ids=ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device)
            )
        )


class _OpenCLIP:
    def __init__(self, path: str, device: torch.device, allow_pickle: bool):
        import open_clip

        local = not path.startswith("hf-hub:")
        if local and not allow_pickle and not (Path(path) / "open_clip_model.safetensors").is_file():
            raise RewardInputError(f"{path}: no open_clip_model.safetensors (pickled weights: {PICKLE_HINT})")
        name = f"local-dir:{path}" if local else path
        with reading_weights(path, allow_pickle):
            model = open_clip.create_model(name)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = list(cfg.get("std", open_clip.OPENAI_DATASET_STD))

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def text_features(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(device))


class ClipScore(Reward):
    """`100 · cos` between CLIP image and prompt embeddings.

    Args:
        path: model folder or id; default the embedded shapes-world CLIP.
        backend: `auto` (open_clip when the folder holds `open_clip_config.json` or the id starts
            with `hf-hub:`), `transformers` or `open_clip`.
        device: where the model runs (default CPU).
        batch_size: images embedded per forward pass.
        allow_pickle: also read pickled (`.bin`) weights, with `torch.load(weights_only=True)`.
    """

    name = "clip-score"

    def __init__(
        self,
        path: str | None = None,
        backend: str = "auto",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        allow_pickle: bool = False,
    ):
        resolved = resolve_model_path(path or DEFAULT_CLIP)
        if backend == "auto":
            is_open_clip = resolved.startswith("hf-hub:") or (Path(resolved) / "open_clip_config.json").exists()
            backend = "open_clip" if is_open_clip else "transformers"
        if backend not in ("transformers", "open_clip"):
            raise ValueError(f"unknown CLIP backend {backend!r}; expected auto, transformers or open_clip")
        self.device = torch.device(device)
        self.backend = (
            _OpenCLIP(resolved, self.device, allow_pickle)
            if backend == "open_clip"
            else _TransformersCLIP(resolved, self.device, allow_pickle)
        )
        self.batch_size = batch_size
        self._text_cache: dict[str, torch.Tensor] = {}

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings `(N, D)`, cached per prompt string."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                feats = F.normalize(self.backend.text_features(missing, self.device).float(), dim=-1)
            self._text_cache.update(zip(missing, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings `(N, D)` of `(N, 3, H, W)` images in [0, 1] (keeps the graph)."""
        pixels = preprocess(
            images.to(self.device, torch.float32), self.backend.size, self.backend.mean, self.backend.std
        )
        return F.normalize(self.backend.image_features(pixels).float(), dim=-1)

    def differentiable_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores `(N,)` with gradients flowing back to `images`."""
        return 100.0 * (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        with torch.no_grad():
            return self.differentiable_score(images, prompts or [])
