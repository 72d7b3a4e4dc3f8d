"""Train the RewardCS shipped as `embedded:mesh-reward-cs` and its rounds `embedded:mesh-reward-cs-round{0,1,2}`.

Runs the recipe `configs/mesh/reward_cs_rounds.yaml` (RewardCS on the embedded mesh world, then
three rounds of its own guided meshes as rated negatives; seeded) through the normal CLI path,
then copies its `final/reward` folder into `mmalign/assets/mesh-reward-cs/` and each earlier round's
reward into `mmalign/assets/mesh-reward-cs-round<k>/` (`configs/mesh/guided.yaml` guides with the
minimum of all four). Each reward folder's manifest carries the held-out metrics it was measured
with; the run's own `report.md` stays in `--work-dir`. Finished stages in `--work-dir` are reused,
so a killed run resumes where it stopped.

Usage: `python scripts/train_mesh_reward.py --work-dir /tmp/mesh-reward-work [--seed 0]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from mmalign.io import atomic_directory

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "mmalign" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = args.work_dir / f"reward_cs_rounds-seed{args.seed}"
    command = [
        sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / "mesh" / "reward_cs_rounds.yaml"),
        f"seed={args.seed}", f"output_dir={run}",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    rounds = json.loads((run / "report.json").read_text())["rounds"]
    shipped = {ASSETS / "mesh-reward-cs": run / "final" / "reward"}
    shipped.update({ASSETS / f"mesh-reward-cs-round{k}": run / f"round-{k}" / "reward" / "final" / "reward"
                    for k in range(len(rounds))})  # fmt: skip
    for asset, reward in shipped.items():
        with atomic_directory(asset) as tmp:
            shutil.copytree(reward, tmp, dirs_exist_ok=True)
        metrics = json.loads((asset / "mmalign_reward.json").read_text())["metrics"]
        print(json.dumps({"shipped": str(asset), **metrics}, indent=2))


if __name__ == "__main__":
    main()
