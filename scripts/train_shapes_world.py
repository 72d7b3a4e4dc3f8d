"""Train the embedded shapes-world models shipped in `mmalign/assets/` (run once, seeded, logged).

Phases, each skipped when its output already exists in `--work-dir` (so a killed run resumes at
the last finished phase):

1. `vae`  — the KL autoencoder of a Stable-Diffusion-class pipeline (32×32 → 8×8×4) on world
   renders; sets `scaling_factor` to 1 / std of the latents, as SD does.
2. `clip` — the toy CLIP (transformers `CLIPModel`) that is the default proxy reward: contrastive
   loss plus hard negatives (a colour, a shape or the relation changed), on clean renders and
   on their autoencoder reconstructions. Train-split captions only.
3. `t2i`  — the UNet and text encoder, ε-prediction DDPM on the autoencoder's latents, 10 %
   caption dropout for classifier-free guidance, EMA weights; snapshots every `--eval-every`
   steps, each scored with the gold metric on held-out captions.
4. `ship` — copy the chosen snapshot (fp16) and the CLIP into `mmalign/assets/` and write the
   measured curve next to them.

Usage: `python scripts/train_shapes_world.py --work-dir /tmp/shapes-work [--threads 2]`.
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
from transformers import CLIPConfig, CLIPModel

from mmalign.data import shapes_world
from mmalign.models.tiny import EMBEDDED_SD, sd_pipeline
from mmalign.train.ema import EMA

ASSETS = Path(__file__).resolve().parents[1] / "mmalign" / "assets"


def log(work: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def render_batch(
    n: int,
    rng: np.random.Generator,
    split: str = "train",
    caption_noise: float = 0.0,
    colour_bias: tuple[str, str, float] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """`n` random renders as `(n, 3, 32, 32)` in [-1, 1] and their captions.

    With `caption_noise` > 0, that share of images shows a near-miss of its caption (a colour,
    a shape or the relation wrong, objects swapped or one missing), like captions scraped from
    the web: the model then learns good and bad modes, which is what alignment reweights. With
    `colour_bias = (A, B, p)`, an image that would show colour A shows B instead with probability p
    (a systematic error, the same for every caption).
    """
    caps = shapes_world.sample_captions(n, split, rng)
    shown = [perturb(c, rng) if caption_noise > 0 and rng.random() < caption_noise else c for c in caps]
    if colour_bias is not None:
        shown = [recolour(c, *colour_bias, rng) for c in shown]
    images = np.stack([shapes_world.render(c, rng) for c in shown])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, caps


def train_vae(work: Path, steps: int, seed: int) -> None:
    out = work / "stage-vae"
    if out.exists():
        return
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pipe = sd_pipeline(EMBEDDED_SD, seed=seed)
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    start = time.time()
    for step in range(1, steps + 1):
        x, _ = render_batch(32, rng)
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        optimizer_step(loss, vae.parameters(), opt, sched)
        if step % 100 == 0 or step == steps:
            log(work, {"phase": "vae", "step": step, "loss": loss.item(), "minutes": (time.time() - start) / 60})
    vae.eval()
    with torch.no_grad():
        x, caps = render_batch(512, np.random.default_rng(seed + 1), "heldout")
        latents = vae.encode(x).latent_dist.sample()
        recon = vae.decode(latents).sample
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    gold = np.mean([shapes_world.gold_checks(im, c)["score"] for im, c in zip(images, caps)])
    log(work, {"phase": "vae", "done": True, "scaling_factor": scaling, "recon_gold_heldout": float(gold)})
    pipe.save_pretrained(out)


def clip_model(tokenizer) -> CLIPModel:
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def perturb(caption: str, rng: np.random.Generator) -> str:
    """A near-miss caption: one colour, one shape or the relation changed, or objects swapped."""
    scene = shapes_world.parse_caption(caption)
    objs = list(scene.objects)
    kinds = ["colour", "shape"] + (["relation", "swap", "drop"] if scene.relation else ["add"])
    kind = kinds[int(rng.integers(len(kinds)))]
    i = int(rng.integers(len(objs)))
    if kind == "colour":
        used = {o.colour for o in objs}
        choices = [c for c in shapes_world.COLOURS if c not in used]
        objs[i] = shapes_world.Shape(choices[int(rng.integers(len(choices)))], objs[i].shape)
    elif kind == "shape":
        choices = [s for s in shapes_world.SHAPES if s != objs[i].shape]
        objs[i] = shapes_world.Shape(objs[i].colour, choices[int(rng.integers(len(choices)))])
    elif kind == "relation":
        choices = [r for r in shapes_world.RELATIONS if r != scene.relation]
        return shapes_world.Scene(tuple(objs), choices[int(rng.integers(len(choices)))]).caption
    elif kind == "swap":
        return shapes_world.Scene((objs[1], objs[0]), scene.relation).caption
    elif kind == "drop":
        return shapes_world.Scene((objs[i],)).caption
    else:  # add a second shape to a single-shape caption
        colours = [c for c in shapes_world.COLOURS if c != objs[0].colour]
        extra = shapes_world.Shape(colours[int(rng.integers(len(colours)))], shapes_world.SHAPES[int(rng.integers(3))])
        rel = shapes_world.RELATIONS[int(rng.integers(4))]
        return shapes_world.Scene((objs[0], extra), rel).caption
    return shapes_world.Scene(tuple(objs), scene.relation).caption


def recolour(caption: str, source: str, target: str, p: float, rng: np.random.Generator) -> str:
    """`caption` with its `source`-coloured objects drawn in `target` instead, with probability `p`."""
    scene = shapes_world.parse_caption(caption)
    if all(o.colour != source for o in scene.objects) or rng.random() >= p:
        return caption
    objs = tuple(shapes_world.Shape(target, o.shape) if o.colour == source else o for o in scene.objects)
    return shapes_world.Scene(objs, scene.relation).caption


def pooled(output) -> torch.Tensor:
    """Projected CLIP features across transformers versions (a tensor in 4.x, an output in 5.x)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_pixels(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images → CLIP-normalised pixel values (OpenAI CLIP mean/std)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def train_clip(work: Path, steps: int, seed: int, negatives: int = 4) -> None:
    out = work / "stage-clip"
    if out.exists():
        return
    from transformers import CLIPImageProcessor, CLIPProcessor

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 7)
    pipe_dir = work / "stage-vae"
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(pipe_dir / "tokenizer")
    model = clip_model(tokenizer).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    batch = 96

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids

    start = time.time()
    for step in range(1, steps + 1):
        x, caps = render_batch(batch, rng)
        with torch.no_grad():  # half the batch through the autoencoder, like a generator's output
            half = batch // 2
            x[:half] = vae.decode(vae.encode(x[:half]).latent_dist.sample()).sample.clamp(-1, 1)
            x = x + 0.03 * torch.randn_like(x) * torch.rand(batch, 1, 1, 1)
        negs = [perturb(c, rng) for c in caps for _ in range(negatives)]
        img = F.normalize(pooled(model.get_image_features(pixel_values=clip_pixels(x))), dim=-1)
        txt = F.normalize(pooled(model.get_text_features(input_ids=tokens(caps + negs))), dim=-1)
        pos, neg = txt[:batch], txt[batch:].view(batch, negatives, -1)
        scale = model.logit_scale.exp()
        logits = scale * img @ pos.T
        labels = torch.arange(batch)
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        hard_logits = scale * torch.cat([(img * pos).sum(-1, keepdim=True), torch.einsum("bd,bkd->bk", img, neg)], 1)
        hard = F.cross_entropy(hard_logits, torch.zeros(batch, dtype=torch.long))
        loss = contrastive + hard
        optimizer_step(loss, model.parameters(), opt, sched)
        if step % 100 == 0 or step == steps:
            acc = (hard_logits.argmax(-1) == 0).float().mean().item()
            log(
                work,
                {
                    "phase": "clip",
                    "step": step,
                    "loss": loss.item(),
                    "hard_acc": acc,
                    "minutes": (time.time() - start) / 60,
                },
            )
    model.eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    with torch.no_grad():
        eval_rng = np.random.default_rng(seed + 11)
        x, caps = render_batch(512, eval_rng, "heldout")
        negs = [perturb(c, eval_rng) for c in caps]
        img = F.normalize(pooled(model.get_image_features(pixel_values=clip_pixels(x))), dim=-1)
        pos = F.normalize(pooled(model.get_text_features(input_ids=tokens(caps))), dim=-1)
        neg = F.normalize(pooled(model.get_text_features(input_ids=tokens(negs))), dim=-1)
        acc = ((img * pos).sum(-1) > (img * neg).sum(-1)).float().mean().item()
    log(work, {"phase": "clip", "done": True, "heldout_pairwise_acc_vs_near_miss": acc})
    model.save_pretrained(out)
    processor.save_pretrained(out)


