"""The embedded default preference set: the shapes model's own samples, labelled by a proxy reward.

For each training caption (train split) the model draws `candidates` images; the proxy reward
(the toy CLIP by default, never the gold metric) scores them, and the best and the worst form a
pair when their scores differ by at least `min_margin`. The pair is written as two PNGs and a
line of `pairs.jsonl` (in random order, `label` = index of the preferred image), i.e. in the
same local-folder format a user's own data uses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmalign.config import EmbeddedPrefsConfig
from mmalign.data import shapes_world
from mmalign.data.pairs import JSONL_NAME
from mmalign.io import atomic_directory
from mmalign.rewards import load_reward
from mmalign.train.rng import keyed_generator


def fingerprint(config: EmbeddedPrefsConfig, model_path: str) -> str:
    """Cache key: the generation options and the model folder's file names, sizes and times."""
    files = sorted(p for p in Path(model_path).rglob("*") if p.is_file()) if Path(model_path).exists() else []
    stats = [(str(p.relative_to(model_path)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    blob = json.dumps([vars(config), model_path, stats], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_png(image: torch.Tensor, path: Path) -> None:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)


def build_shapes_prefs(config: EmbeddedPrefsConfig, model, directory: Path, batch_size: int = 64) -> dict:
    """Generate the pair folder at `directory` (atomically) with `model` (a `DiffusionModel`)."""
    if config.candidates < 2:
        raise ValueError(f"data.embedded.candidates must be at least 2, got {config.candidates}")
    rng = np.random.default_rng(config.seed)
    pool = shapes_world.captions("train")
    order = rng.permutation(len(pool))
    prompts = [pool[order[i % len(pool)]] for i in range(config.prompts)]
    reward = load_reward(config.reward, device=model.device)
    shape = model.latent_shape(1, model.default_resolution)[1:]
    rows, margins = [], []
    with atomic_directory(directory) as tmp:
        (tmp / "images").mkdir()
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating preference pairs", unit="batch"):
            batch = prompts[start : start + batch_size]
            images, scores = [], []
            for k in range(config.candidates):
                noise = torch.stack(
                    [
                        torch.randn(shape, generator=keyed_generator(config.seed, start + i, k))
                        for i in range(len(batch))
                    ]
                )
                latents = model.sample(
                    batch,
                    num_steps=config.num_steps,
                    guidance_scale=config.guidance_scale,
                    noise=noise,
                    use_reference=True,
                )
                decoded = model.decode_latents(latents).cpu()
                images.append(decoded)
                scores.append(reward(decoded, batch))
            images_t, scores_t = torch.stack(images), torch.stack(scores)  # (K, b, 3, H, W), (K, b)
            for i, prompt in enumerate(batch):
                best, worst = int(scores_t[:, i].argmax()), int(scores_t[:, i].argmin())
                margin = float(scores_t[best, i] - scores_t[worst, i])
                if margin < config.min_margin:
                    continue
                n = start + i
                names = [f"images/{n:05d}_w.png", f"images/{n:05d}_l.png"]
                _save_png(images_t[best, i], tmp / names[0])
                _save_png(images_t[worst, i], tmp / names[1])
                swap = bool(rng.random() < 0.5)
                first, second = (names[1], names[0]) if swap else names
                rows.append(
                    {
                        "image_0": first,
                        "image_1": second,
                        "label": 1 if swap else 0,
                        "prompt": prompt,
                        "proxy_margin": round(margin, 4),
                    }
                )
                margins.append(margin)
        if not rows:
            raise ValueError("no pair reached data.embedded.min_margin; lower it or add candidates")
        (tmp / JSONL_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta = {
            "config": vars(config),
            "pairs": len(rows),
            "prompts": len(prompts),
            "mean_proxy_margin": float(np.mean(margins)),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta
