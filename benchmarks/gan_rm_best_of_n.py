"""Best-of-N with a GAN-RM against a random pick, on held-out prompts of the embedded world.

    python benchmarks/gan_rm_best_of_n.py [--n 8] [--prompts 165] [--targets 300] [--raw 300] [--seeds 0 1 2]

Per seed: trains a GAN-RM on `--targets` clean renders (the Preference Proxy Data) against `--raw`
samples of the embedded model, draws N samples for each held-out caption, and reports the gold
metric of (a) a random pick (the mean over candidates, i.e. its expectation), (b) the GAN-RM's
pick, (c) the toy CLIP's pick (a text-aware reward, for reference) and (d) the gold metric's own
pick (the ceiling), plus the RM's held-out AUC.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(
    n: int, num_prompts: int, num_targets: int, num_raw: int, seed: int, work: Path, num_steps: int = 20
) -> dict[str, float]:
    from mmalign.best_of_n import sample_candidates
    from mmalign.data import shapes_world
    from mmalign.image.gan_rm import GanRMConfig, save_image_folder, train_gan_rm
    from mmalign.models.diffusion import DiffusionModel
    from mmalign.rewards import load_reward

    model = DiffusionModel.from_pretrained("embedded:shapes-t2i", lora_rank=None, reference=False)
    rng = np.random.default_rng([seed, 1])
    captions = shapes_world.sample_captions(num_targets, "train", rng)
    targets = torch.from_numpy(np.stack([shapes_world.render(c, rng) for c in captions])).permute(0, 3, 1, 2) / 255
    raw_prompts = shapes_world.sample_captions(num_raw, "train", np.random.default_rng([seed, 2]))
    raw = sample_candidates(model, raw_prompts, 1, seed=seed + 10, num_steps=num_steps)[:, 0]
    save_image_folder(targets.float(), work / f"targets-seed{seed}")
    save_image_folder(raw, work / f"raw-seed{seed}")
    rm = train_gan_rm(
        work / f"targets-seed{seed}", work / f"raw-seed{seed}", work / f"rm-seed{seed}", GanRMConfig(seed=seed)
    )
    prompts = shapes_world.captions("heldout")[:num_prompts]
    candidates = sample_candidates(model, prompts, n, seed=seed + 20, num_steps=num_steps)  # (P, N, 3, H, W)
    flat, flat_prompts = candidates.flatten(0, 1), [p for p in prompts for _ in range(n)]
    gold = load_reward("shapes-gold")(flat, flat_prompts).view(len(prompts), n)
    picks = {
        "gan_rm": rm(flat).view(len(prompts), n).argmax(1),
        "clip_score": load_reward("clip-score")(flat, flat_prompts).view(len(prompts), n).argmax(1),
        "gold_oracle": gold.argmax(1),
    }
    rows = torch.arange(len(prompts))
    return {
        "random_pick": float(gold.mean()),
        **{f"{name}_pick": float(gold[rows, idx].mean()) for name, idx in picks.items()},
        "rm_heldout_auc": rm.metrics["heldout_auc"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=165)
    parser.add_argument("--targets", type=int, default=300)
    parser.add_argument("--raw", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gan-rm-bon-"))
    rows = [measure(args.n, args.prompts, args.targets, args.raw, seed, work, args.steps) for seed in args.seeds]
    for seed, row in zip(args.seeds, rows):
        print(json.dumps({"seed": seed, **row}))
    print(f"\n| gold metric of the pick (best of {args.n}, {args.prompts} held-out prompts) | mean | sd |")
    print("|---|---|---|")
    for key in rows[0]:
        values = [r[key] for r in rows]
        print(f"| {key} | {statistics.fmean(values):.4f} | {statistics.pstdev(values):.4f} |")


if __name__ == "__main__":
    main()
