"""Train the embedded balls-world text-to-video model shipped as `embedded:balls-t2v` (seeded, logged).

Phases, each skipped when its output already exists in `--work-dir` (a killed run resumes at the
last finished phase):

0. `init` (with `--init-from DIR`, instead of phase 1) — start from an earlier pipeline, its VAE and
   its transformer and text encoder, and continue training them; the earlier model's training log
   (`BALLS_TRAINING_LOG.json` beside `DIR`) is kept in the new one.

1. `vae` — the Wan-class causal video autoencoder (`EMBEDDED_WAN`: 17×32×32 clips → 8×9×8×8) on
   rendered clips: squared error with ball pixels weighted ×10 (the ball is a few pixels on a dark
   room) plus a small KL; then `latents_mean` / `latents_std` per channel from held-out clips, as
   Wan's config carries them. Logged: the physics gold of reconstructions vs the real clips.
2. `t2v` — the Wan transformer and UMT5 text encoder, rectified flow on the autoencoder's latents
   (logit-normal σ), 10 % caption dropout for guidance, EMA weights; snapshots every
   `--eval-every` steps, each scored with the physics gold metric on held-out captions.
3. `ship` — copy the chosen snapshot into `mmalign/assets/balls-t2v` and write the measured curve
   to `mmalign/assets/BALLS_TRAINING_LOG.json`.

The shipped model is the first run's 2000-step snapshot continued for 6000 steps:
`--init-from mmalign/assets/balls-t2v --t2v-steps 6000 --eval-every 1000` on the model of commit
2b16ad2 (the log records both runs).

The model is stopped early on purpose: its clips show the ball and roughly the captioned motion,
with physics well below the simulator's (what DenseDPO and RDPO then improve).

Usage: `python scripts/train_balls_world.py --work-dir /tmp/balls-work [--threads 2] [--init-from DIR]
[--ship-step N]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pretraining import optimizer_step

from mmalign.data import balls_world
from mmalign.io import atomic_directory
from mmalign.models.tiny_video import EMBEDDED_WAN, wan_pipeline
from mmalign.train.ema import EMA

ASSETS = Path(__file__).resolve().parents[1] / "mmalign" / "assets"


def log(work: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def render_clips(captions: list[str], rng: np.random.Generator) -> torch.Tensor:
    """Clips of `captions` as `(n, 3, F, 32, 32)` in [-1, 1]."""
    clips = np.stack([balls_world.render(c, rng) for c in captions])
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """`(n, 3, F, H, W)` in [-1, 1] → `(n, F, H, W, 3)` uint8."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()


def mean_physics(clips: np.ndarray) -> float:
    return float(np.mean([balls_world.physics_checks(c)["physics"] for c in clips]))


def init_from(work: Path, source: Path) -> None:
    """Phase 0: the earlier pipeline `source` becomes `stage-vae`, and its training log is recorded."""
    out = work / "stage-vae"
    if out.exists():
        return
    earlier = source.parent / "BALLS_TRAINING_LOG.json"
    log(work, {"phase": "init", "from": str(source),
               "earlier_training": json.loads(earlier.read_text()) if earlier.is_file() else None})  # fmt: skip
    with atomic_directory(out) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def train_vae(work: Path, steps: int, seed: int, batch: int = 8) -> None:
    out = work / "stage-vae"
    if out.exists():
        return
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train = balls_world.captions("train")
    pipe = wan_pipeline(EMBEDDED_WAN, seed=seed, captions=balls_world.captions("all"))
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    background = torch.tensor(balls_world.BACKGROUND).float().view(1, 3, 1, 1, 1) / 127.5 - 1
    start = time.time()
    for step in range(1, steps + 1):
        x = render_clips(list(rng.choice(train, batch)), rng)
        weight = 1 + 9 * ((x - background).abs().sum(1, keepdim=True) > 0.3).float()  # ball pixels ×10
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = (weight * (recon - x) ** 2).mean() + 1e-6 * dist.kl().mean()
        optimizer_step(loss, vae.parameters(), opt, sched)
        if step % 50 == 0 or step == steps:
            log(work, {"phase": "vae", "step": step, "loss": loss.item(), "minutes": (time.time() - start) / 60})
    vae.eval()
    held = balls_world.captions("heldout")
    with torch.no_grad():
        x = render_clips([held[i % len(held)] for i in range(64)], np.random.default_rng(seed + 1))
        latents = vae.encode(x).latent_dist.mean
        recon = vae.decode(latents).sample
    channels = latents.transpose(0, 1).flatten(1)
    vae.register_to_config(latents_mean=channels.mean(1).tolist(), latents_std=channels.std(1).tolist())
    record = {"phase": "vae", "done": True, "physics_real": mean_physics(to_frames(x)),
              "physics_reconstructed": mean_physics(to_frames(recon)), "mse": F.mse_loss(recon, x).item()}  # fmt: skip
    log(work, record)
    pipe.save_pretrained(out)


