"""Train the embedded flow-matching shapes-world model `embedded:shapes-t2i-flow` (run once, seeded, logged).

An SD3-class pipeline (`StableDiffusion3Pipeline`: an MM-DiT `SD3Transformer2DModel` of size
`mmalign.models.tiny.EMBEDDED_SD3`, a `FlowMatchEulerDiscreteScheduler`, two CLIP text encoders with
projection and no T5) of the same world as `embedded:shapes-t2i`, on that model's shipped autoencoder
(frozen; 32×32 images ↔ 4×8×8 latents). The autoencoder gets SD3's latent normalisation: `shift_factor`
is the mean and `scaling_factor` 1 / std of posterior samples of training renders. Both text encoders
start from the shipped shapes-t2i text encoder (their projections random) and are trained with the
transformer: rectified flow, `x_σ = (1−σ) x0 + σ ε`, target `ε − x0`, σ drawn by
`mmalign.models.noise.FlowMatching` (logit-normal, then the scheduler's shift), 10 % caption dropout
for classifier-free guidance, EMA weights. Phases, each skipped when its output exists in `--work-dir`:

1. `stage1` — renders of which 30 % show a near-miss of their caption (`--caption-noise`).
2. `stage2` — continues from stage 1's last snapshot with one systematic error added
   (`--colour-bias red:blue:0.6`: an image that should show red shows blue with p = 0.6), the fault
   the alignment recipes are meant to fix, as for `embedded:shapes-t2i`.
3. `ship` — the chosen stage-2 snapshot in fp16 to `mmalign/assets/shapes-t2i-flow`, scored on
   held-out captions through `mmalign.train.evaluation.DiffusionEvaluator` (the recipes' evaluator:
   20 steps, guidance 3, 2 samples per caption); the curve and a note to
   `mmalign/assets/FLOW_TRAINING_LOG.json`.

Each stage snapshots every `--eval-every` steps and scores the snapshot with shapes-gold on the
held-out captions (`train_shapes_world.evaluate_t2i`: 20 steps, guidance 3, one sample per caption).

Without T5, SD3's `encode_prompt` appends 256 all-zero rows to the text states (where T5's would
be), so the transformer reads 64 image tokens and 276 text tokens, 256 of them identical. While
training and scoring snapshots, `ZeroRowsShortcut` computes the same function on one such row whose
attention key counts 256 times (an exact identity: identical keys and values add up in the softmax),
which makes a step two to three times faster; it is checked against the plain model before training
starts and is not part of the shipped pipeline (`ship` scores the shipped model without it).

Usage: `python scripts/train_shapes_flow.py --work-dir /tmp/shapes-flow [--threads 1]`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from pretraining import optimizer_step
from train_shapes_world import ASSETS, evaluate_t2i, log, render_latents
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from mmalign.data import shapes_world
from mmalign.models.tiny import EMBEDDED_SD3, sd3_pipeline
from mmalign.train.ema import EMA

SOURCE = ASSETS / "shapes-t2i"  # the shipped UNet model: its autoencoder, tokenizer and text encoder
TARGET = ASSETS / "shapes-t2i-flow"
DATA_SIZE = 50_000  # latents rendered per stage


class _RepeatedLastKey(JointAttnProcessor2_0):
    """SD3 joint attention in which the last text token stands for `repeats` identical tokens."""

    repeats = 1

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if self.repeats == 1 or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        cq, ck, cv = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[..., -1] = math.log(self.repeats)  # exp(s + log n) = n identical keys' share of the softmax
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


class ZeroRowsShortcut:
    """While installed, the transformer reads trailing all-zero text rows as one row counted n times.

    A forward pre-hook cuts `encoder_hidden_states` after the first of its trailing rows that are zero
    in every sample, and the attention processors weight that row's key by the number cut. Every
    token is transformed on its own except in attention, so the outputs are those of the full input.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.processor = _RepeatedLastKey()
        transformer.set_attn_processor(self.processor)
        self.handle = transformer.register_forward_pre_hook(self._cut, with_kwargs=True)

    def _cut(self, module, args, kwargs):
        text = kwargs["encoder_hidden_states"]
        nonzero = (text != 0).any(dim=0).any(dim=-1).nonzero()
        keep = int(nonzero.max()) + 1 if len(nonzero) else 0
        zeros = text.shape[1] - keep
        self.processor.repeats = max(1, zeros)
        if zeros > 1:
            kwargs = {**kwargs, "encoder_hidden_states": text[:, : keep + 1]}
        return args, kwargs

    def remove(self) -> None:
        self.handle.remove()
        self.transformer.set_attn_processor(JointAttnProcessor2_0())


