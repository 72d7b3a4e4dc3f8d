"""VLM RL from the shipped warm start: GRPO vs PAPO, and listener-shaped vs plain GRPO, over seeds.

    python benchmarks/vlm_rl.py [--arms grpo papo listener plain] [--seeds 0 1 2] [--steps 100]
                                [--parallel 2] [override ...]

Arms: `grpo` and `papo` run `configs/vlm/grpo.yaml` / `papo.yaml` as shipped (all question kinds);
`listener` runs `configs/vlm/listener_grpo.yaml` and `plain` the same recipe with
`listener_grpo.listener_weight=0` (accuracy + format only) on the image-preference task. Each run
evaluates greedy held-out accuracy per kind, with real and with all-black images, before and after.
Prints one JSON object: per arm and seed the before/after metrics, then the mean ± sd over seeds of
each after − before difference. Runs go `--parallel` at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "grpo": ("vlm/grpo.yaml", []),
    "papo": ("vlm/papo.yaml", []),
    "listener": ("vlm/listener_grpo.yaml", []),
    "plain": ("vlm/listener_grpo.yaml", ["listener_grpo.listener_weight=0"]),
}


def run(arm: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    recipe, extra = ARMS[arm]
    out = work / f"{arm}-seed{seed}"
    command = [sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / recipe), f"output_dir={out}",
               f"seed={seed}", f"train.max_steps={args.steps}", "eval.every=0", "train.checkpoint_every=0",
               "train.threads=1", *extra, *args.overrides]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    return {
        "before": report["metrics"]["before"],
        "after": report["metrics"]["after"],
        "train": {k: report["train"][k] for k in report["train"] if not k.startswith("lr")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(lambda job: run(*job, args, Path(tmp)), jobs)))
    summary: dict[str, dict[str, str]] = {}
    for arm in args.arms:
        runs = [results[(arm, s)] for s in args.seeds]
        keys = sorted(set.intersection(*(set(r["after"]) & set(r["before"]) for r in runs)))
        summary[arm] = {}
        for key in keys:
            gains = [r["after"][key] - r["before"][key] for r in runs]
            sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
            before = statistics.fmean(r["before"][key] for r in runs)
            after = statistics.fmean(r["after"][key] for r in runs)
            summary[arm][key] = f"{before:.3f} → {after:.3f} ({statistics.fmean(gains):+.3f} ± {sd:.3f})"
    print(json.dumps({"runs": {f"{a}-seed{s}": r for (a, s), r in results.items()}, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
