"""FSDP2 over 2 processes against 1 process on the same global batch: step time and peak memory per process.

    python benchmarks/fsdp_step.py [--models embedded,unet-large] [--batch 8] [--steps 6] [--rounds 3]

Each arm trains the whole denoiser (full fine-tuning, AdamW, the ε-prediction MSE loss on random
latents and text states of the model's shapes) for `--steps` timed optimizer steps after two warm-up
steps, in fresh processes: `1 process` runs the whole global batch; `FSDP ×2` is
`accelerate launch --config_file configs/accelerate/fsdp.yaml` (2 processes, half the batch each,
sharded by accelerate's `prepare` as `mmalign train` is). Arms alternate A B A B over `--rounds`,
every process with one thread. Reported per model and arm: the median step time over rounds (and
the spread: min–max of the rounds' medians), the ratio FSDP ÷ 1 process, and per process the peak
resident set while training (VmHWM, reset once the model is prepared), the resident set when
prepared, and their difference (gradients, optimizer state, activations).

Models: `embedded` is the UNet of `embedded:shapes-t2i`; `unet-large` a randomly initialised SD-style
UNet2DConditionModel (block widths 128/256/256, about 40 M parameters) at 32×32 latents.
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

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
MODELS = ("embedded", "unet-large")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def build_unet(name: str):
    """`(unet, latent (C, h, w), text (L, D))` for a model name."""
    import torch
    from diffusers import UNet2DConditionModel

    from mmalign.models.diffusion import load_pipeline

    if name == "embedded":
        unet = load_pipeline("embedded:shapes-t2i").unet
    elif name == "unet-large":
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(128, 256, 256),
            layers_per_block=2,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=256,
            attention_head_dim=8,
        )
    else:
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    size = int(unet.config.sample_size)
    return unet.float().train(), (int(unet.config.in_channels), size, size), (8, int(unet.config.cross_attention_dim))


def worker(model: str, batch: int, steps: int, out: Path) -> None:
    """One process of an arm: train `steps` timed steps on its share of the global batch, write its figures."""
    import torch
    from accelerate import Accelerator

    from mmalign.train import sharding

    torch.set_num_threads(1)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    sharding.use_fsdp_on_cpu(acc)
    unet, latent, text = build_unet(model)
    unet.to(acc.device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    unet, optimizer = acc.prepare(unet, optimizer)
    share = batch // acc.num_processes
    generator = torch.Generator().manual_seed(acc.process_index)

    def step() -> None:
        x0 = torch.randn(share, *latent, generator=generator).to(acc.device)
        noise = torch.randn(share, *latent, generator=generator).to(acc.device)
        states = torch.randn(share, *text, generator=generator).to(acc.device)
        t = torch.randint(0, 1000, (share,), generator=generator).to(acc.device)
        loss = torch.nn.functional.mse_loss(unet(x0 + noise, t, states).sample, noise)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    prepared = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the training peak
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        acc.wait_for_everyone()
        start = time.perf_counter()
        step()
        acc.wait_for_everyone()
        times.append(time.perf_counter() - start)
    figures = {
        "rank": acc.process_index,
        "processes": acc.num_processes,
        "sharded": acc.is_fsdp2,
        "params": sum(p.numel() for p in unet.parameters()),
        "median_step_s": statistics.median(times),
        "prepared_mib": prepared / 1024,
        "peak_mib": _status_kib("VmHWM") / 1024,
    }
    out.with_name(f"{out.name}-rank{acc.process_index}.json").write_text(json.dumps(figures))


def run_arm(arm: str, model: str, batch: int, steps: int, folder: Path, port: int) -> list[dict]:
    """Run one arm in fresh processes; return each process's figures."""
    out = folder / f"{arm}-{model}-{port}"
    args = [str(Path(__file__).resolve()), "--worker", model, "--batch", str(batch), "--steps", str(steps)]
    args += ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if arm == "fsdp":
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
        command = [*launch, "--num_processes", "2", "--main_process_port", str(port), *args]
    else:
        command = [sys.executable, *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{arm} on {model} failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{out.name}-rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=8, help="global batch (samples per optimizer step)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds per model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a.worker, a.batch, a.steps, a.out)
        return
    port = 29700
    with tempfile.TemporaryDirectory() as scratch:
        for model in a.models.split(","):
            runs: dict[str, list[list[dict]]] = {"single": [], "fsdp": []}
            for _ in range(a.rounds):
                for arm in runs:
                    port += 1
                    runs[arm].append(run_arm(arm, model, a.batch, a.steps, Path(scratch), port))
            report(model, a.batch, runs)


def report(model: str, batch: int, runs: dict[str, list[list[dict]]]) -> None:
    """Print one model's figures."""
    print(f"\n{model}: {runs['single'][0][0]['params'] / 1e6:.1f} M parameters, global batch {batch}")
    medians = {}
    for arm, label in (("single", "1 process"), ("fsdp", "FSDP x2")):
        times = [max(p["median_step_s"] for p in run) for run in runs[arm]]
        medians[arm] = statistics.median(times)
        print(
            f"  {label:9s} step {medians[arm] * 1000:7.1f} ms (rounds {min(times) * 1000:.1f}-{max(times) * 1000:.1f})"
        )
        for rank in range(len(runs[arm][0])):
            peak = statistics.median(run[rank]["peak_mib"] for run in runs[arm])
            prepared = statistics.median(run[rank]["prepared_mib"] for run in runs[arm])
            print(
                f"    rank {rank}: peak RSS {peak:7.1f} MiB, prepared {prepared:7.1f} MiB, "
                f"training adds {peak - prepared:6.1f} MiB (medians over rounds)"
            )
    print(f"  FSDP x2 / 1 process step time: {medians['fsdp'] / medians['single']:.2f}")


if __name__ == "__main__":
    main()
