"""Tiny random instances of the public reward models, saved in each release's file layout.

Each builder writes what the real release ships (same file names, same key names, pickled where
the release is pickled), so the rewards load them through the path a downloaded checkpoint takes:

- `tiny_pickscore(dir)`: a transformers `CLIPModel` folder `dir/model` and its processor in
  `dir/processor` (the release keeps them apart: `PickScore_v1` + the LAION CLIP-H processor);
- `tiny_hps(dir, release_name)`: `HPS_v2*_compressed.pt`, a pickled `{"state_dict": ...}` of an
  open_clip `CLIP`, plus `open_clip_config.json` naming the tiny architecture (the release uses
  the built-in `ViT-H-14` instead);
- `tiny_imagereward(dir)`: `ImageReward.pt` (a pickled state dict with BLIP's key names:
  `blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`, plus unused BLIP heads),
  `med_config.json` and a BERT WordPiece tokenizer;
- `tiny_aesthetic(dir)`: a transformers CLIP folder and `sac+logos+ava1-l14-linearMSE.pth`, the
  pickled MLP state dict, sized to the tiny CLIP's projection.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from mmalign.models.tiny import TINY_SD, WORDS, clip_model, clip_processor
from mmalign.models.tokenizers import clip_tokenizer

BERT_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def tiny_pickscore(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny CLIP `dir/model` (weights + config only) and its tokenizer + image processor `dir/processor`."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, model_max_length=TINY_SD.max_tokens)
    model = clip_model(tokenizer, hidden=32, text_layers=2, vision_layers=2)
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # the release's learned scale is ≈ log(100)
    directory = Path(directory)
    model.save_pretrained(directory / "model")
    clip_processor(tokenizer).save_pretrained(directory / "processor")
    return directory / "model", directory / "processor"


def tiny_open_clip_model(seed: int = 0):
    """A tiny open_clip `CLIP` (32 px, patch 8) and its `model_cfg`; the text tower keeps the CLIP BPE sizes."""
    import open_clip

    torch.manual_seed(seed)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    return open_clip.CLIP(**model_cfg).eval(), model_cfg


def tiny_hps(directory: str | Path, release_name: str = "HPS_v2_compressed.pt", seed: int = 0) -> Path:
    """A folder holding `release_name` (pickled `{"state_dict": ...}`) and the tiny `open_clip_config.json`."""
    model, model_cfg = tiny_open_clip_model(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.save({"state_dict": model.state_dict()}, directory / release_name)
    return directory


def bert_vocab(words: tuple[str, ...] = WORDS) -> list[str]:
    """A WordPiece vocabulary: BERT's special tokens, ImageReward's added `[DEC]`/`[ENC]`, then `words`."""
    return [*BERT_SPECIAL, *words, "[DEC]", "[ENC]"]


#: transformers BLIP vision names → BLIP's `vit.py` names (the release's).
_VISION_TO_RELEASE = [
    (r"^embeddings\.class_embedding$", "cls_token"),
    (r"^embeddings\.position_embedding$", "pos_embed"),
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^post_layernorm\.", "norm."),
]


def imagereward_release_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`ImageRewardModel` weights under the release's key names (`blip.visual_encoder.*`, ...)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision."):
            name = key.removeprefix("vision.")
            for pattern, replacement in _VISION_TO_RELEASE:
                name, hits = re.subn(pattern, replacement, name)
                if hits:
                    break
            state[f"blip.visual_encoder.{name}"] = value
        elif key.startswith("text."):
            state["blip.text_encoder." + key.removeprefix("text.")] = value
        else:
            state[key] = value
    return state


def tiny_imagereward(directory: str | Path, seed: int = 0) -> Path:
    """A folder with `ImageReward.pt`, `med_config.json` and a BERT tokenizer, all tiny and random."""
    from transformers import BertTokenizer

    from mmalign.rewards.imagereward import ImageRewardModel, text_config_from_med, vision_config_from_weights

    torch.manual_seed(seed)
    vocab = bert_vocab()
    med = {
        "architectures": ["BertModel"],
        "hidden_act": "gelu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab),
        "encoder_width": 128,
        "add_cross_attention": True,
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
    }
    # sizes of a BLIP ViT written as release weights, read back the way the reward reads them
    shapes = {
        "blip.visual_encoder.cls_token": torch.zeros(1, 1, 128),
        "blip.visual_encoder.pos_embed": torch.zeros(1, 1 + 16, 128),
        "blip.visual_encoder.patch_embed.proj.weight": torch.zeros(128, 3, 8, 8),
        "blip.visual_encoder.blocks.0.mlp.fc1.weight": torch.zeros(256, 128),
        "blip.visual_encoder.blocks.1.mlp.fc1.weight": torch.zeros(256, 128),
    }
    vision_config = vision_config_from_weights(shapes)
    model = ImageRewardModel(vision_config, text_config_from_med(med, vision_config.hidden_size)).eval()
    with torch.no_grad():  # a spread of raw rewards around the release's mean, not all ≈ 0
        for p in model.mlp.parameters():
            p.normal_(0, 0.3)
    state = imagereward_release_state(model)
    state["blip.vision_proj.weight"] = torch.randn(16, 128)  # BLIP heads the score does not use
    state["blip.text_proj.weight"] = torch.randn(16, 32)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "ImageReward.pt")
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    return directory


def tiny_aesthetic(directory: str | Path, seed: int = 0) -> Path:
    """A tiny transformers CLIP folder holding also the pickled MLP `sac+logos+ava1-l14-linearMSE.pth`."""
    from mmalign.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, model_max_length=TINY_SD.max_tokens)
    model = clip_model(tokenizer, hidden=32, text_layers=2, vision_layers=2)
    directory = Path(directory)
    model.save_pretrained(directory)
    clip_processor(tokenizer).save_pretrained(directory)
    mlp = AestheticMLP(model.config.projection_dim)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.3)
    torch.save(mlp.state_dict(), directory / "sac+logos+ava1-l14-linearMSE.pth")
    return directory
