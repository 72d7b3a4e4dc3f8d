"""Train the RewardCS shipped as `embedded:mesh-reward-cs` (the default reward of `configs/mesh/guided.yaml`).

Runs the recipe `configs/mesh/reward_cs.yaml` (embedded mesh world, seeded) through the normal
CLI path, then copies its `final/reward` folder into `mmalign/assets/mesh-reward-cs/`. The
reward folder's manifest carries the held-out metrics it was measured with; the run's own
`report.md` stays in `--work-dir`. A finished run in `--work-dir` is reused (the trainer skips
it), so a killed run resumes at its last checkpoint.

Usage: `python scripts/train_mesh_reward.py --work-dir /tmp/mesh-reward-work [--seed 0]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "mmalign" / "assets" / "mesh-reward-cs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = args.work_dir / f"reward_cs-seed{args.seed}"
    command = [
        sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / "mesh" / "reward_cs.yaml"),
        f"seed={args.seed}", f"output_dir={run}",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    reward = run / "final" / "reward"
    tmp = ASSET.with_name(f".tmp-{ASSET.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(reward, tmp)
    shutil.rmtree(ASSET, ignore_errors=True)
    tmp.rename(ASSET)
    metrics = json.loads((ASSET / "mmalign_reward.json").read_text())["metrics"]
    print(json.dumps({"shipped": str(ASSET), **metrics}, indent=2))


if __name__ == "__main__":
    main()