def text_encoder_from_source(projection_dim: int) -> CLIPTextModelWithProjection:
    """The shipped shapes-t2i text encoder with a random text projection added (SD3's pooled output)."""
    encoder = CLIPTextModelWithProjection.from_pretrained(
        SOURCE / "text_encoder", projection_dim=projection_dim, dtype=torch.float32
    )
    source = CLIPTextModel.from_pretrained(SOURCE / "text_encoder", dtype=torch.float32)
    if not all(torch.equal(p, q) for p, q in zip(source.parameters(), encoder.text_model.parameters())):
        raise RuntimeError(f"the text encoder of {SOURCE} did not load into CLIPTextModelWithProjection")
    return encoder.eval()


def build_initial(work: Path, shift: float, seed: int) -> Path:
    """The untrained pipeline: `sd3_pipeline(EMBEDDED_SD3)`'s transformer, the shipped autoencoder with
    SD3's latent normalisation measured on training renders, text encoders from the shipped one."""
    out = work / "init"
    if (out / "model_index.json").exists():
        return out
    pipe = sd3_pipeline(EMBEDDED_SD3, seed=seed)
    vae = AutoencoderKL.from_pretrained(SOURCE / "vae", dtype=torch.float32).eval()
    mean, std, _ = render_latents(vae, 8192, seed + 50, caption_noise=0.0)
    latents = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())
    hidden = EMBEDDED_SD3.text_hidden
    pipe = StableDiffusion3Pipeline(
        transformer=pipe.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=text_encoder_from_source(hidden),
        tokenizer=CLIPTokenizer.from_pretrained(SOURCE / "tokenizer"),
        text_encoder_2=text_encoder_from_source(hidden),
        tokenizer_2=CLIPTokenizer.from_pretrained(SOURCE / "tokenizer"),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    log(work, {"phase": "init", "shift": shift, **{k: vae.config[k] for k in ("shift_factor", "scaling_factor")}})
    return out


def check_shortcut(model, prompts: list[str]) -> float:
    """Largest |difference| between the transformer's outputs with and without `ZeroRowsShortcut`."""
    transformer = model.base_denoiser
    cond = model.encode_prompt(prompts)
    x = torch.randn(len(prompts), *model.latent_shape(1, model.default_resolution)[1:])
    t = model.noise.sample_timesteps(len(prompts))
    with torch.no_grad():
        plain = model.family.denoise(transformer, x, t, cond)
        shortcut = ZeroRowsShortcut(transformer)
        try:
            fast = model.family.denoise(transformer, x, t, cond)
        finally:
            shortcut.remove()
    return (plain - fast).abs().max().item()


def train_stage(
    work: Path,
    name: str,
    init: Path,
    steps: int,
    eval_every: int,
    seed: int,
    caption_noise: float,
    colour_bias: tuple[str, str, float] | None,
    lr: float,
    batch: int,
    warmup: int = 200,
) -> Path:
    """Train transformer and text encoders from the pipeline at `init`; snapshots in `work/<name>`."""
    from mmalign.models.diffusion import DiffusionModel
    from mmalign.models.noise import FlowMatching

    out = work / name
    if (out / "done.json").exists():
        return out
    torch.manual_seed(seed)
    model = DiffusionModel.from_pretrained(init, lora_rank=None, reference=False)
    pipe = model.pipe
    noise_process = model.noise
    if not isinstance(noise_process, FlowMatching):
        raise TypeError(f"expected a flow-matching noise process, got {type(noise_process).__name__}")
    heldout = shapes_world.captions("heldout")
    error = check_shortcut(model, heldout[:8])
    if error > 1e-4:
        raise RuntimeError(f"ZeroRowsShortcut changes the transformer's output by {error:.2e}")
    transformer, encoders = pipe.transformer, (pipe.text_encoder, pipe.text_encoder_2)
    for encoder in encoders:
        encoder.requires_grad_(True).train()
    params = [p for m in (transformer, *encoders) for p in m.parameters()]
    ema = EMA(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    start = time.time()
    mean, std, caps = render_latents(pipe.vae, DATA_SIZE, seed + 100, caption_noise, colour_bias)
    shift, scaling = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    rng = np.random.default_rng(seed + 200)
    resolution = model.default_resolution
    shortcut = ZeroRowsShortcut(transformer)
    out.mkdir(parents=True, exist_ok=True)
    log(work, {"phase": name, "init": str(init), "shortcut_max_abs_error": error, "data": len(caps)})
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(caps), batch))
        x0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx]) - shift) * scaling
        prompts = ["" if rng.random() < 0.1 else caps[i] for i in idx.tolist()]
        cond = model.family.encode_prompt(pipe, prompts, resolution)
        noise = torch.randn_like(x0)
        t = noise_process.sample_timesteps(batch)
        pred = model.family.denoise(transformer, noise_process.add_noise(x0, noise, t), t, cond)
        loss = F.mse_loss(pred, noise_process.target(x0, noise, t))
        optimizer_step(loss, params, opt, sched)
        ema.update(step)
        if step % 100 == 0:
            log(work, {"phase": name, "step": step, "loss": loss.item(), "minutes": (time.time() - start) / 60})
        if step % eval_every == 0 or step == steps:
            for module in (transformer, *encoders):
                module.eval()
            with ema.applied():
                pipe.save_pretrained(out / f"step-{step:06d}", safe_serialization=True)
                heldout_eval = evaluate_t2i(model, heldout, seed + 400)
            log(
                work,
                {
                    "phase": name,
                    "step": step,
                    "eval": True,
                    "heldout": heldout_eval,
                    "minutes": (time.time() - start) / 60,
                },
            )
            for module in (transformer, *encoders):
                module.train()
    shortcut.remove()
    (out / "done.json").write_text(json.dumps({"steps": steps, "minutes": (time.time() - start) / 60}))
    return out


