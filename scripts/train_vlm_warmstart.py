"""Train the tiny VLM shipped as `embedded:vlm-shapes` (the policy the VLM recipes start from).

1. Builds a randomly initialised tiny Qwen2-VL (`WARMSTART_SIZE`, 56 px images → 4 image tokens)
   with a byte-level BPE trained on the embedded VLM world's questions (`mmalign.vlm.world.corpus`).
2. Runs the recipe `configs/vlm/sft.yaml` on it through the normal CLI path (supervised
   reference responses on the world's training stream, all kinds).
3. Copies the merged `final/model` folder into `mmalign/assets/vlm-shapes/`.

The SFT is stopped early on purpose (`configs/vlm/sft.yaml`: `train.max_steps`) so RL has room:
the shipped model answers most questions but not all. A killed run resumes from its checkpoint.

Usage: `python scripts/train_vlm_warmstart.py --work-dir /tmp/vlm-work [--seed 0] [--steps N]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from mmalign.models.tiny_vlm import VLMSize, build_tiny_vlm
from mmalign.vlm.world import corpus

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "mmalign" / "assets" / "vlm-shapes"
WARMSTART_SIZE = VLMSize(hidden=128, layers=4, heads=4, kv_heads=2, vision_width=64, vision_layers=2, image_size=56)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps of the recipe")
    args = parser.parse_args()
    init = args.work_dir / "init"
    if not (init / "model.safetensors").is_file():
        build_tiny_vlm("qwen2-vl", init, corpus=corpus(), size=WARMSTART_SIZE, seed=args.seed)
    run = args.work_dir / f"sft-seed{args.seed}"
    command = [
        sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / "vlm" / "sft.yaml"),
        f"model.path={init}", f"seed={args.seed}", f"output_dir={run}",
        *([f"train.max_steps={args.steps}"] if args.steps else []),
    ]  # fmt: skip
    subprocess.run(command, check=True)
    tmp = ASSET.with_name(f".tmp-{ASSET.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "final" / "model", tmp)
    shutil.rmtree(ASSET, ignore_errors=True)
    tmp.rename(ASSET)
    report = json.loads((run / "report.json").read_text())
    print(json.dumps({"shipped": str(ASSET), "before": report["before"], "after": report["after"],
                      "metrics": report["metrics"]["after"]}, indent=2))


if __name__ == "__main__":
    main()
