"""Shared fixtures: offline environment, tiny real-architecture pipelines, small pair folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CACHE = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Generated embedded data goes to a per-session cache, never the user's home: set before any test
    runs, so the background recipe runs (tests/recipes) share it, and removed when pytest exits."""
    config.stash[CACHE] = Path(tempfile.mkdtemp(prefix="mmalign-cache-"))
    os.environ["MMALIGN_CACHE"] = str(config.stash[CACHE])


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's cache."""
    shutil.rmtree(config.stash[CACHE], ignore_errors=True)


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """AcceleratorState is a process-wide singleton; give every test a fresh one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny pipeline per family: {"sd", "sd-v", "sdxl", "sd3", "sd3.5"} → folder."""
    from mmalign.models.tiny import FAMILIES, build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {family: build_tiny_pipeline(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_mmdit_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny pipeline per packed-latent family: {"flux", "flux-schnell", "qwen-image"} → folder."""
    from mmalign.models.tiny_mmdit import MMDIT_FAMILIES, build_tiny_mmdit_pipeline

    root = tmp_path_factory.mktemp("tiny-mmdit-pipelines")
    return {family: build_tiny_mmdit_pipeline(family, root / family) for family in MMDIT_FAMILIES}


@pytest.fixture(scope="session")
def tiny_video_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny video pipeline per family: {"wan", "wan2.2", "animatediff"} → folder."""
    from mmalign.models.tiny_video import VIDEO_FAMILIES, build_tiny_video_pipeline

    root = tmp_path_factory.mktemp("tiny-video-pipelines")
    return {family: build_tiny_video_pipeline(family, root / family) for family in VIDEO_FAMILIES}


def write_pair_folder(root: Path, n: int = 16, seed: int = 0) -> Path:
    """A `pairs.jsonl` folder: winner = a correct shapes-world render, loser = noise (label 0/1 mixed)."""
    from mmalign.data import shapes_world

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, caption in enumerate(shapes_world.sample_captions(n, "train", rng)):
        good = shapes_world.render(caption, rng)
        bad = rng.integers(0, 256, good.shape).astype(np.uint8)
        Image.fromarray(good).save(root / f"img/{i}_good.png")
        Image.fromarray(bad).save(root / f"img/{i}_bad.png")
        if i % 2:
            rows.append({"image_0": f"img/{i}_bad.png", "image_1": f"img/{i}_good.png", "label": 1, "prompt": caption})
        else:
            rows.append({"image_0": f"img/{i}_good.png", "image_1": f"img/{i}_bad.png", "label": 0, "prompt": caption})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="session")
def pair_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pair_folder(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers CLIP folder (model, tokenizer, image processor) with random weights."""
    from mmalign.models.tiny import tiny_clip

    directory = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip(directory)
    return directory


def tiny_run_overrides(model: Path, data: Path, out: Path, steps: int = 4) -> list[str]:
    """Overrides that make the DPO recipe run in seconds on a tiny pipeline."""
    return [
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.batch_size=4",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.threads=1",
        "eval.every=0",
        "eval.num_prompts=4",
        "eval.num_steps=2",
        "eval.rewards=[]",
        "eval.grid_size=4",
    ]
