"""`data.cache_latents`: cached posteriors and prompt embeddings, their key, damage, flips and concurrent builders."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.data.latent_cache import MANIFEST, cache_key, cached_pairs
from mmalign.data.pairs import load_pairs
from mmalign.image.diffusion_dpo import DiffusionDPO
from mmalign.models.families import Conditioning
from tests.conftest import tiny_run_overrides, write_pair_folder
from tests.test_diffusion_model import _dpo_method


def _dpo(model_dir: Path, data: Path, cache: Path, *extra: str) -> DiffusionDPO:
    return _dpo_method(model_dir, data, f"data.cache_dir={cache}", "data.max_pairs=6", "data.random_flip=true", *extra)


class EncodeCounter:
    """Counts the calls of `AutoencoderKL.encode` (`calls["vae"]`) and `CLIPTextModel.forward` (`calls["text"]`)."""

    def __enter__(self):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        self.calls = {"vae": 0, "text": 0}
        self.originals = []
        for kind, cls, name in (("vae", AutoencoderKL, "encode"), ("text", CLIPTextModel, "forward")):
            original = getattr(cls, name)

            def counted(module, *args, _kind=kind, _original=original, **kwargs):
                self.calls[_kind] += 1
                return _original(module, *args, **kwargs)

            setattr(cls, name, counted)
            self.originals.append((cls, name, original))
        return self

    def __exit__(self, *exc):
        for cls, name, original in self.originals:
            setattr(cls, name, original)


def _batch(method: DiffusionDPO, indices=(0, 3, 5)) -> dict:
    return method.collate([method.dataset[i] for i in indices])


def test_cached_training_matches_uncached_and_a_hit_never_encodes(tiny_pipelines, pair_folder, tmp_path):
    model = tiny_pipelines["sd"]
    with EncodeCounter() as built:
        cached = _dpo(model, pair_folder, tmp_path, "data.cache_latents=true")
    assert built.calls["vae"] > 0 and built.calls["text"] > 0
    uncached = _dpo(model, pair_folder, tmp_path)
    for epoch in (0, 1):  # epoch 1 flips other images
        cached.dataset.set_epoch(epoch), uncached.dataset.set_epoch(epoch)
        torch.manual_seed(0)
        loss_c, metrics_c = cached.compute_loss(_batch(cached), step=epoch, micro=0)
        torch.manual_seed(0)
        loss_u, metrics_u = uncached.compute_loss(_batch(uncached), step=epoch, micro=0)
        assert torch.allclose(loss_c, loss_u, rtol=1e-5, atol=1e-6)
        assert all(torch.allclose(metrics_c[k], metrics_u[k], rtol=1e-4, atol=1e-6) for k in metrics_u)
    with EncodeCounter() as hit:
        again = _dpo(model, pair_folder, tmp_path, "data.cache_latents=true")
        again.compute_loss(_batch(again), step=0, micro=0)
    assert hit.calls == {"vae": 0, "text": 0}
    assert again.dataset.directory == cached.dataset.directory
    assert again.data_used()["latent_cache"] == str(cached.dataset.directory)
    # prompt dropout reads the empty prompt's embeddings from the cache too
    empty = again.model.encode_prompt([""], again.resolution)
    assert torch.allclose(again.dataset.prompts.conditioning([""]).embeds, empty.embeds)


def test_flipped_images_read_the_mirrored_posterior(tiny_pipelines, pair_folder, tmp_path):
    method = _dpo(tiny_pipelines["sd"], pair_folder, tmp_path, "data.cache_latents=true")
    dataset, pairs = method.dataset, method.pairs
    seen = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for i in range(len(pairs)):
            flips = pairs.flips(i)
            seen.add(flips[0])
            pixels = pairs[i]  # the uncached item: its pixels flipped by the same draws
            item = dataset[i]
            for role in ("w", "l"):
                expected = method.model.encode_posterior(pixels[f"pixels_{role}"][None])[0]
                assert torch.allclose(item[f"posterior_{role}"], expected, atol=1e-5)
    assert seen == {True, False}


def test_every_key_part_changes_the_key(tiny_pipelines, pair_folder, tmp_path):
    data = tmp_path / "pairs"
    shutil.copytree(pair_folder, data)
    method = _dpo(tiny_pipelines["sd"], data, tmp_path / "cache")
    model = method.model

    def key(**changes):
        options = {"resolution": 32, "random_flip": False, "max_pairs": 6, **changes}
        return cache_key(load_pairs(data, **options), model, "float32")

    base = key()
    model.encode_prompt(["a red circle"], (32, 32))  # a call leaves the tokenizer's truncation state set
    assert key() == base
    assert key(resolution=16) != base
    assert key(random_flip=True) != base
    assert key(max_pairs=5) != base
    assert cache_key(load_pairs(data, resolution=32, max_pairs=6), model, "float16") != base
    image = data / "img" / "0_good.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert key() != base
    changed = key()
    with torch.no_grad():
        next(model.pipe.vae.parameters()).add_(1e-3)
    assert key() != changed
    changed = key()
    with torch.no_grad():
        next(model.pipe.text_encoder.parameters()).add_(1e-3)
    assert key() != changed
    with pytest.raises(ValueError, match="random crops"):
        cache_key(load_pairs(data, resolution=32, random_crop=True), model, "float32")


def test_a_changed_key_builds_a_new_cache(tiny_pipelines, pair_folder, tmp_path):
    first = _dpo(tiny_pipelines["sd"], pair_folder, tmp_path, "data.cache_latents=true")
    smaller = load_pairs(pair_folder, resolution=16, max_pairs=6, random_flip=True)
    with EncodeCounter() as miss:
        other = cached_pairs(smaller, first.model, tmp_path, "float32")
    assert miss.calls["vae"] > 0 and other.directory != first.dataset.directory
    assert other[0]["posterior_w"].shape[-1] == first.dataset[0]["posterior_w"].shape[-1] // 2


@pytest.mark.parametrize("damage", ["truncate", "manifest", "prompts"])
def test_a_damaged_cache_is_rebuilt(damage, tiny_pipelines, pair_folder, tmp_path, capsys):
    first = _dpo(tiny_pipelines["sd"], pair_folder, tmp_path, "data.cache_latents=true")
    directory = first.dataset.directory
    reference = first.dataset[2]["posterior_l"].clone()
    if damage == "truncate":
        shard = next(directory.glob("shard-*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "manifest":
        (directory / MANIFEST).unlink()  # as a builder killed before the manifest would leave it
    else:
        (directory / "prompts.safetensors").write_bytes(b"\0" * 8)
    with EncodeCounter() as rebuilt:
        again = cached_pairs(first.pairs, first.model, tmp_path, "float32")
    assert rebuilt.calls["vae"] > 0
    assert "damaged" in capsys.readouterr().out
    assert again.directory == directory
    assert torch.allclose(again[2]["posterior_l"], reference, atol=1e-6)


def test_random_crop_with_a_cache_is_refused():
    with pytest.raises(ConfigError, match="data.cache_latents.*random_crop"):
        load_config(None, ["data.cache_latents=true", "data.random_crop=true"])


class FakeModel:
    """What `cached_pairs` reads of a `DiffusionModel`, with a slow encoder that records each call in a file."""

    def __init__(self, log: Path):
        self.log = log
        self.family = SimpleNamespace(name="fake")
        self.pipe = SimpleNamespace(components={}, vae=SimpleNamespace(config=SimpleNamespace(latent_channels=2)))
        self.vae_scale_factor = 4

    def encode_posterior(self, pixels: torch.Tensor) -> torch.Tensor:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # the other process arrives while this one builds
        return pixels[:, :1, ::4, ::4].repeat(1, 4, 1, 1)

    def encode_prompt(self, prompts: list[str], resolution) -> Conditioning:
        return Conditioning(torch.tensor([[[float(len(p))]] for p in prompts]))


def _race(data: str, root: str, log: str, out: str) -> None:
    pairs = load_pairs(data, resolution=16, max_pairs=4)
    cached = cached_pairs(pairs, FakeModel(Path(log)), Path(root), "float32", log=lambda _: None)
    torch.save({"w": cached[3]["posterior_w"], "directory": str(cached.directory)}, out)


def test_two_processes_build_one_cache(tmp_path):
    data = write_pair_folder(tmp_path / "pairs", n=4)
    log = tmp_path / "encodes.log"
    fork = multiprocessing.get_context("fork")
    children = [
        fork.Process(target=_race, args=(str(data), str(tmp_path / "cache"), str(log), str(tmp_path / f"{k}.pt")))
        for k in range(2)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    writers = set(log.read_text().split())
    assert len(writers) == 1  # one process encoded, the other waited and read its cache
    a, b = (torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in range(2))
    assert a["directory"] == b["directory"] and torch.equal(a["w"], b["w"])


@pytest.mark.slow
def test_a_cached_run_trains_like_an_uncached_one(tiny_pipelines, pair_folder, tmp_path):
    import mmalign

    logged = {}
    for arm, extra in (("cached", ["data.cache_latents=true"]), ("uncached", [])):
        out = tmp_path / arm
        overrides = tiny_run_overrides(tiny_pipelines["sd"], pair_folder, out, steps=2)
        common = ["data.random_flip=true", "train.learning_rate=1e-3", "eval.num_prompts=1", "eval.grid_size=1"]
        mmalign.train(load_config(None, [*overrides, *common, f"data.cache_dir={tmp_path}", *extra]))
        logged[arm] = json.loads((out / "report.json").read_text())["train"]  # step 2's, after one update
    for name in ("policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l"):
        assert logged["cached"][name] == pytest.approx(logged["uncached"][name], rel=1e-5)
    # β·(error differences) magnifies the encoders' float differences in the loss
    assert logged["cached"]["loss"] == pytest.approx(logged["uncached"]["loss"], rel=1e-3)
    assert any((tmp_path / "latents").iterdir())