def encode_dataset(pipe, n: int, seed: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std of `n` train-split clips, normalised as the pipeline does, and captions."""
    from mmalign.models.families import WanFamily

    rng = np.random.default_rng(seed)
    train = balls_world.captions("train")
    stats = WanFamily()._stats(pipe.vae, torch.zeros(1))
    means, stds, caps = [], [], []
    with torch.no_grad():
        for _ in range(0, n, batch):
            c = list(rng.choice(train, batch))
            dist = pipe.vae.encode(render_clips(c, rng)).latent_dist
            means.append((dist.mean - stats[0]) / stats[1])
            stds.append(dist.std / stats[1])
            caps += c
    return torch.cat(means)[:n], torch.cat(stds)[:n], caps[:n]


def evaluate_t2v(model, captions: list[str], seed: int) -> dict[str, float]:
    """Physics gold and ball visibility of the model's clips (20 Euler steps, guidance 3) on `captions`."""
    g = torch.Generator().manual_seed(seed)
    clips = []
    for start in range(0, len(captions), 32):
        batch = captions[start : start + 32]
        size = (balls_world.SIZE, balls_world.SIZE)
        latents = model.sample(batch, num_steps=20, guidance_scale=3.0, generator=g, resolution=size,
                               num_frames=balls_world.FRAMES)  # fmt: skip
        clips.append(to_frames(model.decode_latents(latents) * 2 - 1))
    checks = [balls_world.physics_checks(c) for c in np.concatenate(clips)]
    return {"physics": float(np.mean([c["physics"] for c in checks])),
            "visible": float(np.mean([c["visible"] for c in checks]))}  # fmt: skip


def train_t2v(work: Path, steps: int, eval_every: int, seed: int, lr: float = 1e-3, batch: int = 32) -> None:
    from mmalign.models.diffusion import DiffusionModel

    out = work / "stage-t2v"
    if (out / f"step-{steps:06d}").exists():  # the last snapshot is written last, atomically
        return
    torch.manual_seed(seed)
    model = DiffusionModel.from_pretrained(work / "stage-vae", lora_rank=None, reference=False)
    pipe = model.pipe
    transformer, text_encoder = pipe.transformer, pipe.text_encoder
    text_encoder.requires_grad_(True).train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    ema = EMA(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    mean, std, caps = encode_dataset(pipe, 8192, seed + 100)
    rng = np.random.default_rng(seed + 200)
    heldout = balls_world.captions("heldout")
    heldout = [heldout[i % len(heldout)] for i in range(64)]
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(caps), batch))
        x0 = mean[idx] + std[idx] * torch.randn_like(mean[idx])
        prompts = ["" if rng.random() < 0.1 else caps[i] for i in idx.tolist()]
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
        cond = text_encoder(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
        cond = cond * ids.attention_mask[..., None]  # Wan zeroes the padded text states
        noise = torch.randn_like(x0)
        t = model.noise.sample_timesteps(batch)
        pred = transformer(hidden_states=model.noise.add_noise(x0, noise, t), timestep=t,
                           encoder_hidden_states=cond, return_dict=False)[0]  # fmt: skip
        loss = F.mse_loss(pred, model.noise.target(x0, noise, t))
        optimizer_step(loss, params, opt, sched)
        ema.update(step)
        if step % 100 == 0:
            log(work, {"phase": "t2v", "step": step, "loss": loss.item(), "minutes": (time.time() - start) / 60})
        if step % eval_every == 0 or step == steps:
            transformer.eval()
            text_encoder.eval()
            with ema.applied():
                record = {"phase": "t2v", "step": step, "eval": True, "heldout": evaluate_t2v(model, heldout, seed)}
                with atomic_directory(out / f"step-{step:06d}") as tmp:
                    pipe.save_pretrained(tmp)
            log(work, record)
            transformer.train()
            text_encoder.train()


def ship(work: Path, step: int) -> None:
    """Copy the chosen snapshot into `mmalign/assets/balls-t2v` with the measured curve."""
    with atomic_directory(ASSETS / "balls-t2v") as tmp:
        shutil.copytree(work / "stage-t2v" / f"step-{step:06d}", tmp, dirs_exist_ok=True)
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    summary = {
        "shipped_step": step,
        "init": [r for r in records if r.get("phase") == "init"],
        "vae": [r for r in records if r.get("phase") == "vae" and r.get("done")],
        "t2v_evals": [r for r in records if r.get("phase") == "t2v" and r.get("eval")],
    }
    (ASSETS / "BALLS_TRAINING_LOG.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae-steps", type=int, default=700)
    parser.add_argument("--t2v-steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue this pipeline folder instead of training from scratch")  # fmt: skip
    parser.add_argument("--ship-step", type=int, default=None, help="snapshot to ship (default: none yet)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.init_from is not None:
        init_from(args.work_dir, args.init_from)
    train_vae(args.work_dir, args.vae_steps, args.seed)
    train_t2v(args.work_dir, args.t2v_steps, args.eval_every, args.seed)
    if args.ship_step is not None:
        ship(args.work_dir, args.ship_step)


if __name__ == "__main__":
    main()
