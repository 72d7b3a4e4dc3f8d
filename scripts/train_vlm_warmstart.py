"""Train the tiny VLM shipped as `embedded:vlm-shapes` (the policy the VLM recipes start from).

1. Builds a randomly initialised tiny Qwen2-VL (`WARMSTART_SIZE`, 56 px images → 4 image tokens)
   with a byte-level BPE trained on the embedded VLM world's questions (`mmalign.vlm.world.corpus`).
2. Stage 1 (`--onset-steps`): `configs/vlm/sft.yaml` on the `largest` questions only. On the full
   mix the randomly initialised vision path did not switch on in 1,800 steps (accuracy with the real
   image = with a black one; the merger's output grew into a large constant the language model
   normalises away); one vision-only kind switches it on after about 300 steps.
3. Stage 2 (`--count-steps`): `largest` and `count` questions, so counting reads the image too
   (with stage 3 alone it stayed at the black-image accuracy).
4. Stage 3 (`--steps`): the same recipe on every kind, from stage 2's model.
5. Copies the merged `final/model` folder into `mmalign/assets/vlm-shapes/`.

Stage 3 is stopped early on purpose so RL has room: the shipped model answers many questions but
not all. A killed run resumes from its checkpoint.

Usage: `python scripts/train_vlm_warmstart.py --work-dir /tmp/vlm-work [--seed 0] [--steps N] [--onset-steps N]
[--count-steps N]`.
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


def sft(model: Path, out: Path, seed: int, steps: int | None, extra: list[str], threads: int = 1) -> Path:
    """`configs/vlm/sft.yaml` on `model` into `out` through the CLI; returns `out`."""
    command = [
        sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / "vlm" / "sft.yaml"),
        f"model.path={model}", f"seed={seed}", f"output_dir={out}", f"train.threads={threads}",
        *([f"train.max_steps={steps}"] if steps else []), *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600, help="stage 3 steps on every kind")
    parser.add_argument("--onset-steps", type=int, default=400, help="stage 1 steps on `largest` questions")
    parser.add_argument("--count-steps", type=int, default=800, help="stage 2 steps on `largest` and `count`")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    init = args.work_dir / "init"
    if not (init / "model.safetensors").is_file():
        build_tiny_vlm("qwen2-vl", init, corpus=corpus(), size=WARMSTART_SIZE, seed=args.seed)
    onset = sft(
        init,
        args.work_dir / f"onset-seed{args.seed}",
        args.seed,
        args.onset_steps,
        [
            "data.embedded.kinds=[largest]",
            "data.embedded.eval_kinds=[largest]",
            "data.embedded.eval_per_kind=50",
            "train.checkpoint_every=200",
            "eval.every=0",
        ],
        args.threads,
    )
    count = sft(onset / "final" / "model", args.work_dir / f"count-seed{args.seed}", args.seed, args.count_steps,
                ["data.embedded.kinds=[largest,count]", "data.embedded.eval_kinds=[count,largest]",
                 "train.checkpoint_every=200", "eval.every=200"], args.threads)  # fmt: skip
    run = sft(
        count / "final" / "model",
        args.work_dir / f"sft-seed{args.seed}",
        args.seed,
        args.steps,
        ["train.checkpoint_every=200", "eval.every=200"],
        args.threads,
    )
    tmp = ASSET.with_name(f".tmp-{ASSET.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run / "final" / "model", tmp)
    shutil.rmtree(ASSET, ignore_errors=True)
    tmp.rename(ASSET)
    report = json.loads((run / "report.json").read_text())
    print(
        json.dumps(
            {
                "shipped": str(ASSET),
                "before": report["before"],
                "after": report["after"],
                "metrics": report["metrics"]["after"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
