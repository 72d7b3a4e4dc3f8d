"""The shared VisionLanguageModel wrapper on tiny real architectures (Qwen2-VL, Qwen2.5-VL, LLaVA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmalign.models.tiny_vlm import FAMILIES, build_tiny_vlm
from mmalign.models.vlm import Conversation, ConversationError, LoraSpec, VisionLanguageModel


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {family: build_tiny_vlm(family, root / family) for family in FAMILIES}


def _image(seed: int, size: int = 56) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _ask(text: str, *images: Image.Image, source: str = "test") -> Conversation:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return Conversation([{"role": "user", "content": content}], list(images), source)


def _rollout(vlm: VisionLanguageModel, conversations, n=2, tokens=6):
    torch.manual_seed(0)
    return vlm.sample(conversations, n, max_new_tokens=tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_groups_and_completion_masks(tiny_vlms, family):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlms[family])
    rollout = _rollout(vlm, [_ask("How many red shapes?", _image(0)), _ask("What is 3+4?", _image(1))], n=3)
    assert rollout.completion_ids.shape[0] == 6 and len(rollout.texts) == 6
    assert [c.source for c in rollout.prompts.conversations] == ["test"] * 6
    assert torch.equal(rollout.prompts.input_ids[0], rollout.prompts.input_ids[2])  # a group repeats its prompt
    mask = rollout.completion_mask
    assert ((mask[:, 1:] <= mask[:, :-1]).all()) and (mask[:, 0] == 1).all()  # 1…1 0…0
    eos = next(iter(vlm.eos_token_ids))
    ids = torch.tensor([[5, eos, 7, 7], [5, 6, 7, 8]])
    assert vlm.completion_mask(ids).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_do_not_depend_on_the_batch_and_only_on_each_samples_own_image(tiny_vlms, family):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlms[family])
    conversations = [_ask("How many red shapes?", _image(0)), _ask("What colour is the largest shape?", _image(1))]
    # mixed image counts per sample (Qwen's flat pixel rows, LLaVA's image stack, Idefics3's padded image axis)
    conversations.append(_ask("Which image matches the caption?", _image(2), _image(3)))
    rollout = _rollout(vlm, conversations, n=1)
    full, _ = vlm.token_logprobs(rollout.prompts, rollout.completion_ids, rollout.completion_mask)
    for i in range(len(conversations)):
        one = vlm.encode([conversations[i]])
        ids, mask = rollout.completion_ids[i : i + 1], rollout.completion_mask[i : i + 1]
        single, _ = vlm.token_logprobs(one, ids, mask)
        m = mask[0].bool()
        torch.testing.assert_close(single[0][m], full[i][m], atol=1e-5, rtol=1e-5)
    # a new image for sample 0 changes sample 0's log-probs and nothing else
    images = [c.images for c in rollout.prompts.conversations]
    images[0] = [_image(99)]
    replaced = vlm.with_images(rollout.prompts, images)
    assert torch.equal(replaced.input_ids, rollout.prompts.input_ids)
    other, _ = vlm.token_logprobs(replaced, rollout.completion_ids, rollout.completion_mask)
    assert not torch.allclose(other[0], full[0])
    torch.testing.assert_close(other[1:], full[1:], atol=1e-5, rtol=1e-5)


def test_logprobs_use_the_sampling_temperature_and_entropy_matches_the_distribution(tiny_vlms):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlms["qwen2-vl"])
    rollout = _rollout(vlm, [_ask("How many red shapes?", _image(0))], n=2)
    args = (rollout.prompts, rollout.completion_ids, rollout.completion_mask)
    logits = vlm.forward(*args).logits[:, -rollout.completion_ids.shape[1] - 1 : -1]
    logp, entropy = vlm.token_logprobs(*args, temperature=2.0, with_entropy=True)
    expected = torch.log_softmax(logits / 2.0, -1)
    torch.testing.assert_close(logp, expected.gather(-1, rollout.completion_ids[..., None])[..., 0])
    torch.testing.assert_close(entropy, -(expected.exp() * expected).sum(-1))
    assert (entropy > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_reference_adapter_save_and_reload(family, tiny_vlms, tmp_path):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlms[family], lora=LoraSpec(rank=4))
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ("language_model" in n or "text_model" in n) for n in trainable)
    rollout = _rollout(vlm, [_ask("How many red shapes?", _image(0))], n=2)
    args = (rollout.prompts, rollout.completion_ids, rollout.completion_mask)
    before, _ = vlm.token_logprobs(*args)
    with torch.no_grad():
        for n, p in vlm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    after, _ = vlm.token_logprobs(*args)
    reference, _ = vlm.token_logprobs(*args, reference=True)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(reference, before)  # adapter disabled = the starting model
    assert not reference.requires_grad and after.requires_grad

    files = vlm.save_pretrained(tmp_path / "adapter")
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    placed = [n for n, _ in reloaded.model.named_parameters() if "lora_" in n]
    assert len(placed) == len(saved) == len(trainable)  # every saved tensor found its layer through peft
    torch.testing.assert_close(reloaded.token_logprobs(*args)[0], after.detach(), atol=1e-5, rtol=1e-5)
    vlm.save_pretrained(tmp_path / "merged", merged=True)
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert not merged.has_adapter
    torch.testing.assert_close(merged.token_logprobs(*args)[0], after.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vlm.token_logprobs(*args)[0], after)  # merging a copy left the adapter alone


def test_full_finetune_reference_is_a_frozen_copy(tiny_vlms):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlms["llava"], reference_copy=True)
    rollout = _rollout(vlm, [_ask("How many red shapes?", _image(0))], n=1)
    args = (rollout.prompts, rollout.completion_ids, rollout.completion_mask)
    before, _ = vlm.token_logprobs(*args)
    with torch.no_grad():
        for p in vlm.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.testing.assert_close(vlm.token_logprobs(*args, reference=True)[0], before.detach())
    plain = VisionLanguageModel.from_pretrained(tiny_vlms["llava"])
    with pytest.raises(ValueError, match="no reference"):
        plain.token_logprobs(*args, reference=True)


def test_bad_conversations_get_clear_errors(tiny_vlms, tmp_path):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlms["qwen2-vl"])
    no_user = Conversation([{"role": "system", "content": "be brief"}], [], "data.jsonl row 3")
    with pytest.raises(ConversationError, match="data.jsonl row 3: the chat has no user turn"):
        vlm.encode([no_user])
    missing = Conversation(_ask("How many?", _image(0)).messages, [], "data.jsonl row 4")
    with pytest.raises(ConversationError, match="row 4: the chat has 1 image item.* but 0 image"):
        vlm.encode([missing])
    with pytest.raises(ConversationError, match=r"row 5: image file .*nope.png does not exist"):
        vlm.encode([_ask("How many?", tmp_path / "nope.png", source="data.jsonl row 5")])
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ConversationError, match="row 6: cannot read image"):
        vlm.encode([_ask("How many?", tmp_path / "bad.png", source="data.jsonl row 6")])
    with pytest.raises(ConversationError, match="turn 0 has a content item of type 'video'"):
        vlm.encode([Conversation([{"role": "user", "content": [{"type": "video"}]}], [])])
    sliver = Image.new("RGB", (1, 400))  # Qwen's resize refuses aspect ratios above 200
    with pytest.raises(ConversationError, match="processor rejected .* of data.jsonl row 7"):
        qwen25 = VisionLanguageModel.from_pretrained(tiny_vlms["qwen2.5-vl"])
        qwen25.encode([_ask("How many?", sliver, source="data.jsonl row 7")])


def test_image_placeholders_are_never_sampled_nor_accepted_in_completions(tiny_vlms):
    vlm = VisionLanguageModel.from_pretrained(tiny_vlms["qwen2-vl"])
    image_pad = vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in vlm.placeholder_ids
    with torch.no_grad():  # make the placeholder the model's favourite token
        vlm.model.lm_head.weight[image_pad] = 10 * vlm.model.lm_head.weight.abs().max()
    rollout = _rollout(vlm, [_ask("How many red shapes?", _image(0))], n=4, tokens=8)
    assert not (rollout.completion_ids == image_pad).any()
    bad = rollout.completion_ids.clone()
    bad[0, 0] = image_pad
    with pytest.raises(ValueError, match="placeholder token"):
        vlm.token_logprobs(rollout.prompts, bad, rollout.completion_mask)
