"""Throughput of a reward through `mmalign serve-reward` ÷ in-process, on the same batch, in one run.

    python benchmarks/server_overhead.py [--models tiny,vit-b-32] [--batches 8,32] [--rounds 11] [--threads 1]

For each CLIP model and batch size B, the same B images (random, on the 8-bit grid) and prompts are
scored (a) in process by `load_reward("clip-score", path=…)(images, prompts)` and (b) through the
HTTP server — `mmalign serve-reward clip-score --path …`, started as a subprocess on 127.0.0.1 —
by `load_reward("http://127.0.0.1:PORT/clip-score", batch_size=B)(images, prompts)`, one request per
call (PNG encoding, JSON, HTTP, decoding and the server's batching queue included; `--max-wait-ms`
0 so a lone request is not held back). Arms are interleaved A B A B over the rounds after one
untimed warm-up call each, so drift hits both alike. Both processes run torch on `--threads` threads
(`torch.set_num_threads` here, `OMP_NUM_THREADS` for the server), so neither arm's idle process
keeps OpenMP workers spinning on the cores the other arm needs. Prints images/s per arm, median with min–max
over rounds, and the per-round ratio server ÷ in-process (median, min–max).

Models: `tiny` is the embedded shapes-world CLIP (`embedded:shapes-clip`, 32 px); `vit-b-32` is a
randomly initialised CLIP of ViT-B/32 size (vision 768-wide × 12 layers at 224 px, patch 32; text
512-wide × 12 layers), saved to a temporary folder — the weights do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmalign.rewards import RewardInputError, load_reward  # noqa: E402
from mmalign.rewards.server import free_port  # noqa: E402

PROMPTS = ["a red circle", "a blue square left of a green circle", "a green triangle", "a photo of a red square"]


def vit_b_32(directory: Path) -> Path:
    """Save a random-init transformers CLIP of ViT-B/32 size with the toy tokenizer and a 224 px processor."""
    from transformers import CLIPConfig, CLIPModel

    from mmalign.models.tiny import WORDS, clip_processor
    from mmalign.models.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(WORDS, model_max_length=77)
    text = dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                num_hidden_layers=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                  num_hidden_layers=12)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).save_pretrained(directory)
    clip_processor(tokenizer, 224).save_pretrained(directory)
    return directory


def start_server(path: str, port: int, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mmalign.cli", "serve-reward", "clip-score", "--path", path, "--port", str(port),
               "--max-wait-ms", "0", "--max-batch", "256", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def connect(url: str, process: subprocess.Popen, batch: int, timeout: float = 300.0):
    """The client reward once the server answers (fails if the server process exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return load_reward(url, batch_size=batch)
        except RewardInputError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server at {url} did not start") from None
            time.sleep(0.2)


def spread(values: list[float], digits: int) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}  # fmt: skip


def throughput(reward, images: torch.Tensor, prompts: list[str]) -> float:
    """Images per second of one call."""
    start = time.perf_counter()
    reward(images, prompts, progress=False)
    return len(images) / (time.perf_counter() - start)


def measure(path: str, batches: list[int], rounds: int, threads: int) -> dict[str, dict]:
    local = load_reward("clip-score", path=path, batch_size=max(batches))
    size = local.backend.size  # the model's input side in pixels
    port = free_port()
    process = start_server(path, port, threads)
    results = {}
    try:
        for batch in batches:
            remote = connect(f"http://127.0.0.1:{port}/clip-score", process, batch)
            images = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) * 255).round()
            images /= 255
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            gap = float((remote(images, prompts) - local(images, prompts)).abs().max())  # also the warm-up
            times: dict[str, list[float]] = {"in-process": [], "server": []}
            for _ in range(rounds):
                times["in-process"].append(throughput(local, images, prompts))
                times["server"].append(throughput(remote, images, prompts))
            ratios = [s / i for s, i in zip(times["server"], times["in-process"])]
            results[str(batch)] = {
                "image_size": size,
                "in-process images/s": spread(times["in-process"], 1),
                "server images/s": spread(times["server"], 1),
                "server ÷ in-process": spread(ratios, 3),
                "max |score gap|": round(gap, 6),
            }
    finally:
        process.terminate()
        process.wait(30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit-b-32", help="comma-separated: tiny, vit-b-32")
    parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds (each runs both arms once)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            from mmalign.registry import resolve_model_path

            path = resolve_model_path("embedded:shapes-clip") if model == "tiny" else str(vit_b_32(Path(tmp) / model))
            report[model] = measure(path, batches, args.rounds, args.threads)
    info = {"rounds": args.rounds, "torch threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(json.dumps({**info, "models": report}, indent=2, ensure_ascii=False))
    print("\n| model | batch | in-process img/s | server img/s | server ÷ in-process |\n|---|---|---|---|---|")
    for model, rows in report.items():
        for batch, r in rows.items():
            a, b, q = r["in-process images/s"], r["server images/s"], r["server ÷ in-process"]
            print(f"| {model} | {batch} | {a['median']} ({a['min']}–{a['max']}) "
                  f"| {b['median']} ({b['min']}–{b['max']}) "
                  f"| {q['median']:.3f} ({q['min']:.3f}–{q['max']:.3f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
