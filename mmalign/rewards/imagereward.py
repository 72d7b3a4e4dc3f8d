"""ImageReward (Xu et al. 2023): BLIP image encoder + cross-attending BERT text encoder + an MLP head.

Checked against THUDM/ImageReward, `ImageReward/ImageReward.py` (`ImageReward.score` / `score_gard`)
and `ImageReward/models/BLIP/{blip.py,blip_pretrain.py,vit.py,med.py}`:

- the image (224 px: bicubic short-side resize, centre crop, OpenAI CLIP mean/std) goes through
  BLIP's ViT-L/16 (`create_vit('large')`: width 1024, 24 blocks, 16 heads, LayerNorm eps 1e-6, a
  final `norm`) → `image_embeds (N, 1 + 196, 1024)`;
- the prompt, tokenised by `bert-base-uncased` (`padding='max_length', truncation=True,
  max_length=35`), runs through the BERT text encoder (`med_config.json`, every layer with
  cross-attention to `image_embeds`, bidirectional self-attention, no pooler);
- the `[CLS]` state `(N, 768)` goes through the same MLP as the LAION aesthetic head
  (`Linear 768→1024→128→64→16→1`, no activations), and the score is
  `(mlp - 0.16717362830052426) / 1.0333394966054072` (the constants `self.mean`, `self.std` there).

The network here is transformers' `BlipVisionModel` + `BlipTextModel` (the port of BLIP's `vit.py` and
`med.py`), with the release keys renamed: `blip.visual_encoder.{cls_token, pos_embed,
patch_embed.proj, blocks.i.{norm1, norm2, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}, norm}` →
`vision.{embeddings.class_embedding, embeddings.position_embedding, embeddings.patch_embedding,
encoder.layers.i.{layer_norm1, layer_norm2, self_attn.qkv, self_attn.projection, mlp.fc1, mlp.fc2},
post_layernorm}`; `blip.text_encoder.*` keeps its names under `text.`; `mlp.*` under `mlp.`. Keys the
score does not use (BLIP's `vision_proj`, `text_proj`, ...) are dropped, as the original's
`load_state_dict(strict=False)` ignores them. The ViT's sizes are read from the weights' shapes, so
any BLIP ViT (base or large) loads.

Files (Hub repo `THUDM/ImageReward`): `ImageReward.pt` (a pickled state dict: read only with
`allow_pickle=True`, via `torch.load(weights_only=True)`, or converted once with
`python scripts/convert_reward_weights.py ImageReward.pt` into `ImageReward.safetensors`, read by
default) and `med_config.json`; the tokenizer is `bert-base-uncased` (any folder with its files).
"""

from __future__ import annotations

import json
import math
import re

import torch
from torch import nn

from mmalign.models.weights import find_weight_file, read_state_dict
from mmalign.rewards.aesthetic import AestheticMLP
from mmalign.rewards.base import Reward, RewardInputError
from mmalign.rewards.clip_score import preprocess

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
DEFAULT_TOKENIZER = "bert-base-uncased"
RELEASE_NAME = "ImageReward.pt"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def rename_release_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release (`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.*`) → `ImageRewardModel` keys;
    every other key is dropped."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION_RENAMES:
                name, hits = re.subn(pattern, replacement, name)
                if hits:
                    renamed[f"vision.{name}"] = value
                    break
        elif key.startswith("blip.text_encoder.") and ".pooler." not in key:
            renamed["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            renamed[key] = value
    return renamed


def vision_config_from_weights(state: dict[str, torch.Tensor], head_width: int = 64):
    """BLIP ViT sizes from the release weights: width, depth, patch and image size; heads = width / 64
    (ViT-B: 12, ViT-L: 16, as `create_vit` builds them)."""
    from transformers import BlipVisionConfig

    width = state["blip.visual_encoder.cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    positions = state["blip.visual_encoder.pos_embed"].shape[1] - 1
    hidden_mlp = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=hidden_mlp,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // head_width),
        image_size=patch * math.isqrt(positions),
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )


def text_config_from_med(med: dict, encoder_width: int):
    """`BlipTextConfig` of BLIP's `med_config.json` (a BERT config with cross-attention to the ViT)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=med.get("pad_token_id", 0),
        is_decoder=True,  # BlipTextLayer builds its cross-attention only for decoder configs
    )


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP: `pixels (N, 3, S, S)`, prompt ids `(N, L)` → raw reward `(N,)`."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        return self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(-1)


class ImageReward(Reward):
    """ImageReward of `(N, 3, H, W)` images in [0, 1] against prompts: standardised, about −2…2 on real data.

    Args:
        path: a folder with `ImageReward.safetensors` (converted) or `ImageReward.pt` and
            `med_config.json`; or the weight file itself, `med_config.json` beside it.
        tokenizer: the BERT tokenizer folder or Hub id (default: `path` if it holds tokenizer files,
            else `bert-base-uncased`).
        device: where the model runs (default CPU).
        batch_size: images scored per forward pass.
        allow_pickle: read the pickled release `.pt` with `torch.load(weights_only=True)`.
    """

    name = "imagereward"

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        allow_pickle: bool = False,
    ):
        from transformers import AutoTokenizer

        if path is None:
            raise RewardInputError("imagereward: pass path= (the folder of ImageReward.pt and med_config.json)")
        weights = find_weight_file(path, (RELEASE_NAME,))
        med_file = weights.parent / "med_config.json"
        if not med_file.is_file():
            raise RewardInputError(f"{weights.parent}: no med_config.json (it comes with ImageReward.pt)")
        state = read_state_dict(weights, allow_pickle)
        if "blip.visual_encoder.cls_token" not in state:
            raise RewardInputError(f"{weights}: not an ImageReward state dict (no blip.visual_encoder.cls_token)")
        vision_config = vision_config_from_weights(state)
        model = ImageRewardModel(
            vision_config, text_config_from_med(json.loads(med_file.read_text()), vision_config.hidden_size)
        )
        missing, _ = model.load_state_dict(rename_release_keys(state), strict=False)
        if missing:
            raise RewardInputError(f"{weights}: missing ImageReward weights: {', '.join(missing[:5])}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        folder = weights.parent
        if tokenizer is None:
            has_tokenizer = any((folder / f).is_file() for f in _TOKENIZER_FILES)
            tokenizer = str(folder) if has_tokenizer else DEFAULT_TOKENIZER
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.size = vision_config.image_size
        self.batch_size = batch_size

    def differentiable_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """`(mlp(cls) − mean) / std` per image `(N,)`, with gradients flowing back to `images`."""
        pixels = preprocess(images.to(self.device, torch.float32), self.size, OPENAI_MEAN, OPENAI_STD)
        ids = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        raw = self.model(pixels, ids.input_ids.to(self.device), ids.attention_mask.to(self.device))
        return (raw - REWARD_MEAN) / REWARD_STD

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        with torch.no_grad():
            return self.differentiable_score(images, prompts or [])
