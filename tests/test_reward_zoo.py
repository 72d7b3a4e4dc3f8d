"""The public reward models on tiny random instances saved in each release's file layout.

Each reward is loaded through `load_reward(name, path=...)` as a downloaded checkpoint would be, and
its scores are checked against an independent computation of the original formula; batching does
not change scores; pickled release files are refused without `allow_pickle` and read after the
conversion script. Tests marked `reference` compare with the original packages where they import
(`pytest -m reference`; they skip otherwise).
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmalign.models.tiny_rewards import tiny_aesthetic, tiny_hps, tiny_imagereward, tiny_pickscore
from mmalign.models.weights import PickledWeightsError
from mmalign.rewards import load_reward
from mmalign.rewards.base import RewardInputError

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red circle", "a blue square left of a green circle", "a cat", "a dog on the ball"]


def _images(n: int = 4, size: tuple[int, int] = (32, 32), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _batching_invariant(name: str, prompts: list[str] | None = None, **kwargs) -> None:
    images = _images(len(PROMPTS))
    one = load_reward(name, batch_size=1, **kwargs)(images, prompts)
    all_at_once = load_reward(name, batch_size=64, **kwargs)(images, prompts)
    assert torch.allclose(one, all_at_once, atol=1e-5), (one, all_at_once)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("zoo")
    model, processor = tiny_pickscore(root / "pickscore")
    return {
        "pickscore": (model, processor),
        "hps": tiny_hps(root / "hps", "HPS_v2_compressed.pt"),
        "hps21": tiny_hps(root / "hps21", "HPS_v2.1_compressed.pt", seed=1),
        "imagereward": tiny_imagereward(root / "imagereward"),
        "aesthetic": tiny_aesthetic(root / "aesthetic"),
    }


def _convert(file) -> None:
    from scripts.convert_reward_weights import convert

    convert(file)


# ------------------------------------------------------------------ PickScore
def test_pickscore_is_the_readme_formula(zoo):
    from transformers import CLIPModel, CLIPTokenizer

    model_dir, processor_dir = zoo["pickscore"]
    reward = load_reward("pickscore", path=str(model_dir), processor=str(processor_dir))
    images = _images()
    scores = reward(images, PROMPTS)

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(processor_dir)
    with torch.no_grad():  # the README: normalised features, logit_scale.exp() * text @ image.T
        image_embs = model.visual_projection(model.vision_model(pixel_values=(images - OPENAI_MEAN) / OPENAI_STD)[1])
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        ids = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_embs = model.text_projection(model.text_model(**ids)[1])
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (text_embs @ image_embs.T).diagonal()
    assert torch.allclose(scores, expected, atol=1e-4)
    assert scores.abs().max() > 1  # the logit scale (≈ 100) is applied

    images.requires_grad_(True)
    reward.differentiable_score(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    _batching_invariant("pickscore", PROMPTS, path=str(model_dir), processor=str(processor_dir))


# ------------------------------------------------------------------ HPSv2 / v2.1
def _hps_reference(folder, release_name: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """HPS `score`: open_clip CLIP forward on ResizeMaxSize-letterboxed pixels, diag(img @ txt.T)."""
    import json

    import open_clip
    import torchvision.transforms.functional as TF

    model = open_clip.CLIP(**json.loads((folder / "open_clip_config.json").read_text())["model_cfg"])
    model.load_state_dict(torch.load(folder / release_name, weights_only=True)["state_dict"])
    model.eval()
    h, w = images.shape[-2:]
    scale = 32 / max(h, w)
    new = (round(h * scale), round(w * scale))
    resized = TF.resize(images, list(new), TF.InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = 32 - new[0], 32 - new[1]
    padded = TF.pad(resized, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    with torch.no_grad():
        image_features, text_features, _ = model((padded - OPENAI_MEAN) / OPENAI_STD, open_clip.tokenize(prompts))
    return (image_features @ text_features.T).diagonal()


@pytest.mark.parametrize(
    ("name", "key", "release"),
    [("hpsv2", "hps", "HPS_v2_compressed.pt"), ("hpsv2.1", "hps21", "HPS_v2.1_compressed.pt")],
)
def test_hps_is_the_cosine_of_img_score_on_letterboxed_images(zoo, tmp_path, name, key, release):
    folder = tmp_path / key
    shutil.copytree(zoo[key], folder)
    with pytest.raises(PickledWeightsError, match="pickled, which can run code"):
        load_reward(name, path=str(folder))
    images = _images(size=(40, 24))  # not square: the longer side is resized, the shorter padded
    pickled = load_reward(name, path=str(folder), allow_pickle=True)(images, PROMPTS)
    assert torch.allclose(pickled, _hps_reference(folder, release, images, PROMPTS), atol=1e-4)
    assert (pickled.abs() <= 1).all()

    _convert(folder / release)
    converted = load_reward(name, path=str(folder))  # the .safetensors twin, no pickle allowed
    assert torch.allclose(converted(images, PROMPTS), pickled, atol=1e-6)
    _batching_invariant(name, PROMPTS, path=str(folder))


def test_hps_versions_read_their_own_release_file(zoo, tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    for key, release in (("hps", "HPS_v2_compressed.pt"), ("hps21", "HPS_v2.1_compressed.pt")):
        shutil.copy(zoo[key] / release, folder / release)
    shutil.copy(zoo["hps"] / "open_clip_config.json", folder)
    images = _images(2)
    v2 = load_reward("hpsv2", path=str(folder), allow_pickle=True)(images, PROMPTS[:2])
    v21 = load_reward("hpsv2.1", path=str(folder), allow_pickle=True)(images, PROMPTS[:2])
    assert torch.allclose(v2, load_reward("hpsv2", path=str(zoo["hps"]), allow_pickle=True)(images, PROMPTS[:2]))
    assert not torch.allclose(v2, v21)


# ------------------------------------------------------------------ ImageReward
def test_imagereward_matches_an_independent_blip_itm_computation(zoo, tmp_path):
    """The release weights loaded into transformers' `BlipForImageTextRetrieval` naming by the
    conversion transformers documents, then ImageReward's `score_gard` written out by hand."""
    import json

    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval

    folder = tmp_path / "ir"
    shutil.copytree(zoo["imagereward"], folder)
    with pytest.raises(PickledWeightsError, match="ImageReward.pt: the weights are pickled"):
        load_reward("imagereward", path=str(folder))
    images = _images()
    scores = load_reward("imagereward", path=str(folder), allow_pickle=True)(images, PROMPTS)

    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    med = json.loads((folder / "med_config.json").read_text())
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
    vision |= dict(image_size=32, patch_size=8, layer_norm_eps=1e-6)
    text = dict(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=128, intermediate_size=64)
    text |= dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    itm = BlipForImageTextRetrieval(BlipConfig(vision_config=vision, text_config=text)).eval()
    renamed = {}
    for k, v in state.items():  # convert_blip_original_pytorch_to_hf.py's renames
        k = k.replace("blip.visual_encoder.", "vision_model.").replace("blip.text_encoder.", "text_encoder.")
        for old, new in [
            ("vision_model.cls_token", "vision_model.embeddings.class_embedding"),
            ("vision_model.pos_embed", "vision_model.embeddings.position_embedding"),
            ("vision_model.patch_embed.proj", "vision_model.embeddings.patch_embedding"),
            ("vision_model.blocks", "vision_model.encoder.layers"),
            (".norm1", ".layer_norm1"),
            (".norm2", ".layer_norm2"),
            (".attn.proj", ".self_attn.projection"),
            (".attn.qkv", ".self_attn.qkv"),
            ("vision_model.norm", "vision_model.post_layernorm"),
        ]:
            k = k.replace(old, new)
        renamed[k] = v
    missing = itm.load_state_dict(renamed, strict=False).missing_keys
    assert not [k for k in missing if k.startswith(("vision_model.", "text_encoder."))]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mlp = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}
    with torch.no_grad():
        pixels = (images - OPENAI_MEAN) / OPENAI_STD
        image_embeds = itm.vision_model(pixel_values=pixels)[0]
        ids = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        cls = itm.text_encoder(
            input_ids=ids.input_ids,
            attention_mask=ids.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
        )[0][:, 0, :]
        x = cls
        for i in (0, 2, 4, 6, 7):  # Linear layers of the head; Dropouts are identity in eval
            x = x @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
        expected = (x.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    assert torch.allclose(scores, expected, atol=1e-4), (scores, expected)
    assert scores.std() > 1e-3

    _convert(folder / "ImageReward.pt")
    reward = load_reward("imagereward", path=str(folder))
    assert torch.allclose(reward(images, PROMPTS), scores, atol=1e-6)
    images.requires_grad_(True)
    reward.differentiable_score(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    _batching_invariant("imagereward", PROMPTS, path=str(folder))


# ------------------------------------------------------------------ aesthetic
def test_aesthetic_is_the_mlp_on_the_normalised_clip_embedding(zoo, tmp_path):
    from transformers import CLIPModel

    folder = tmp_path / "aes"
    shutil.copytree(zoo["aesthetic"], folder)
    release = folder / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(PickledWeightsError, match="linearMSE.pth: the weights are pickled"):
        load_reward("aesthetic", path=str(folder))
    images = _images()
    scores = load_reward("aesthetic", path=str(folder), allow_pickle=True)(images)

    clip = CLIPModel.from_pretrained(folder).eval()
    mlp = torch.load(release, weights_only=True)
    with torch.no_grad():
        emb = clip.visual_projection(clip.vision_model(pixel_values=(images - OPENAI_MEAN) / OPENAI_STD)[1])
        x = (emb / emb.norm(dim=-1, keepdim=True)).numpy().astype(np.float64)  # simple_inference's `normalized`
    for i in (0, 2, 4, 6, 7):
        x = x @ mlp[f"layers.{i}.weight"].double().numpy().T + mlp[f"layers.{i}.bias"].double().numpy()
    assert np.allclose(scores.numpy(), x[:, 0], atol=1e-4)

    _convert(release)
    release.unlink()
    reward = load_reward("aesthetic", path=str(folder))
    assert torch.allclose(reward(images, PROMPTS), scores, atol=1e-6)  # prompts are ignored
    assert torch.allclose(
        load_reward("aesthetic", path=str(folder), mlp=str(release.with_suffix(".safetensors")))(images), scores
    )
    _batching_invariant("aesthetic", None, path=str(folder))


def test_aesthetic_needs_its_mlp_weights():
    with pytest.raises(RewardInputError, match="pass mlp="):
        load_reward("aesthetic")


# ------------------------------------------------------------------ JPEG
def test_jpeg_rewards_are_ddpo_file_sizes():
    images = torch.cat([_images(2, size=(64, 48)), torch.full((1, 3, 64, 48), 0.5)])
    incompressibility = load_reward("jpeg-incompressibility")(images)
    expected = []
    for im in images:
        buffer = io.BytesIO()
        array = (im * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    assert torch.allclose(incompressibility, torch.tensor(expected))
    assert torch.equal(load_reward("jpeg-compressibility")(images, "ignored"), -incompressibility)
    assert incompressibility[2] < incompressibility[0]  # a flat grey image compresses better than noise
    _batching_invariant("jpeg-compressibility")


# ------------------------------------------------------------------ VLM judges
@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    from mmalign.models.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm("qwen2-vl", tmp_path_factory.mktemp("vqa") / "vlm")


def test_vqascore_is_p_yes_over_yes_and_no(tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    images = _images(3, size=(56, 56))
    prompts = ["a red circle", "a blue square left of a green circle and a yellow triangle", "a cat"]
    reward = load_reward("vqascore", path=str(tiny_vlm_dir), batch_size=3)
    scores = reward(images, prompts)

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    yes = processor.tokenizer.encode("Yes", add_special_tokens=False)[0]
    no = processor.tokenizer.encode("No", add_special_tokens=False)[0]
    expected, p_yes = [], []
    for image, prompt in zip(images, prompts):  # one at a time: no padding
        question = f'Does this figure show "{prompt}"? Please answer yes or no.'
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pil = Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        with torch.no_grad():
            logits = model(**processor(text=[text], images=[[pil]], return_tensors="pt")).logits[0, -1]
        probs = logits.softmax(-1)
        expected.append(probs[yes] / (probs[yes] + probs[no]))
        p_yes.append(probs[yes])
    assert torch.allclose(scores, torch.stack(expected), atol=1e-4)
    assert ((scores > 0) & (scores < 1)).all()
    unnormalised = load_reward("vqascore", path=str(tiny_vlm_dir), normalise=False, batch_size=1)(images, prompts)
    assert torch.allclose(unnormalised, torch.stack(p_yes), atol=1e-4)


def test_vlm_judge_question_is_configurable(tiny_vlm_dir):
    images = _images(2, size=(56, 56))
    judge = load_reward("vlm-judge", path=str(tiny_vlm_dir), question="Is {prompt} shown? Answer yes or no.")
    other = load_reward("vqascore", path=str(tiny_vlm_dir))
    assert not torch.allclose(judge(images, "a cat"), other(images, "a cat"))
    with pytest.raises(RewardInputError, match=r"must contain \{prompt\}"):
        load_reward("vlm-judge", path=str(tiny_vlm_dir), question="Is it good?")


def test_the_pairwise_judge_asks_in_both_orders(tiny_vlm_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmalign.rewards.vqascore import PAIRWISE_QUESTION

    a, b = _images(2, size=(56, 56)), _images(2, size=(56, 56)).flip(-1)
    prompts = ["a red circle", "a cat"]
    judge = load_reward("vlm-judge", path=str(tiny_vlm_dir), batch_size=2)
    prefer = judge.prefer(a, b, prompts)
    assert torch.allclose(prefer + judge.prefer(b, a, prompts), torch.ones(2), atol=1e-5)  # order bias cancels

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    yes = processor.tokenizer.encode("Yes", add_special_tokens=False)[0]
    no = processor.tokenizer.encode("No", add_special_tokens=False)[0]

    def first_is_better(first: torch.Tensor, second: torch.Tensor, prompt: str) -> torch.Tensor:
        text = PAIRWISE_QUESTION.format(prompt=prompt)
        content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]
        chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
        pils = [Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for x in (first, second)]
        with torch.no_grad():
            logits = model(**processor(text=[chat], images=[pils], return_tensors="pt")).logits[0, -1]
        return torch.sigmoid(logits[yes] - logits[no])

    expected = [0.5 * (first_is_better(x, y, p) + 1 - first_is_better(y, x, p)) for x, y, p in zip(a, b, prompts)]
    assert torch.allclose(prefer, torch.stack(expected), atol=1e-4)


# ------------------------------------------------------------------ the original packages
def _import_or_skip(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except (ImportError, OSError) as exc:  # an install without its data files fails with OSError
        pytest.skip(f"{module} does not import here: {exc}")


@pytest.mark.reference
def test_hps_matches_the_hpsv2_package(zoo):
    """hpsv2's own open_clip fork and `preprocess_val` transform on the same random weights."""
    import json

    _import_or_skip("hpsv2")
    oc = _import_or_skip("hpsv2.src.open_clip")
    from hpsv2.src.open_clip.transform import image_transform

    folder = zoo["hps"]
    model = oc.model.CLIP(**json.loads((folder / "open_clip_config.json").read_text())["model_cfg"], output_dict=True)
    model.load_state_dict(torch.load(folder / "HPS_v2_compressed.pt", weights_only=True)["state_dict"])
    model.eval()
    preprocess_val = image_transform(32, is_train=False, resize_longest_max=True)  # as light_augmentation=True
    images = _images(size=(40, 24))
    pils = [Image.fromarray((im * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for im in images]
    tokenizer = oc.get_tokenizer("ViT-H-14")
    expected = []
    with torch.no_grad():
        for pil, prompt in zip(pils, PROMPTS):
            out = model(preprocess_val(pil).unsqueeze(0), tokenizer([prompt]))
            expected.append((out["image_features"] @ out["text_features"].T).diagonal()[0])
    scores = load_reward("hpsv2", path=str(folder), allow_pickle=True)(pils, PROMPTS)
    assert torch.allclose(scores, torch.stack(expected), atol=2e-3)  # PIL vs torch bicubic resampling


@pytest.mark.reference
def test_imagereward_matches_the_image_reward_package(zoo):
    """ImageReward's own BLIP modules (`vit.py`, `med.py`) and MLP on the same random weights."""
    import json

    _import_or_skip("ImageReward")
    from ImageReward.ImageReward import MLP
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    folder = zoo["imagereward"]
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0).eval()
    config = BertConfig(**json.loads((folder / "med_config.json").read_text()))
    config.encoder_width = 128
    bert = BertModel(config=config, add_pooling_layer=False).eval()
    mlp = MLP(32).eval()
    for module, prefix in ((vit, "blip.visual_encoder."), (bert, "blip.text_encoder."), (mlp, "mlp.")):
        module.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    images = _images()
    with torch.no_grad():
        image_embeds = vit((images - OPENAI_MEAN) / OPENAI_STD)
        ids = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        out = bert(
            ids.input_ids,
            attention_mask=ids.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
            return_dict=True,
        )
        expected = (mlp(out.last_hidden_state[:, 0, :].float()).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    scores = load_reward("imagereward", path=str(folder), allow_pickle=True)(images, PROMPTS)
    assert torch.allclose(scores, expected, atol=1e-4)


def test_every_zoo_reward_is_registered():
    from mmalign.rewards import available_rewards

    names = {"pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic", "jpeg-compressibility"}
    names |= {"jpeg-incompressibility", "vqascore", "vlm-judge"}
    assert names <= set(available_rewards())


def test_letterbox_keeps_a_square_image_at_its_size():
    from mmalign.rewards.hps import letterbox

    images = _images(2)
    out = letterbox(images, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.equal(out, images)
    wide = letterbox(_images(1, size=(16, 32)), 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert wide.shape == (1, 3, 32, 32) and torch.equal(wide[..., :8, :], torch.zeros(1, 3, 8, 32))
    assert F.mse_loss(wide[..., 8:24, :], _images(1, size=(16, 32))) < 1e-10
