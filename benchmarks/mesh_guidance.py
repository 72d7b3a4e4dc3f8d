"""Reward-guided mesh optimisation against its regularisers alone, on held-out prompts of the mesh world.

    python benchmarks/mesh_guidance.py [--seeds 0 1 2] [--rewards DIR ...] [--steps 200]
                                       [--threads 2] [--set key=value ...]

Per seed, runs `configs/mesh/guided.yaml` twice on the same templates (`templates.seed` = the
seed): as shipped (the recipe's rewards unless `--rewards`, weight α 0.3 → 0.6) and with α = 0
(Laplacian, edge-length, normal and anchor terms only). Reports, before and after, the gold quality
score and its geometry / prompt-match parts (no objective reads them) and the reward as it scores the
mesh files, then means ± sd over seeds. `--set key=value …` overrides the recipe for both arms (the
baseline keeps α = 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METRICS = ("heldout_gold", "gold_geometry", "gold_match", "reward")


def run_arm(seed: int, guided: bool, args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    import mmalign

    overrides = [
        f"output_dir={work / ('guided' if guided else 'regularisers') / f'seed{seed}'}",
        f"seed={seed}", f"mesh_guided.templates.seed={seed}",
        *([f"mesh_guided.rewards=[{','.join(args.rewards)}]"] if args.rewards else []),
        f"train.max_steps={args.steps}", f"train.threads={args.threads}", "eval.every=0", "train.checkpoint_every=0",
        *args.overrides,
        *([] if guided else ["mesh_guided.alpha_min=0", "mesh_guided.alpha_max=0"]),  # after: overrides keep α = 0
    ]  # fmt: skip
    report = mmalign.train(ROOT / "configs/mesh/guided.yaml", *overrides)
    return {when: {k: report["metrics"][when][k] for k in METRICS} for when in ("before", "after")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rewards", nargs="+", default=None, help="reward folders (several: an ensemble); default: the recipe's"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for both arms",
    )
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mesh-guidance-"))
    rows = []
    for seed in args.seeds:
        guided, baseline = run_arm(seed, True, args, work), run_arm(seed, False, args, work)
        rows.append({"seed": seed, "before": guided["before"], "guided": guided["after"]})
        rows[-1]["regularisers"] = baseline["after"]
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| arm | {' | '.join(METRICS)} |\n|---|{'---|' * len(METRICS)}")
    for arm in ("before", "regularisers", "guided"):
        cells = []
        for metric in METRICS:
            values = [r[arm][metric] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {sd:.3f}")
        print(f"| {arm} | {' | '.join(cells)} |")
    print(f"\n{len(rows)} seeds; runs in {work}")


if __name__ == "__main__":
    main()