def ship(work: Path, step: int, command: str, settings: dict) -> None:
    """The stage-2 snapshot `step` in fp16 to mmalign/assets, scored with the recipes' evaluator; the log."""
    from mmalign.config import EvalConfig
    from mmalign.models.diffusion import DiffusionModel
    from mmalign.train.evaluation import DiffusionEvaluator

    pipe = StableDiffusion3Pipeline.from_pretrained(
        work / "stage2" / f"step-{step:06d}", text_encoder_3=None, tokenizer_3=None
    )
    pipe.to(torch.float16)
    shutil.rmtree(TARGET, ignore_errors=True)
    pipe.save_pretrained(TARGET, safe_serialization=True)
    model = DiffusionModel.from_pretrained(TARGET, lora_rank=None, reference=False)
    config = EvalConfig(prompts="heldout", samples_per_prompt=2, gold="shapes-gold", rewards=[])
    evaluator = DiffusionEvaluator(config, model)
    start = time.time()
    shipped = evaluator.score(evaluator.sample())
    log(work, {"phase": "ship", "step": step, "heldout": shipped, "minutes": (time.time() - start) / 60})
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]

    def evals(stage: str) -> list[dict]:
        return [
            {k: r[k] for k in ("step", "heldout", "minutes")} for r in records if r["phase"] == stage and r.get("eval")
        ]

    def minutes(stage: str) -> float:
        return json.loads((work / stage / "done.json").read_text())["minutes"]

    init = next(r for r in records if r["phase"] == "init")
    size = sum(f.stat().st_size for f in TARGET.rglob("*") if f.is_file())
    gold = shipped["shapes-gold"]
    summary = {
        "shipped": f"stage 2, step {step}, fp16 ({size / 2**20:.1f} MiB)",
        "settings": settings,
        "autoencoder": {
            "from": "embedded:shapes-t2i (frozen)",
            **{k: init[k] for k in ("shift_factor", "scaling_factor")},
        },
        "stage1": {"caption_noise": settings["caption_noise"], "minutes": minutes("stage1"), "evals": evals("stage1")},
        "stage2": {
            "init": f"stage 1, step {settings['stage1_steps']}",
            "caption_noise": settings["caption_noise"],
            "colour_bias": settings["colour_bias"],
            "minutes": minutes("stage2"),
            "evals": evals("stage2"),
        },
        "shipped_heldout": {"evaluator": "DiffusionEvaluator, 20 steps, guidance 3, 2 samples per caption", **shipped},
        "note": (
            "An SD3-class flow-matching model of the shapes world (StableDiffusion3Pipeline: a "
            f"{EMBEDDED_SD3.transformer_layers}-layer MM-DiT of width "
            f"{EMBEDDED_SD3.transformer_heads * EMBEDDED_SD3.transformer_head_dim}, patch 1 on 8x8x4 latents, two "
            "CLIP text encoders without T5, FlowMatchEulerDiscreteScheduler with shift "
            f"{settings['shift']}) on the frozen autoencoder of embedded:shapes-t2i. Transformer and text "
            "encoders are trained from scratch and from the shipped text encoder respectively, by rectified flow "
            "(logit-normal sigma, shifted), 10% caption dropout, EMA, on renders of which 30% show a near-miss of "
            f"their caption ({settings['stage1_steps']} steps); stage 2 continues for {settings['stage2_steps']} "
            f"steps with one systematic bias added (an image captioned 'red' shows blue instead with p=0.6). "
            f"Batch {settings['batch']}, lr {settings['lr']}, one CPU thread: "
            f"{minutes('stage1') + minutes('stage2'):.0f} minutes of training including the snapshot evaluations. "
            "The gold metric never enters training. Held-out gold with mmalign's evaluator (20 steps, guidance 3, "
            f"2 samples per caption): {gold:.3f}. Reproduce: {command}"
        ),
    }
    (ASSETS / "FLOW_TRAINING_LOG.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shift", type=float, default=2.0, help="the flow scheduler's shift (training and sampling)")
    parser.add_argument("--stage1-steps", type=int, default=3200)
    parser.add_argument("--stage2-steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--caption-noise", type=float, default=0.3, help="share of mis-captioned training images")
    parser.add_argument("--colour-bias", default="red:blue:0.6", help="stage 2's systematic error A:B:P")
    parser.add_argument("--ship-step", type=int, default=None, help="stage-2 snapshot to ship (default: the last)")
    parser.add_argument("--phases", default="stage1,stage2,ship")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    source, target, p = args.colour_bias.split(":")
    bias = (source, target, float(p))
    common = dict(eval_every=args.eval_every, seed=args.seed, caption_noise=args.caption_noise, lr=args.lr)
    common["batch"] = args.batch
    stage1 = args.work_dir / "stage1"
    if "stage1" in phases:
        init = build_initial(args.work_dir, args.shift, args.seed)
        train_stage(args.work_dir, "stage1", init, args.stage1_steps, colour_bias=None, **common)
    if "stage2" in phases:
        init = stage1 / f"step-{args.stage1_steps:06d}"
        train_stage(args.work_dir, "stage2", init, args.stage2_steps, colour_bias=bias, **common)
    if "ship" in phases:
        command = (
            f"python scripts/train_shapes_flow.py --work-dir W --shift {args.shift} --stage1-steps "
            f"{args.stage1_steps} --stage2-steps {args.stage2_steps} --eval-every {args.eval_every} "
            f"--batch {args.batch} --lr {args.lr} --seed {args.seed} --threads 1"
        )
        settings = {
            "shift": args.shift,
            "stage1_steps": args.stage1_steps,
            "stage2_steps": args.stage2_steps,
            "batch": args.batch,
            "lr": args.lr,
            "caption_noise": args.caption_noise,
            "colour_bias": f"{source} drawn as {target} with p={p}",
            "seed": args.seed,
        }
        ship(args.work_dir, args.ship_step or args.stage2_steps, command, settings)


if __name__ == "__main__":
    main()
