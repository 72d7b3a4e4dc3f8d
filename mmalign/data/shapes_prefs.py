"""The embedded default preference set: the shapes model's own samples, labelled by a proxy reward.

For each training caption (train split) the model draws `candidates` images; the proxy reward
(the toy CLIP by default, never the gold metric) scores them, and the best and the worst form a
pair when their scores differ by at least `min_margin` (`write_self_pairs`, which GAN-RM's
rounds reuse with their own reward). The pair is written as two PNGs and a
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

from mmalign.best_of_n import best_of_n
from mmalign.config import EmbeddedPrefsConfig
from mmalign.data import shapes_world
from mmalign.data.pairs import JSONL_NAME
from mmalign.io import atomic_directory
from mmalign.rewards import load_reward


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
    rng = np.random.default_rng(config.seed)
    pool = shapes_world.captions("train")
    order = rng.permutation(len(pool))
    prompts = [pool[order[i % len(pool)]] for i in range(config.prompts)]
    reward = load_reward(config.reward, device=model.device)
    return write_self_pairs(
        model,
        prompts,
        reward,
        directory,
        candidates=config.candidates,
        min_margin=config.min_margin,
        num_steps=config.num_steps,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        batch_size=batch_size,
        meta={"config": vars(config)},
    )


def write_self_pairs(
    model,
    prompts: list[str],
    reward,
    directory: Path,
    *,
    candidates: int,
    min_margin: float,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    use_reference: bool = True,
    meta: dict | None = None,
) -> dict:
    """Best-vs-worst pairs of `model`'s own samples under `reward`, written as a pair folder.

    For each prompt the model (its frozen reference weights unless `use_reference=False`) draws
    `candidates` images; the
    reward's best and worst form a pair when their scores differ by at least `min_margin`. Rows
    carry `score_w`/`score_l`; the folder appears complete or not at all. Returns its `meta.json`.
    """
    if candidates < 2:
        raise ValueError(f"a best-vs-worst pair needs at least 2 candidates per prompt, got {candidates}")
    rng = np.random.default_rng(seed)
    rows, margins = [], []
    with atomic_directory(directory) as tmp:
        (tmp / "images").mkdir()
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating preference pairs", unit="batch"):
            batch = prompts[start : start + batch_size]
            drawn = best_of_n(
                model,
                batch,
                candidates,
                reward,
                num_steps=num_steps,
                guidance_scale=guidance_scale,
                seed=seed,
                batch_size=batch_size,
                use_reference=use_reference,
                index_offset=start,
            )
            for i, prompt in enumerate(batch):
                scores = drawn.scores[i]
                if not torch.isfinite(scores).all():
                    raise ValueError(f"the labelling reward scored a candidate of {prompt!r} {scores.tolist()}; "
                                     "scores must be finite")  # fmt: skip
                best, worst = int(scores.argmax()), int(scores.argmin())
                margin = float(scores[best] - scores[worst])
                if margin < min_margin:
                    continue
                n = start + i
                names = [f"images/{n:05d}_w.png", f"images/{n:05d}_l.png"]
                _save_png(drawn.candidates[i, best], tmp / names[0])
                _save_png(drawn.candidates[i, worst], tmp / names[1])
                swap = bool(rng.random() < 0.5)
                first, second = (names[1], names[0]) if swap else names
                rows.append(
                    {
                        "image_0": first,
                        "image_1": second,
                        "label": 1 if swap else 0,
                        "prompt": prompt,
                        "score_w": round(float(scores[best]), 6),
                        "score_l": round(float(scores[worst]), 6),
                    }
                )
                margins.append(margin)
        if not rows:
            raise ValueError(f"no pair reached min_margin={min_margin}; lower it or draw more candidates")
        (tmp / JSONL_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
        info = {**(meta or {}), "pairs": len(rows), "prompts": len(prompts), "mean_margin": float(np.mean(margins))}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
    return info
