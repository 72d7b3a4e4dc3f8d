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
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from mmalign.data import shapes_world
from mmalign.models.tiny import EMBEDDED_SD, sd_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "mmalign" / "assets"


def log(work: Path, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(work / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def render_batch(n: int, rng: np.random.Generator, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    """`n` random renders as `(n, 3, 32, 32)` in [-1, 1] and their captions."""
    caps = shapes_world.sample_captions(n, split, rng)
    images = np.stack([shapes_world.render(c, rng) for c in caps])
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
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
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
    vision = dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=4)
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
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps:
            acc = (hard_logits.argmax(-1) == 0).float().mean().item()
            log(work, {"phase": "clip", "step": step, "loss": loss.item(), "hard_acc": acc, "minutes": (time.time() - start) / 60})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--clip-steps", type=int, default=3000)
    parser.add_argument("--phases", default="vae,clip")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    if "vae" in phases:
        train_vae(args.work_dir, args.vae_steps, args.seed)
    if "clip" in phases:
        train_clip(args.work_dir, args.clip_steps, args.seed)


if __name__ == "__main__":
    main()
