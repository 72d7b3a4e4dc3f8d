"""A VLM reward model: a Bradley–Terry head on the last real token, and the trained model as a `Reward`.

`VLMRewardNet(model)` reads the final-layer hidden state at the last position whose attention
mask is 1 (right or left padding alike) of a chat-formatted `(prompt, image(s)[, response])` and maps
it to a scalar with `Linear(hidden, 1)` (normal init, std 1/(hidden + 1), bias 0, as ImageReward's
head). A trained reward is a folder: `mmalign_reward.json` (`"reward": "vlm-rm"`, the train-set
score mean and std used to normalise, metrics), `model/` (the VLM, LoRA merged) and
`head.safetensors`. `mmalign.load_reward("vlm-rm", path=folder)` scores images with prompts like
any other reward: `(score − mean) / std`, higher is better.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmalign.io import atomic_directory
from mmalign.models.vlm import PromptBatch, VisionLanguageModel
from mmalign.registry import resolve_model_path
from mmalign.rewards import REWARD_MANIFEST
from mmalign.rewards.base import Reward, RewardInputError
from mmalign.vlm.prefs import score_conversation

HEAD = "head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B, L)` mask → `(B,)` index of each row's last position with mask 1 (works for either padding side)."""
    length = attention_mask.shape[1]
    return length - 1 - torch.argmax(attention_mask.flip(1).to(torch.long), dim=1)


class VLMRewardNet(nn.Module):
    """A VLM backbone (possibly a peft model) plus a linear head on its last real token's hidden state."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, prompts: PromptBatch) -> torch.Tensor:
        """Scores `(B,)` of a batch encoded by `VisionLanguageModel.encode(..., add_generation_prompt=False)`."""
        out = self.backbone(**prompts.inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last_token_index(prompts.attention_mask)].float()).squeeze(-1)


def text_hidden_size(model: nn.Module) -> int:
    config = model.config
    return (config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size


def save_vlm_reward(directory: Path, vlm: VisionLanguageModel, net: VLMRewardNet, stats: dict[str, Any]) -> Path:
    """Write a loadable reward folder atomically (merged model, head weights, manifest with `mean`/`std`)."""
    with atomic_directory(directory) as tmp:
        vlm.save_pretrained(tmp / "model", merged=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in net.head.state_dict().items()}, str(tmp / HEAD))
        (tmp / REWARD_MANIFEST).write_text(json.dumps({"reward": "vlm-rm", **stats}, indent=2))
    return directory


class VLMReward(Reward):
    """A trained VLM reward model scoring images against prompts."""

    name = "vlm-rm"
    batch_size = 16

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu"):
        if path is None:
            raise RewardInputError("vlm-rm needs the trained reward's folder: load_reward('vlm-rm', path=...)")
        folder = Path(resolve_model_path(str(path)))
        manifest = folder / REWARD_MANIFEST
        if not manifest.is_file():
            raise RewardInputError(f"{folder}: not a trained VLM reward (no {REWARD_MANIFEST})")
        self.stats = json.loads(manifest.read_text())
        self.vlm = VisionLanguageModel.from_pretrained(folder / "model", device=device)
        self.net = VLMRewardNet(self.vlm.model, text_hidden_size(self.vlm.model)).to(device).eval()
        self.net.head.load_state_dict(load_file(str(folder / HEAD)))

    @torch.no_grad()
    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        pictures = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        conversations = [score_conversation(np.ascontiguousarray(p), t) for p, t in zip(pictures, prompts or [])]
        raw = self.net(self.vlm.encode(conversations, add_generation_prompt=False)).float().cpu()
        return (raw - self.stats["mean"]) / self.stats["std"]
