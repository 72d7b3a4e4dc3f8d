"""Tiny vision-language models of real transformers architectures, built offline.

`build_tiny_vlm(family, directory)` writes a checkpoint folder that loads through the same
`AutoModelForImageTextToText` / `AutoProcessor.from_pretrained` path a hub checkpoint takes:

- `qwen2-vl`: `Qwen2VLForConditionalGeneration` + `Qwen2VLProcessor` (56 px → 4 image tokens);
- `qwen2.5-vl`: `Qwen2_5_VLForConditionalGeneration` + its processor;
- `llava`: `LlavaForConditionalGeneration` (CLIP vision tower, Llama text model) + `LlavaProcessor`;
- `idefics3`: `Idefics3ForConditionalGeneration` (SmolVLM class: SigLIP-style tower, pixel shuffle, Llama)
  + `Idefics3Processor` (no image splitting; 56 px → 4 image tokens).

The tokenizer is a byte-level BPE trained in about a second on `corpus` (any text still encodes,
down to single bytes), with each family's special tokens and a chat template that renders
`{"type": "image"}` content items as the family's image placeholder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from mmalign.models.tokenizers import byte_level_bpe

FAMILIES = ("qwen2-vl", "qwen2.5-vl", "llava", "idefics3")

_CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_QWEN_VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_SPECIAL = {
    "qwen2-vl": _CHATML + _QWEN_VISION,
    "qwen2.5-vl": _CHATML + _QWEN_VISION,
    "llava": _CHATML + ["<image>"],
    "idefics3": _CHATML + ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"],
}
_PLACEHOLDER = {
    "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2.5-vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
    "idefics3": "<image>",
}

#: Text the default tokenizer is trained on: chat scaffolding, reasoning tags, digits and the
#: vocabulary of the embedded worlds' questions.
DEFAULT_CORPUS = (
    "system user assistant <think> </think> <answer> </answer> yes no 0 1 2 3 4 5 6 7 8 9 "
    "How many red green blue yellow purple shapes circles squares triangles are there in the image? "
    "What colour is the largest shape? Is the circle left of the square? Which image matches the caption? "
    "Compare two images generated for the same prompt; think first, then answer with 1 or 2. "
    "a an the of on in above below left right image first second better because"
)


def chat_template(image_placeholder: str) -> str:
    """A ChatML jinja template: string or list content; image items become `image_placeholder`."""
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        f"{{% if c['type'] == 'image' %}}{image_placeholder}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def vlm_tokenizer(
    family: str, corpus: Iterable[str] = (DEFAULT_CORPUS,), vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the family's special tokens, end of turn `<|im_end|>`, pad `<|endoftext|>`."""
    bpe = byte_level_bpe(corpus, _SPECIAL[family], vocab_size, add_prefix_space=False, repeats=20)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        chat_template=chat_template(_PLACEHOLDER[family]),
        padding_side="left",
    )


@dataclass(frozen=True)
class VLMSize:
    """Widths of a tiny VLM. `image_size` is the side (px) images are resized to."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_width: int = 32
    vision_layers: int = 2
    image_size: int = 56


TINY_VLM = VLMSize()


def _text_config(tokenizer: PreTrainedTokenizerFast, size: VLMSize, **extra) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=2 * size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        **extra,
    )


def qwen_vl_model(family: str, tokenizer: PreTrainedTokenizerFast, size: VLMSize = TINY_VLM):
    """A randomly initialised `Qwen2VLForConditionalGeneration` (`qwen2-vl`) or
    `Qwen2_5_VLForConditionalGeneration` (`qwen2.5-vl`) over `tokenizer`'s vocabulary and specials."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    ids = tokenizer.convert_tokens_to_ids
    half = size.hidden // size.heads // 2  # M-RoPE splits head_dim/2 frequencies over (t, h, w)
    spatial = half * 3 // 8
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [half - 2 * spatial, spatial, spatial]}
    text = _text_config(tokenizer, size, rope_parameters=rope)
    tokens = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    if family == "qwen2-vl":
        vision = dict(
            depth=size.vision_layers,
            embed_dim=size.vision_width,
            hidden_size=size.hidden,
            num_heads=4,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
    vision = dict(
        depth=size.vision_layers,
        hidden_size=size.vision_width,
        intermediate_size=2 * size.vision_width,
        out_hidden_size=size.hidden,
        num_heads=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[size.vision_layers - 1],
    )
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))


def _qwen(family: str, tokenizer: PreTrainedTokenizerFast, size: VLMSize):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    model = qwen_vl_model(family, tokenizer, size)
    processor_class = Qwen2VLProcessor if family == "qwen2-vl" else Qwen2_5_VLProcessor
    pixels = size.image_size**2
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _llava(tokenizer: PreTrainedTokenizerFast, size: VLMSize):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    patch = size.image_size // 4  # 16 patches → 16 image tokens
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=size.vision_width,
        intermediate_size=2 * size.vision_width,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=4,
        image_size=size.image_size,
        patch_size=patch,
    )
    text = dict(model_type="llama", **_text_config(tokenizer, size))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        vision_feature_layer=-1,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config)
    side = size.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def _idefics3(tokenizer: PreTrainedTokenizerFast, size: VLMSize):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    side, patch, shuffle = size.image_size, 14, 2  # (56/14)² patches ÷ 2² pixel shuffle = 4 image tokens
    vision = dict(
        hidden_size=size.vision_width,
        intermediate_size=2 * size.vision_width,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=4,
        image_size=side,
        patch_size=patch,
    )
    text = dict(model_type="llama", **_text_config(tokenizer, size))
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=shuffle,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Idefics3ForConditionalGeneration(config)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": side}, max_image_size={"longest_edge": side}, do_image_splitting=False
        ),
        tokenizer=tokenizer,
        image_seq_len=(side // patch) ** 2 // shuffle**2,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


_BUILDERS = {
    "qwen2-vl": lambda t, s: _qwen("qwen2-vl", t, s),
    "qwen2.5-vl": lambda t, s: _qwen("qwen2.5-vl", t, s),
    "llava": _llava,
    "idefics3": _idefics3,
}


def build_tiny_vlm(
    family: str,
    directory: str | Path,
    *,
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    size: VLMSize = TINY_VLM,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised tiny VLM of `family` and save model + processor into `directory`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; choose one of {FAMILIES}")
    tokenizer = vlm_tokenizer(family, corpus)
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family](tokenizer, size)
    model.eval()
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config.update(
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")
    )
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
