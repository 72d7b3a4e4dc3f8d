"""Pickled weights: refused by every loader unless allowed, then read with `weights_only=True` only.

Each loader is tried three ways on the same tiny model: its pickled copy refused with a one-line error
naming the folder or file, the same copy read when allowed (and equal to the safetensors original),
and a pickle that would run code refused even when allowed, without running it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.models.diffusion import DiffusionModel
from mmalign.models.lora import LORA_FILE, load_lora
from mmalign.models.tiny import tiny_open_clip
from mmalign.models.tiny_vlm import build_tiny_vlm
from mmalign.models.vlm import LoraSpec, VisionLanguageModel
from mmalign.models.weights import PickledWeightsError, pickled_only_folder
from mmalign.rewards import load_reward
from mmalign.rewards.base import RewardInputError

REFUSED = "pickled, which can run code when read; allow pickled weights"


class RunsCode:
    """Unpickling this object creates `marker`: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


#: safetensors file → the name its loader looks for when pickled (diffusers and peft swap the suffix)
PICKLED_NAMES = {"model.safetensors": "pytorch_model.bin"}


def pickle_folder(folder: Path, only: str | None = None) -> None:
    """Replace every safetensors file under `folder` (or only those under `only`) by a `.bin` twin."""
    for file in sorted(folder.rglob("*.safetensors")):
        if only is None or only in file.parts:
            torch.save(load_file(str(file)), file.with_name(PICKLED_NAMES.get(file.name, f"{file.stem}.bin")))
            file.unlink()


def plant(file: Path, marker: Path) -> None:
    """Write a `.bin` at `file` whose unpickling would run code."""
    torch.save({"weight": RunsCode(marker)}, file)


def error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The CLI's error: one line after any progress output, and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mmalign {command}: error: ")
    return last


