"""Diffusion-DPO step cost against SFT on the same 2B images, measured in one run.

    python benchmarks/dpo_step.py [--model embedded:shapes-t2i] [--pairs 8] [--steps 30]
    python benchmarks/dpo_step.py --real sd15 --resolution 64 [--pairs 2] [--steps 5]

`--real NAME` builds a random-weight pipeline from a published config (`mmalign.models.real_configs`:
sd15 is Stable Diffusion 1.5's 860 M-parameter UNet, its VAE and CLIP-L) and measures that instead.

Prints, for LoRA training on the same batch of B pairs:
- time: median DPO step ÷ median SFT step, where the SFT step trains on the same 2B images
  (steps interleaved so drift hits both alike); target ≤ 1.35;
- memory: peak of a LoRA-DPO step ÷ peak of a LoRA-SFT step (target ≤ 1.10). On CUDA this is
  `torch.cuda.max_memory_allocated`; on CPU it is the process's peak resident set (VmHWM, reset
  after loading) measured in a fresh subprocess per method, reported both as the whole-process
  peak and as the increase over the loaded model.

The reference is the same network with its adapters disabled, never a second copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_method(name: str, model: str, data: str, lora_rank: int, resolution: int | None = None):
    from mmalign.config import load_config
    from mmalign.registry import METHODS, load

    overrides = [
        f"method={name}",
        f"model={model}",
        f"data={data}",
        f"model.lora_rank={lora_rank}",
        "eval.rewards=[]",
        "eval.num_prompts=1",
    ]
    if name == "diffusion-sft":
        overrides.append("diffusion_sft.both_images=true")
    if resolution:
        overrides.append(f"data.resolution={resolution}")
    run = load_config(None, overrides)
    method = load(METHODS, "method", name)(run)
    method.setup(Accelerator(cpu=not torch.cuda.is_available()))
    return method


def train_step(method, batch, optimizer, step: int) -> None:
    loss, _ = method.compute_loss(batch, step, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory(
    name: str, model: str, data: str, pairs: int, lora_rank: int, resolution: int | None = None, steps: int = 3
) -> dict:
    """Peak memory of a few training steps of one method (run in its own process on CPU)."""
    method = build_method(name, model, data, lora_rank, resolution)
    batch = method.collate([method.dataset[i] for i in range(pairs)])
    optimizer = torch.optim.AdamW(method.model.trainable_parameters(), lr=1e-5)
    train_step(method, batch, optimizer, 0)  # allocate optimizer state and caches
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for step in range(1, steps + 1):
        train_step(method, batch, optimizer, step)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _rss_kib("VmHWM") * 1024
    return {"base_bytes": base, "peak_bytes": peak}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:shapes-t2i")
    parser.add_argument("--data", default=None, help="pair folder; default: world renders written to a temp dir")
    parser.add_argument("--pairs", type=int, default=8, help="B: pairs per DPO step (SFT gets the 2B images)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--real", default=None, help="build this real_configs model (random weights) as --model")
    parser.add_argument("--resolution", type=int, default=None, help="training resolution; default: the model's")
    parser.add_argument("--memory-child", choices=["diffusion-dpo", "diffusion-sft"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or str(_render_pairs(Path(tempfile.mkdtemp(prefix="mmalign-bench-")), args.pairs))
    if args.real:
        from mmalign.models.real_configs import build_real

        args.model = str(build_real(args.real, Path(tempfile.mkdtemp(prefix="mmalign-real-")) / args.real))
    if args.memory_child:
        print(json.dumps(peak_memory(args.memory_child, args.model, data, args.pairs, args.lora_rank, args.resolution)))
        return

    dpo = build_method("diffusion-dpo", args.model, data, args.lora_rank, args.resolution)
    sft = build_method("diffusion-sft", args.model, data, args.lora_rank, args.resolution)
    batch = dpo.collate([dpo.dataset[i] for i in range(args.pairs)])
    opt_dpo = torch.optim.AdamW(dpo.model.trainable_parameters(), lr=1e-5)
    opt_sft = torch.optim.AdamW(sft.model.trainable_parameters(), lr=1e-5)
    times: dict[str, list[float]] = {"dpo": [], "sft": []}
    for step in range(args.warmup + args.steps):
        for name, method, opt in (("dpo", dpo, opt_dpo), ("sft", sft, opt_sft)):
            sync()
            start = time.perf_counter()
            train_step(method, batch, opt, step)
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    t_dpo, t_sft = statistics.median(times["dpo"]), statistics.median(times["sft"])
    ratios = [d / s for d, s in zip(times["dpo"], times["sft"])]  # per interleaved round

    memory = {}
    for name in ("diffusion-dpo", "diffusion-sft"):
        if torch.cuda.is_available():
            memory[name] = peak_memory(name, args.model, data, args.pairs, args.lora_rank, args.resolution)
        else:
            cmd = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--data",
                data,
                "--pairs",
                str(args.pairs),
                "--lora-rank",
                str(args.lora_rank),
                "--memory-child",
                name,
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.resolution:
                cmd += ["--resolution", str(args.resolution)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            memory[name] = json.loads(out.strip().splitlines()[-1])
    d, s = memory["diffusion-dpo"], memory["diffusion-sft"]
    result = {
        "model": args.real or args.model,
        "resolution": args.resolution,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "pairs": args.pairs,
        "dpo_step_s": round(t_dpo, 5),
        "sft_step_s": round(t_sft, 5),
        "time_ratio": round(t_dpo / t_sft, 3),
        "time_ratio_spread": [round(min(ratios), 3), round(max(ratios), 3)],
        "step_s_spread": {k: [round(min(v), 5), round(max(v), 5)] for k, v in times.items()},
        "rounds": len(ratios),
        "peak_ratio": round(d["peak_bytes"] / s["peak_bytes"], 3),
        "step_memory_ratio": round((d["peak_bytes"] - d["base_bytes"]) / max(1, s["peak_bytes"] - s["base_bytes"]), 3),
        "peak_mib": {"dpo": round(d["peak_bytes"] / 2**20, 1), "sft": round(s["peak_bytes"] / 2**20, 1)},
    }
    print(json.dumps(result, indent=2))
    print(
        f"DPO/SFT step time {result['time_ratio']} (target <= 1.35); peak memory {result['peak_ratio']} "
        f"(target <= 1.10); memory above the loaded model {result['step_memory_ratio']}"
    )


def _render_pairs(root: Path, n: int) -> Path:
    from tests.conftest import write_pair_folder

    return write_pair_folder(root, n=max(n, 8))


if __name__ == "__main__":
    main()
