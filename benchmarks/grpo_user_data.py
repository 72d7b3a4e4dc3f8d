"""GRPO on a question set in a user's layout: does the recipe learn from data it reads like a user's?

Writes a folder of `train.jsonl` / `test.jsonl` (columns `images` (paths), `problem`, `answer`) with
PNG files, drawn from the embedded VLM world (kinds count, largest, leftof, arith; train and test
from different streams), then runs `configs/vlm/grpo.yaml data=<folder> data.eval_split=test` from
the CLI and prints the held-out reward and accuracy before and after.

    python benchmarks/grpo_user_data.py --work-dir /tmp/grpo-user [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["count", "largest", "leftof", "arith"]


def write_split(root: Path, split: str, stream_seed: int, rows: int) -> None:
    from mmalign.vlm import world

    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        question = world.mixed_stream(KINDS, stream_seed, i)
        paths = []
        for j, image in enumerate(question.images):
            paths.append(f"img/{split}_{i}_{j}.png")
            Image.fromarray(image).save(root / paths[-1])
        lines.append(json.dumps({"images": paths, "problem": question.text, "answer": question.answer}))
    (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-rows", type=int, default=800)
    parser.add_argument("--test-rows", type=int, default=200)
    args = parser.parse_args()
    data = args.work_dir / "questions"
    if not (data / "test.jsonl").is_file():
        write_split(data, "train", 5000, args.train_rows)
        write_split(data, "test", 6000, args.test_rows)
    for seed in args.seeds:
        out = args.work_dir / f"grpo-seed{seed}"
        recipe = str(ROOT / "configs/vlm/grpo.yaml")
        command = [sys.executable, "-m", "mmalign.cli", "train", recipe, f"data={data}", "data.eval_split=test",
                   f"data.eval_size={args.test_rows}", f"seed={seed}", f"output_dir={out}"]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        report = json.loads((out / "report.json").read_text())
        before, after = report["metrics"]["before"], report["metrics"]["after"]
        print(
            f"seed {seed}: heldout_reward {before['heldout_reward']:.3f} -> {after['heldout_reward']:.3f}, "
            f"accuracy {before['heldout/accuracy']:.3f} -> {after['heldout/accuracy']:.3f} "
            f"({report['data']['eval']['rows']} held-out rows)"
        )


if __name__ == "__main__":
    main()
