"""SmPO against Diffusion-DPO at equal training compute on the embedded shapes world.

    python benchmarks/smpo_vs_dpo.py [--seeds 0 1 2] [--dpo-steps 300] [--smpo-steps 120] [--out DIR]

Both recipes (`configs/image/diffusion_dpo.yaml`, `configs/image/smpo.yaml`) train on the same
preference pairs from the same model, DPO for `--dpo-steps` and SmPO for `--smpo-steps` optimizer
steps per seed (an SmPO step also runs the inversion, so fewer steps cost about the same), each
evaluating the held-out gold metric `--evals` times along the way. Compute is the wall time spent in training steps
(evaluations excluded), measured in this run. Printed per seed and as mean ± sd:

- DPO's final gold metric and its compute;
- SmPO's gold metric at DPO's final compute (linear interpolation between evaluations);
- the compute SmPO needs to first reach DPO's final value, as a fraction of DPO's compute
  (the paper claims ≈ 1/5 for SD1.5; `nan` when SmPO never reaches it).

Results are also written to `DIR/smpo_vs_dpo.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def curve(report: dict) -> list[tuple[float, float]]:
    """`[(train_seconds, gold)]` of a run's evaluations."""
    gold = report["gold_metric"]
    return [(e["train_seconds"], e["metrics"][gold]) for e in report["evaluations"]]


def value_at(points: list[tuple[float, float]], seconds: float) -> float:
    """The curve linearly interpolated at `seconds` (its last value beyond its end)."""
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= seconds <= s1:
            return v0 + (v1 - v0) * (seconds - s0) / max(s1 - s0, 1e-9)
    return points[-1][1]


def seconds_to_reach(points: list[tuple[float, float]], target: float) -> float:
    """Compute at which the curve first reaches `target` (interpolated); nan if never."""
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v1 >= target:
            return s0 if v0 >= target else s0 + (s1 - s0) * (target - v0) / (v1 - v0)
    return math.nan


def compare(dpo: dict, smpo: dict) -> dict[str, float]:
    dpo_curve, smpo_curve = curve(dpo), curve(smpo)
    dpo_seconds, dpo_final = dpo_curve[-1]
    return {
        "dpo_before": dpo_curve[0][1],
        "dpo_final": dpo_final,
        "dpo_seconds": dpo_seconds,
        "smpo_at_dpo_compute": value_at(smpo_curve, dpo_seconds),
        "smpo_final": smpo_curve[-1][1],
        "smpo_seconds": smpo_curve[-1][0],
        "smpo_compute_to_dpo_final": seconds_to_reach(smpo_curve, dpo_final) / dpo_seconds,
    }


def summarise(values: list[float]) -> dict[str, float]:
    """Mean and sd over the seeds where the value exists (`nan`: SmPO never reached DPO's value), and how many."""
    found = [v for v in values if not math.isnan(v)]
    if not found:
        return {"mean": math.nan, "sd": math.nan, "seeds": 0}
    return {"mean": statistics.fmean(found), "sd": statistics.pstdev(found), "seeds": len(found)}


def main() -> None:
    import mmalign

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dpo-steps", type=int, default=300)
    parser.add_argument("--smpo-steps", type=int, default=120)
    parser.add_argument("--evals", type=int, default=3, help="evaluations per run after the one at step 0")
    parser.add_argument("--out", type=Path, default=None, help="run directories and the JSON summary")
    parser.add_argument("overrides", nargs="*", help="extra overrides for both recipes, e.g. model=...")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="smpo-vs-dpo-"))

    rows = []
    for seed in args.seeds:
        reports = {}
        for name, steps in (("diffusion_dpo", args.dpo_steps), ("smpo", args.smpo_steps)):
            reports[name] = mmalign.train(
                ROOT / "configs" / "image" / f"{name}.yaml",
                f"output_dir={out / f'{name}-seed{seed}'}",
                f"seed={seed}",
                f"train.max_steps={steps}",
                f"eval.every={max(steps // args.evals, 1)}",
                f"train.checkpoint_every={steps}",
                *args.overrides,
            )
        rows.append({"seed": seed, **compare(reports["diffusion_dpo"], reports["smpo"])})
        print(json.dumps(rows[-1]), flush=True)

    keys = [k for k in rows[0] if k != "seed"]
    summary = {k: summarise([r[k] for r in rows]) for k in keys}
    (out / "smpo_vs_dpo.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(out)}, "seeds": rows, "summary": summary}, indent=2)
    )
    steps = f"DPO {args.dpo_steps} / SmPO {args.smpo_steps} steps"
    print(f"\n| quantity | mean | sd | seeds |   ({len(rows)} seeds, {steps}; results in {out})")
    print("|---|---|---|---|")
    for k in keys:
        print(f"| {k} | {summary[k]['mean']:.4f} | {summary[k]['sd']:.4f} | {summary[k]['seeds']} |")


if __name__ == "__main__":
    main()
