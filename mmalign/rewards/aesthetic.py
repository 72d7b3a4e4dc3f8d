"""LAION improved aesthetic predictor: an MLP on the L2-normalised CLIP ViT-L/14 image embedding.

Checked against christophschuhmann/improved-aesthetic-predictor, `simple_inference.py`: the image is
embedded by CLIP ViT-L/14 (`encode_image`, the projected 768-d feature), divided by its L2 norm, and
passed through `Linear(768, 1024) → Dropout(0.2) → Linear(1024, 128) → Dropout(0.2) → Linear(128, 64)
→ Dropout(0.1) → Linear(64, 16) → Linear(16, 1)` (no activations: the ReLUs are commented out there).
The prompt is ignored. Scores are on the AVA rating scale (about 1–10; real images mostly 4–7).

Files: a CLIP ViT-L/14 folder (`openai/clip-vit-large-patch14` in transformers layout, or an open_clip
folder) and the MLP weights (`sac+logos+ava1-l14-linearMSE.pth`, a pickled state dict with keys
`layers.{0,2,4,6,7}.{weight,bias}`), read with `allow_pickle=True` or after
`python scripts/convert_reward_weights.py sac+logos+ava1-l14-linearMSE.pth` as safetensors.
"""

from __future__ import annotations

import torch
from torch import nn

from mmalign.models.weights import find_weight_file, read_state_dict
from mmalign.rewards.base import Reward, RewardInputError
from mmalign.rewards.clip_score import ClipScore

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
MLP_RELEASE_NAMES = ("sac+logos+ava1-l14-linearMSE.pth", "ava+logos-l14-linearMSE.pth", "ava+logos-l14-reluMSE.pth")


class AestheticMLP(nn.Module):
    """The predictor's head: `(N, D)` normalised embeddings → `(N, 1)` scores (D = 768 for ViT-L/14)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_aesthetic_mlp(source: str, allow_pickle: bool) -> AestheticMLP:
    """The MLP from a weight file or a folder holding one of the release names (or its safetensors twin)."""
    state = read_state_dict(find_weight_file(source, MLP_RELEASE_NAMES), allow_pickle)
    if "layers.0.weight" not in state:
        raise RewardInputError(f"{source}: not an aesthetic-predictor MLP (no layers.0.weight)")
    mlp = AestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval().requires_grad_(False)


class Aesthetic(Reward):
    """LAION aesthetic score of `(N, 3, H, W)` images in [0, 1] (prompts not needed and ignored).

    Args:
        path: CLIP ViT-L/14 folder or Hub id (transformers or open_clip layout).
        mlp: the MLP weight file, or a folder holding it (default: `path`).
        device: where the models run (default CPU).
        batch_size: images embedded per forward pass.
        allow_pickle: read pickled CLIP / MLP weights with `torch.load(weights_only=True)`.
    """

    name = "aesthetic"
    needs_prompts = False

    def __init__(
        self,
        path: str | None = None,
        mlp: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        allow_pickle: bool = False,
    ):
        if mlp is None and path is None:
            raise RewardInputError("aesthetic: pass mlp= (the sac+logos+ava1-l14-linearMSE weights, file or folder)")
        self.clip = ClipScore(path or DEFAULT_CLIP, device=device, batch_size=batch_size, allow_pickle=allow_pickle)
        self.mlp = load_aesthetic_mlp(mlp or path, allow_pickle).to(self.clip.device)
        self.device = self.clip.device
        self.batch_size = batch_size

    def differentiable_score(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        """Scores `(N,)` with gradients flowing back to `images`."""
        return self.mlp(self.clip.image_embeddings(images)).squeeze(-1)

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        with torch.no_grad():
            return self.differentiable_score(images)
