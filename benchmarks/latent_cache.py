"""Diffusion-DPO step time with `data.cache_latents` against encoding every step, measured in one run.

    python benchmarks/latent_cache.py [--model embedded:shapes-t2i | sd15-random] [--pairs 2]
        [--resolution 64] [--rounds 9] [--threads 1]

`sd15-random` is a randomly initialised pipeline of Stable Diffusion 1.5's real sizes, built in
memory: the UNet2DConditionModel of SD1.5's config (block_out_channels 320/640/1280/1280, 2 layers per
block, cross-attention 768, head dim 8), its AutoencoderKL (128/256/512/512) and a CLIP ViT-L/14 text
encoder (12 layers, width 768, 77 tokens, vocabulary 49408).

One LoRA Diffusion-DPO method serves both arms, so they train the same weights: the uncached arm
reads the pair images (decode, resize, crop) and runs the autoencoder and the text encoder; the cached
arm reads posteriors and prompt embeddings from the cache. A step is: build the batch of B pairs,
loss, backward, optimizer step. Arms alternate within each round (A B, then B A); each round uses other
pairs. Prints the median step of each arm, the median time the uncached arm spends in the encoders
(measured apart, each round), the ratio of medians (cached ÷ uncached), the median and range of the
per-round ratios, and the one-off seconds to build the cache (key included: it hashes the
encoders' weights) and to open it again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD15 = "sd15-random"


def sd15_pipeline(seed: int = 0):
    """A `StableDiffusionPipeline` with SD1.5's component sizes and random weights."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmalign.models.tiny import WORDS, _ddim
    from mmalign.models.tokenizers import clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, model_max_length=77)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_method(model: str, data: Path, cache: Path, resolution: int, lora_rank: int):
    """A Diffusion-DPO method with `data.cache_latents` on, set up (the cache built or opened)."""
    from mmalign.config import load_config
    from mmalign.image.diffusion_dpo import DiffusionDPO
    from mmalign.models.diffusion import DiffusionModel

    overrides = [
        f"data={data}",
        f"data.cache_dir={cache}",
        "data.cache_latents=true",
        f"data.resolution={resolution}",
        f"model.lora_rank={lora_rank}",
        "eval.rewards=[]",
        "eval.num_prompts=1",
    ]
    if model != SD15:
        overrides.append(f"model={model}")
    run = load_config(None, overrides)

    class RandomSD15DPO(DiffusionDPO):
        def load_model(self, accelerator) -> None:
            self.device = accelerator.device
            self.model = DiffusionModel(sd15_pipeline(), lora_rank=lora_rank).to(self.device)
            self.policy = self.model

    method = (RandomSD15DPO if model == SD15 else DiffusionDPO)(run)
    method.setup(Accelerator(cpu=not torch.cuda.is_available()))
    return method


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_step(method, dataset, indices: list[int], optimizer, step: int) -> float:
    """Seconds of one training step on pairs `indices` of `dataset` (batch building included)."""
    method.dataset = dataset
    sync()
    start = time.perf_counter()
    batch = method.collate([dataset[i] for i in indices])
    loss, _ = method.compute_loss(batch, step, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def timed_encoders(method, indices: list[int], step: int) -> float:
    """Seconds the uncached arm spends in the frozen encoders for pairs `indices`: the autoencoder on the
    2B images and the text encoder on the B prompts (the work the cache removes, data loading aside)."""
    method.dataset = method.pairs
    batch = method.collate([method.pairs[i] for i in indices])
    sync()
    start = time.perf_counter()
    method.clean_latents(batch, ("w", "l"), step)
    method.conditioning(batch["prompt"], 2)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:shapes-t2i", help=f"a pipeline path or {SD15}")
    parser.add_argument("--pairs", type=int, default=2, help="B: pairs per DPO step")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from mmalign.data.latent_cache import cached_pairs
    from tests.conftest import write_pair_folder

    scratch = Path(tempfile.mkdtemp(prefix="mmalign-bench-cache-"))
    n = args.pairs * (args.rounds + args.warmup)
    data = write_pair_folder(scratch / "pairs", n=n)

    method = build_method(args.model, data, scratch / "cache", args.resolution, args.lora_rank)
    shutil.rmtree(scratch / "cache")
    one_off = {}
    for name in ("build", "open"):
        start = time.perf_counter()
        cached_pairs(method.pairs, method.model, scratch / "cache", method.run.model.dtype, log=lambda _: None)
        one_off[name] = time.perf_counter() - start

    arms = {"uncached": method.pairs, "cached": method.dataset}
    optimizer = torch.optim.AdamW(method.model.trainable_parameters(), lr=1e-5)
    times: dict[str, list[float]] = {name: [] for name in arms}
    encoders: list[float] = []
    for r in range(args.warmup + args.rounds):
        indices = list(range(r * args.pairs, (r + 1) * args.pairs))
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for name in order:
            seconds = timed_step(method, arms[name], indices, optimizer, r)
            if r >= args.warmup:
                times[name].append(seconds)
        if r >= args.warmup:
            encoders.append(timed_encoders(method, indices, r))
    per_round = [c / u for c, u in zip(times["cached"], times["uncached"])]
    cached, uncached = statistics.median(times["cached"]), statistics.median(times["uncached"])
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {args.threads} thread(s)",
        "pairs": args.pairs,
        "resolution": args.resolution,
        "rounds": args.rounds,
        "uncached_step_s": round(uncached, 4),
        "cached_step_s": round(cached, 4),
        "encoders_s": round(statistics.median(encoders), 4),
        "ratio_of_medians": round(cached / uncached, 3),
        "per_round_ratio": {
            "median": round(statistics.median(per_round), 3),
            "min": round(min(per_round), 3),
            "max": round(max(per_round), 3),
        },
        "cache_build_s": round(one_off["build"], 2),
        "cache_open_s": round(one_off["open"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