@pytest.fixture(scope="module")
def sd_pickled(tiny_pipelines, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pickled") / "sd"
    shutil.copytree(tiny_pipelines["sd"], folder)
    pickle_folder(folder)
    return folder


def _denoise(model: DiffusionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    cond = model.encode_prompt(["a red circle"])
    with torch.no_grad():
        return model.predict(x, torch.tensor([500]), cond)


def test_a_pickled_pipeline_is_refused_then_read_when_allowed(tiny_pipelines, sd_pickled, tmp_path):
    with pytest.raises(PickledWeightsError, match=REFUSED):
        DiffusionModel.from_pretrained(str(sd_pickled), lora_rank=None, reference=False)
    allowed = DiffusionModel.from_pretrained(str(sd_pickled), lora_rank=None, reference=False, allow_pickle=True)
    original = DiffusionModel.from_pretrained(str(tiny_pipelines["sd"]), lora_rank=None, reference=False)
    assert torch.equal(_denoise(allowed), _denoise(original))

    one = tmp_path / "one"  # one component pickled, the others safetensors: that component is named
    shutil.copytree(tiny_pipelines["sd"], one)
    pickle_folder(one, only="unet")
    assert pickled_only_folder(one) == one / "unet"
    with pytest.raises(PickledWeightsError, match=r"/one/unet: the weights are pickled"):
        DiffusionModel.from_pretrained(str(one), lora_rank=None, reference=False)

    marker = tmp_path / "ran"
    planted = tmp_path / "planted"
    shutil.copytree(sd_pickled, planted)
    plant(planted / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(PickledWeightsError, match="holds more than tensors"):
        DiffusionModel.from_pretrained(str(planted), lora_rank=None, reference=False, allow_pickle=True)
    assert not marker.exists()


def test_the_cli_refuses_a_pickled_model_in_one_line(sd_pickled, tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs/image/diffusion_dpo.yaml"
    assert main(["train", str(config), f"model={sd_pickled}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = error_line(capsys, "train")
    assert str(sd_pickled) in err and "model.allow_pickle=true" in err
    args = ["sample", "--model", str(sd_pickled), "--prompt", "a red circle", "--steps", "1", "--num", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert REFUSED in error_line(capsys, "sample")
    assert main([*args, "--out", str(tmp_path / "b"), "--allow-pickle"]) == 0
    assert (tmp_path / "b" / "00000.png").is_file()


def test_a_pickled_lora_is_refused_then_loaded_when_allowed(tiny_pipelines, tmp_path, capsys):
    trained = DiffusionModel.from_pretrained(str(tiny_pipelines["sd"]), lora_rank=4, reference=False)
    for p in trained.denoiser.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    trained.save_lora(tmp_path / "lora")
    weights = tmp_path / "lora" / LORA_FILE
    torch.save(load_file(str(weights)), weights.with_suffix(".bin"))
    weights.unlink()

    base = DiffusionModel.from_pretrained(str(tiny_pipelines["sd"]), lora_rank=None, reference=False)
    with pytest.raises(PickledWeightsError, match=rf"pytorch_lora_weights.bin: the LoRA weights are {REFUSED}"):
        load_lora(base.pipe, tmp_path / "lora")
    load_lora(base.pipe, tmp_path / "lora", allow_pickle=True)
    trained.denoiser.eval()
    assert torch.allclose(_denoise(base), _denoise(trained), atol=1e-5)

    args = ["sample", "--prompt", "a red circle", "--steps", "1", "--lora", str(tmp_path / "lora")]
    args += ["--model", str(tiny_pipelines["sd"])]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "pytorch_lora_weights.bin" in error_line(capsys, "sample")

    marker = tmp_path / "ran"
    plant(weights.with_suffix(".bin"), marker)
    with pytest.raises(PickledWeightsError, match="holds more than tensors"):
        load_lora(base.pipe, tmp_path / "lora", allow_pickle=True)
    assert not marker.exists()


def _clip_scores(reward) -> torch.Tensor:
    images = torch.linspace(0, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    return reward(images, ["a red circle", "a blue square"])


def test_pickled_clip_folders_are_refused_then_read_when_allowed(tiny_clip_dir, tmp_path, capsys):
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    pickle_folder(clip)
    with pytest.raises(PickledWeightsError, match=REFUSED):
        load_reward("clip-score", path=str(clip))
    allowed = _clip_scores(load_reward("clip-score", path=str(clip), allow_pickle=True))
    assert torch.allclose(allowed, _clip_scores(load_reward("clip-score", path=str(tiny_clip_dir))))

    open_clip = tiny_open_clip(tmp_path / "oc")
    expected = _clip_scores(load_reward("clip-score", path=str(open_clip)))
    save = load_file(str(open_clip / "open_clip_model.safetensors"))
    torch.save(save, open_clip / "open_clip_pytorch_model.bin")
    (open_clip / "open_clip_model.safetensors").unlink()
    with pytest.raises(RewardInputError, match="no open_clip_model.safetensors .*allow pickled weights"):
        load_reward("clip-score", path=str(open_clip))
    assert torch.allclose(_clip_scores(load_reward("clip-score", path=str(open_clip), allow_pickle=True)), expected)

    marker = tmp_path / "ran"
    plant(clip / "pytorch_model.bin", marker)
    with pytest.raises(PickledWeightsError, match="holds more than tensors"):
        load_reward("clip-score", path=str(clip), allow_pickle=True)
    assert not marker.exists()

    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), "red").save(image)
    score = ["score", str(image), "--prompt", "a red circle"]
    assert main([*score, "--reward-arg", f"path={open_clip}"]) == 2
    assert "open_clip_model.safetensors" in error_line(capsys, "score")
    assert main([*score, "--reward-arg", f"path={open_clip}", "--allow-pickle"]) == 0
    capsys.readouterr()
    assert main([*score, "--reward", "shapes-gold", "--allow-pickle"]) == 2
    assert "reward 'shapes-gold' takes no argument 'allow_pickle'" in error_line(capsys, "score")


def test_pickled_vlm_weights_and_adapters_are_refused_then_read_when_allowed(tmp_path, monkeypatch):
    base = build_tiny_vlm("qwen2-vl", tmp_path / "vlm")
    trained = VisionLanguageModel.from_pretrained(base, lora=LoraSpec(rank=2))
    for name, p in trained.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    trained.save_pretrained(tmp_path / "adapter")
    adapter = tmp_path / "adapter" / "adapter_model.safetensors"
    torch.save(load_file(str(adapter)), adapter.with_name("adapter_model.bin"))
    adapter.unlink()
    with pytest.raises(PickledWeightsError, match=f"adapter: the weights are {REFUSED}"):
        VisionLanguageModel.from_pretrained(tmp_path / "adapter")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "adapter", allow_pickle=True)
    a = dict(trained.model.named_parameters())
    b = dict(loaded.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pickled_base = tmp_path / "vlm-bin"
    shutil.copytree(base, pickled_base)
    pickle_folder(pickled_base)
    with pytest.raises(PickledWeightsError, match="vlm-bin: the weights are pickled"):
        VisionLanguageModel.from_pretrained(pickled_base)
    read = VisionLanguageModel.from_pretrained(pickled_base, allow_pickle=True)
    original = dict(VisionLanguageModel.from_pretrained(base).model.state_dict())
    assert all(torch.equal(v, original[k]) for k, v in read.model.state_dict().items())

    # a user's environment asking torch for unsafe loads is overridden while mmalign reads
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    plant(tmp_path / "adapter" / "adapter_model.bin", marker)
    with pytest.raises(PickledWeightsError, match="holds more than tensors"):
        VisionLanguageModel.from_pretrained(tmp_path / "adapter", allow_pickle=True)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored after the load
