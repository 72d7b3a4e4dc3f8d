"""Human Preference Score v2 / v2.1 (Wu et al. 2023): cosine of an open_clip ViT-H-14 fine-tuned on HPD.

Checked against tgxs002/HPSv2, `hpsv2/img_score.py` (`score`): the model is open_clip `ViT-H-14`
with the release checkpoint's `state_dict` loaded over it; `image_features @ text_features.T` on the
model's output features, which open_clip's `CLIP.forward` L2-normalises, and the diagonal is the
score: `cos(image, prompt)`, no logit scale (real images score about 0.2–0.35). The image transform
is `preprocess_val` of `hpsv2/src/open_clip/factory.py::create_model_and_transforms` with
`light_augmentation=True`, i.e. `transform.py::ResizeMaxSize`: resize the longer side to 224
(bicubic), pad the shorter side with zeros (before normalising) centred, then the OpenAI mean/std.

Files: `HPS_v2_compressed.pt` (v2.0) or `HPS_v2.1_compressed.pt` (v2.1) from the Hub repo
`xswu/HPSv2`, pickled dicts with the weights under `state_dict`. They are read only with
`allow_pickle=True` (`torch.load(weights_only=True)`), or converted once:
`python scripts/convert_reward_weights.py HPS_v2.1_compressed.pt` writes
`HPS_v2.1_compressed.safetensors` next to it, which is read by default. `path` is that file or
its folder. The architecture is open_clip's built-in `ViT-H-14` config unless the folder holds an
`open_clip_config.json` (`{"model_cfg": ...}`), which then defines it; the tokenizer is open_clip's
CLIP BPE (shipped in its wheel, no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.models.weights import find_weight_file, read_state_dict
from mmalign.rewards.base import Reward, RewardInputError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def letterbox(images: torch.Tensor, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """`(N, 3, H, W)` in [0, 1] → `(N, 3, size, size)`: longer side resized to `size` (bicubic,
    antialiased), the shorter padded with black centred (left/top get the smaller half), then normalised."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if scale != 1.0:
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    # ResizeMaxSize pads only when it resized; a non-square image whose longer side is already `size`
    # is padded here too, since the ViT takes square inputs only.
    pad_h, pad_w = size - new_h, size - new_w
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


class HPSv2(Reward):
    """HPS v2.0: `cos(image, prompt)` of the HPS-tuned open_clip ViT-H-14 on `(N, 3, H, W)` images in [0, 1].

    Args:
        path: the checkpoint file, or a folder holding it under its release name (or the converted
            `.safetensors` twin, preferred).
        model: open_clip architecture name when the folder has no `open_clip_config.json`.
        device: where the model runs (default CPU).
        batch_size: images embedded per forward pass.
        allow_pickle: read the pickled release `.pt` with `torch.load(weights_only=True)`.
    """

    name = "hpsv2"
    release_name = "HPS_v2_compressed.pt"

    def __init__(
        self,
        path: str | None = None,
        model: str = "ViT-H-14",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        allow_pickle: bool = False,
    ):
        import open_clip

        if path is None:
            raise RewardInputError(f"{self.name}: pass path= (the {self.release_name} file or its folder)")
        weights = find_weight_file(path, (self.release_name,))
        state = read_state_dict(weights, allow_pickle, key="state_dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        config_file = (Path(path) if Path(path).is_dir() else Path(path).parent) / "open_clip_config.json"
        if config_file.is_file():
            network = open_clip.CLIP(**json.loads(config_file.read_text())["model_cfg"])
        else:
            network = open_clip.create_model(model)
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise RewardInputError(f"{weights}: not an open_clip {model} state dict ({str(exc)[:300]})") from None
        self.device = torch.device(device)
        self.model = network.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.size = int(self.model.visual.image_size[0])
        self.batch_size = batch_size

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm prompt embeddings `(N, D)`."""
        return F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings `(N, D)` of `(N, 3, H, W)` images in [0, 1] (keeps the graph)."""
        pixels = letterbox(images.to(self.device, torch.float32), self.size, OPENAI_MEAN, OPENAI_STD)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def differentiable_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """`cos(image, prompt)` per image `(N,)`, with gradients flowing back to `images`."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        with torch.no_grad():
            return self.differentiable_score(images, prompts or [])


class HPSv21(HPSv2):
    """HPS v2.1: the same model and score with the v2.1 weights (`HPS_v2.1_compressed.pt`)."""

    name = "hpsv2.1"
    release_name = "HPS_v2.1_compressed.pt"