def render_latents(
    vae, n: int, seed: int, caption_noise: float, colour_bias: tuple[str, str, float] | None = None, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std `(n, 4, 8, 8)` of `n` train-split renders, and their captions."""
    rng = np.random.default_rng(seed)
    means, stds, caps = [], [], []
    with torch.no_grad():
        for _ in range(0, n, batch):
            x, c = render_batch(batch, rng, caption_noise=caption_noise, colour_bias=colour_bias)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            caps += c
    return torch.cat(means)[:n], torch.cat(stds)[:n], caps[:n]


def evaluate_t2i(model, captions: list[str], seed: int) -> dict[str, float]:
    """Gold metric of the model's samples (20 DDIM steps, guidance 3) on `captions`."""
    from mmalign.rewards.shapes_gold import ShapesGold

    gold = ShapesGold()
    images = []
    shape = model.latent_shape(1, model.default_resolution)[1:]
    for start in range(0, len(captions), 64):
        batch = captions[start : start + 64]
        g = torch.Generator().manual_seed(seed + start)
        noise = torch.randn((len(batch), *shape), generator=g)
        images.append(model.generate(batch, num_steps=20, guidance_scale=3.0, noise=noise))
    images = torch.cat(images)
    return {"gold": float(gold(images, captions).mean()), **gold.breakdown(images, captions)}


def train_t2i(
    work: Path,
    steps: int,
    eval_every: int,
    seed: int,
    caption_noise: float,
    colour_bias: tuple[str, str, float] | None = None,
    init: Path | None = None,
    lr: float = 5e-4,
    batch: int = 32,
) -> None:
    from mmalign.models.diffusion import DiffusionModel
    from mmalign.models.noise import VariancePreserving

    out = work / "stage-t2i"
    if (out / "done.json").exists():
        return
    torch.manual_seed(seed)
    model = DiffusionModel.from_pretrained(init or work / "stage-vae", lora_rank=None, reference=False)
    pipe = model.pipe
    unet, text_encoder = pipe.unet, pipe.text_encoder
    text_encoder.requires_grad_(True).train()
    params = [p for p in unet.parameters()] + [p for p in text_encoder.parameters()]
    ema = EMA(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    mean, std, caps = render_latents(pipe.vae, 50_000, seed + 100, caption_noise, colour_bias)
    scaling = pipe.vae.config.scaling_factor
    noise_process: VariancePreserving = model.noise  # type: ignore[assignment]
    rng = np.random.default_rng(seed + 200)
    heldout = shapes_world.captions("heldout")
    train_eval = shapes_world.sample_captions(len(heldout), "train", np.random.default_rng(seed + 300), 0.0)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(caps), batch))
        x0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scaling
        prompts = ["" if rng.random() < 0.1 else caps[i] for i in idx.tolist()]
        ids = pipe.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]
        noise = torch.randn_like(x0)
        t = noise_process.sample_timesteps(batch)
        pred = unet(noise_process.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        optimizer_step(loss, params, opt, sched)
        ema.update(step)
        if step % 100 == 0:
            log(work, {"phase": "t2i", "step": step, "loss": loss.item(), "minutes": (time.time() - start) / 60})
        if step % eval_every == 0 or step == steps:
            unet.eval()
            text_encoder.eval()
            with ema.applied():
                snap = out / f"step-{step:06d}"
                pipe.save_pretrained(snap)
                record = {
                    "phase": "t2i",
                    "step": step,
                    "eval": True,
                    "heldout": evaluate_t2i(model, heldout, seed + 400),
                    "train": evaluate_t2i(model, train_eval, seed + 400),
                }
            log(work, record)
            unet.train()
            text_encoder.train()
    (out / "done.json").write_text(json.dumps({"steps": steps}))


def ship(work: Path, step: int) -> None:
    """Copy the chosen snapshot (fp16 weights) and the CLIP into mmalign/assets, with the log."""
    from diffusers import StableDiffusionPipeline

    snap = work / "stage-t2i" / f"step-{step:06d}"
    pipe = StableDiffusionPipeline.from_pretrained(snap, safety_checker=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    target = ASSETS / "shapes-t2i"
    shutil.rmtree(target, ignore_errors=True)
    pipe.save_pretrained(target, safe_serialization=True)
    clip_target = ASSETS / "shapes-clip"
    shutil.rmtree(clip_target, ignore_errors=True)
    shutil.copytree(work / "stage-clip", clip_target)
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    summary = {
        "shipped_step": step,
        "vae": [r for r in records if r.get("phase") == "vae" and r.get("done")],
        "clip": [r for r in records if r.get("phase") == "clip" and r.get("done")],
        "t2i_evals": [r for r in records if r.get("phase") == "t2i" and r.get("eval")],
    }
    (ASSETS / "TRAINING_LOG.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--clip-steps", type=int, default=3000)
    parser.add_argument("--t2i-steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--caption-noise", type=float, default=0.3, help="share of mis-captioned t2i training images")
    parser.add_argument("--colour-bias", default=None, help="systematic error A:B:P (colour A drawn as B w.p. P)")
    parser.add_argument("--t2i-init", type=Path, default=None, help="continue the t2i phase from this snapshot")
    parser.add_argument("--ship-step", type=int, default=None, help="t2i snapshot to ship (phase ship)")
    parser.add_argument("--phases", default="vae,clip,t2i")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    if "vae" in phases:
        train_vae(args.work_dir, args.vae_steps, args.seed)
    if "clip" in phases:
        train_clip(args.work_dir, args.clip_steps, args.seed)
    if "t2i" in phases:
        bias = None
        if args.colour_bias:
            a, b, p = args.colour_bias.split(":")
            bias = (a, b, float(p))
        train_t2i(args.work_dir, args.t2i_steps, args.eval_every, args.seed, args.caption_noise, bias, args.t2i_init)
    if "ship" in phases:
        if args.ship_step is None:
            parser.error("phase ship needs --ship-step")
        ship(args.work_dir, args.ship_step)


if __name__ == "__main__":
    main()
