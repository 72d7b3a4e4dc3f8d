"""Bad inputs end in one-line errors naming the file, row or key; images of any bit depth read as intended."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.cli import main
from mmalign.data.pairs import DataError, decode_image, jsonl_rows
from mmalign.models.vlm import VisionLanguageModel
from mmalign.rewards.base import RewardInputError, load_image


def test_non_utf8_bytes_in_a_jsonl_name_the_row(tmp_path):
    file = tmp_path / "pairs.jsonl"
    file.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl, row 2: not UTF-8 text"):
        list(jsonl_rows(file, ("prompt",)))


def test_sixteen_bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    for read in (lambda p: decode_image(str(p), "test"), load_image):
        pixels = np.asarray(read(tmp_path / "ramp16.png"))
        assert pixels.shape == (64, 64, 3) and pixels.min() == 0 and pixels.max() == 255
        assert abs(float(pixels.mean()) - 127.5) < 2  # PIL's convert would give mostly 255
    floats = Image.fromarray(np.linspace(-1, 1, 16 * 16).reshape(16, 16).astype(np.float32), mode="F")
    pixels = np.asarray(decode_image(floats, "test"))
    assert pixels.min() == 0 and pixels.max() == 255


def test_a_decompression_bomb_is_a_named_error(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64² > 2 × 100: PIL refuses to decode it
    with pytest.raises(DataError, match="big.png.*corrupt or unreadable image"):
        decode_image(str(tmp_path / "big.png"), f"{tmp_path / 'big.png'}")
    with pytest.raises(RewardInputError, match="big.png: not a readable image"):
        load_image(tmp_path / "big.png")


def test_output_problems_are_one_line_errors(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(image)
    assert main(["score", "--reward", "shapes-gold", str(image), "--prompt", "a red circle",
                 "--csv", str(tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and len(err.splitlines()) == 1
    out = tmp_path / "samples"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "00000.png")
    assert main(["sample", "--prompt", "a red circle", "--out", str(out), "--steps", "1"]) == 2
    assert "holds the images of an earlier sample" in capsys.readouterr().err


def test_a_checkpoint_with_its_own_code_is_refused_without_running_it(tmp_path):
    config = {"model_type": "my_custom_vlm", "architectures": ["CustomModel"],
              "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                           "AutoModelForImageTextToText": "modeling_custom.CustomModel"}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (tmp_path / name).write_text('raise SystemExit("the checkpoint code ran")\n')
    with pytest.raises(ValueError, match="ships its own code, which mmalign does not run"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_values_that_were_accepted_silently_are_refused(tmp_path, tiny_pipelines):
    from mmalign.data.pairs import read_jsonl
    from mmalign.data.shapes_prefs import write_self_pairs
    from mmalign.models.diffusion import DiffusionModel

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(data / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    cases = [
        ({"image_0": "../secret.png", "image_1": "b.png", "label": 0}, "'../secret.png' leaves the data folder"),
        ({"image_0": "a.png", "image_1": "b.png", "label": True}, "field 'label': unknown label True"),
        ({"image_0": "a.png", "image_1": "b.png", "label": "1"}, "field 'label': unknown label '1'"),
        ({"image_0": "a.png", "image_1": "b.png", "label": 0, "prompt": " "}, "prompt must be a non-empty"),
    ]
    for row, message in cases:
        (data / "pairs.jsonl").write_text(json.dumps({"prompt": "a red circle", **row}) + "\n")
        with pytest.raises(DataError, match=message):
            read_jsonl(data / "pairs.jsonl")
    (data / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "image_0": str(tmp_path / "secret.png"),
                                                  "image_1": "b.png", "label": 0}) + "\n")  # fmt: skip
    assert len(read_jsonl(data / "pairs.jsonl")[0]) == 1  # an absolute path is the user's explicit choice

    model = DiffusionModel.from_pretrained(str(tiny_pipelines["sd"]), lora_rank=None, reference=False)

    from mmalign.rewards.base import Reward

    class NanReward(Reward):
        def score_batch(self, images, prompts):
            return torch.full((len(images),), float("nan"))

    nan_reward = NanReward()

    with pytest.raises(ValueError, match="labelling reward scored a candidate of 'a red circle'.*must be finite"):
        write_self_pairs(model, ["a red circle"], nan_reward, tmp_path / "pairs", candidates=2, min_margin=0.0,
                         num_steps=1, use_reference=False)  # fmt: skip
    assert not (tmp_path / "pairs").exists()


def test_a_vlm_prompt_longer_than_the_models_context_is_refused_naming_it(tmp_path):
    from mmalign.models.tiny_vlm import build_tiny_vlm
    from mmalign.models.vlm import Conversation

    vlm = VisionLanguageModel.from_pretrained(build_tiny_vlm("qwen2-vl", tmp_path / "vlm"))
    limit = vlm.context_length
    assert limit is not None
    text = " ".join(["red"] * (limit + 10))
    long = Conversation([{"role": "user", "content": [{"type": "text", "text": text}]}], [], "questions.jsonl, row 7")
    with pytest.raises(
        ValueError, match=rf"questions.jsonl, row 7: the prompt takes \d+ tokens .* reads {limit} at most"
    ):
        vlm.encode([long])
    short = Conversation([{"role": "user", "content": [{"type": "text", "text": "red"}]}], [], "row 1")
    assert vlm.encode([short]).input_ids.shape[1] < limit
