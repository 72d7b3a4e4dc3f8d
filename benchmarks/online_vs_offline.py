"""Held-out gold against wall time: online RL (Flow-GRPO, its 2-step window, DiffusionNFT) against
offline Diffusion-DPO, from the same start with the same reward, in one run.

    python benchmarks/online_vs_offline.py [--model embedded:shapes-t2i-flow] [--seed 0] [--eval-every 10]
        [--out runs/bench/online_vs_offline] [--arms flow-grpo flow-grpo-fast diffusion-nft diffusion-dpo]

Every arm is its shipped recipe from the CLI (one thread, one process, run one after the other) with
`model` set to the same start, evaluated on the same held-out prompts with the same noise. The
training reward is the toy CLIP: the online arms score their own rollouts with it; Diffusion-DPO
trains on the model's own samples paired best vs worst by it (`embedded:shapes-prefs`), built once
before its first step. The steps per arm (`STEPS`) give each a similar training time on a CPU.

Prints, as JSON, per arm: the evaluations `(seconds, gold)` with seconds the optimizer loop's time
(rollouts included for the online arms), the time spent outside it (the process's wall time minus
training: model loading, evaluations and, for DPO, generating its pairs), and the gold at the
budget: the last evaluation within the shortest arm's training time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARMS = {
    "flow-grpo": ("image/flow_grpo.yaml", []),
    "flow-grpo-fast": ("image/flow_grpo.yaml", ["flow_grpo.window=random", "flow_grpo.window_size=2"]),
    "diffusion-nft": ("image/diffusion_nft.yaml", []),
    # its UNet targets do not apply; evaluated on the online recipes' 64 held-out captions
    "diffusion-dpo": ("image/diffusion_dpo.yaml", ["model.lora_targets=null", "eval.num_prompts=64"]),
}
STEPS = {"flow-grpo": 40, "flow-grpo-fast": 80, "diffusion-nft": 60, "diffusion-dpo": 200}


def run_arm(name: str, model: str, seed: int, eval_every: int, out: Path) -> dict:
    recipe, overrides = ARMS[name]
    steps = STEPS[name]
    every = eval_every * steps // STEPS["flow-grpo"]  # the same number of evaluations per arm
    run_dir = out / name
    cmd = [sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / recipe), f"model={model}",
           f"seed={seed}", f"output_dir={run_dir}", f"train.max_steps={steps}", f"eval.every={every}",
           f"train.checkpoint_every={every}", "train.threads=1", "eval.monitor.action=off", *overrides]  # fmt: skip
    if name == "diffusion-dpo":
        cmd.append(f"data.cache_dir={out / 'cache'}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    wall = time.perf_counter() - start
    report = json.loads((run_dir / "report.json").read_text())
    evaluations = json.loads((run_dir / "evaluations.json").read_text())
    gold = report["gold_metric"]
    curve = [(e["train_seconds"], round(e["metrics"][gold], 4)) for e in evaluations]
    return {"steps": steps, "curve": curve, "wall_seconds": round(wall, 1), "train_seconds": curve[-1][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:shapes-t2i-flow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10, help="evaluation interval of the flow-grpo arm")
    parser.add_argument("--out", default="runs/bench/online_vs_offline")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run_arm(name, args.model, args.seed, args.eval_every, out) for name in args.arms}
    budget = min(r["train_seconds"] for r in results.values())
    for r in results.values():
        r["gold_at_budget"] = [g for s, g in r["curve"] if s <= budget][-1]
        r["outside_training_seconds"] = round(r["wall_seconds"] - r["train_seconds"], 1)
    print(json.dumps({"model": args.model, "seed": args.seed, "budget_seconds": budget, "arms": results}, indent=2))


if __name__ == "__main__":
    main()
