"""Reward scoring throughput: `load_reward(...)` against the bare encoder forward, same model and batch.

    python benchmarks/score_throughput.py [--rewards clip-score pickscore aesthetic] [--batches 1 8 64]
        [--rounds 3] [--big-rounds 1] [--device cpu]

For each reward and batch size B, two arms run on the same loaded model and the same B random
224×224 images in [0, 1] with B distinct prompts:

- reward: `reward(images, prompts)` as a user calls it (input checks, batching, torch
  preprocessing, text embeddings, the score, the copy to CPU); its prompt cache is cleared
  before each call, so both arms embed the same text;
- bare: the encoder forward alone on pixels already normalised: `get_image_features` plus
  `get_text_features` of the tokenised prompts for clip-score and pickscore, `get_image_features`
  plus the MLP for aesthetic, under `torch.no_grad()`.

Arms alternate A B A B after one warm-up call each; the figure is the median images/s of the
reward arm ÷ the median of the bare arm (target ≥ 0.9), with the min–max spread of the per-round
ratios. `--big-rounds` sets the rounds at B ≥ 64 (CPU time grows with B). Models are random-init
at real sizes: clip-score and aesthetic on CLIP ViT-L/14 (transformers `openai/clip-vit-large-patch14`
config), pickscore on CLIP ViT-H/14 (the PickScore_v1 / LAION CLIP-H config), written once to a
temporary folder in safetensors and loaded through `load_reward(name, path=...)`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (vision width, depth, heads, mlp), (text width, depth, heads, mlp), projection
VIT_L = ((1024, 24, 16, 4096), (768, 12, 12, 3072), 768)
VIT_H = ((1280, 32, 16, 5120), (1024, 24, 16, 4096), 1024)


def save_clip(directory: Path, sizes: tuple) -> Path:
    """A random-init transformers CLIP at `sizes` (224 px, patch 14) with the CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from mmalign.models.tiny import clip_processor
    from mmalign.models.tokenizers import clip_tokenizer

    (vw, vd, vh, vm), (tw, td, th, tm), projection = sizes
    tokenizer = clip_tokenizer(("a", "photo", "of", "cat", "dog", "red", "blue", "circle"), model_max_length=77)
    text = dict(vocab_size=len(tokenizer), hidden_size=tw, num_hidden_layers=td, num_attention_heads=th)
    text |= dict(intermediate_size=tm, max_position_embeddings=77, hidden_act="gelu")
    text |= dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text |= dict(pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=vw, num_hidden_layers=vd, num_attention_heads=vh, intermediate_size=vm)
    vision |= dict(image_size=224, patch_size=14, hidden_act="gelu")
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    CLIPModel(config).eval().save_pretrained(directory)
    clip_processor(tokenizer, image_size=224).save_pretrained(directory)
    return directory


def build(name: str, root: Path, device: str):
    """`(reward, bare)`: the loaded reward and a function running its bare forward on one batch."""
    from mmalign.rewards import load_reward
    from mmalign.rewards.clip_score import pooled, preprocess

    if name == "pickscore":
        reward = load_reward("pickscore", path=str(save_clip(root / "vit-h", VIT_H)), device=device)
    else:
        folder = root / "vit-l"
        if not (folder / "config.json").is_file():
            save_clip(folder, VIT_L)
        if name == "aesthetic":
            from safetensors.torch import save_file

            from mmalign.rewards.aesthetic import AestheticMLP

            mlp = AestheticMLP(VIT_L[2])
            save_file(mlp.state_dict(), str(folder / "sac+logos+ava1-l14-linearMSE.safetensors"))
            reward = load_reward("aesthetic", path=str(folder), device=device)
        else:
            reward = load_reward("clip-score", path=str(folder), device=device)
    clip = reward.clip if name == "aesthetic" else reward
    backend = clip.backend
    model = backend.model

    def bare(images: torch.Tensor, prompts: list[str]) -> None:
        pixels = preprocess(images.to(clip.device), backend.size, backend.mean, backend.std)  # 224: normalise only
        with torch.no_grad():
            feats = pooled(model.get_image_features(pixel_values=pixels))
            if name == "aesthetic":
                reward.mlp(torch.nn.functional.normalize(feats, dim=-1))
            else:
                ids = backend.tokenizer(
                    prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
                )
                model.get_text_features(input_ids=ids.input_ids.to(clip.device))
        if images.device.type == "cuda":
            torch.cuda.synchronize()

    def through_reward(images: torch.Tensor, prompts: list[str]) -> None:
        clip._text_cache.clear()
        reward(images, prompts)

    return through_reward, bare


def timed(fn, images: torch.Tensor, prompts: list[str]) -> float:
    start = time.perf_counter()
    fn(images, prompts)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=["clip-score", "pickscore", "aesthetic"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds per batch size below 64")
    parser.add_argument("--big-rounds", type=int, default=1, help="A B rounds per batch size of 64 or more")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'reward':<12} {'batch':>5} {'reward img/s':>13} {'bare img/s':>11} {'ratio':>6}  spread")
    with tempfile.TemporaryDirectory(prefix="mmalign-throughput-") as tmp:
        for name in args.rewards:
            reward_arm, bare_arm = build(name, Path(tmp), args.device)
            for batch in args.batches:
                images = torch.rand(batch, 3, 224, 224)
                prompts = [f"a photo of a red cat number {i}" for i in range(batch)]
                warm = images[:1], prompts[:1]
                reward_arm(*warm), bare_arm(*warm)
                rounds = args.big_rounds if batch >= 64 else args.rounds
                measured: dict[str, list[float]] = {"reward": [], "bare": []}
                for _ in range(rounds):
                    measured["reward"].append(timed(reward_arm, images, prompts))
                    measured["bare"].append(timed(bare_arm, images, prompts))
                ratios = [r / b for r, b in zip(measured["reward"], measured["bare"])]
                r, b = statistics.median(measured["reward"]), statistics.median(measured["bare"])
                print(
                    f"{name:<12} {batch:>5} {r:>13.2f} {b:>11.2f} {r / b:>6.3f}  "
                    f"[{min(ratios):.3f}, {max(ratios):.3f}] over {rounds} round(s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
