"""Train the mesh rewards shipped in the wheel, through the normal CLI path (seeded).

- `--asset rounds`: `embedded:mesh-reward-cs` and its rounds `embedded:mesh-reward-cs-round{0,1,2}`.
  Runs `configs/mesh/reward_cs_rounds.yaml` (RewardCS on the embedded mesh world, then three rounds
  of its own guided meshes as rated negatives), then copies its `final/reward` folder into
  `mmalign/assets/mesh-reward-cs/` and each earlier round's reward into
  `mmalign/assets/mesh-reward-cs-round<k>/`. About 33 min.
- `--asset contact`: `embedded:mesh-reward-cs-contact`, `configs/mesh/reward_cs.yaml` with part
  contact (`encoder.part_contact`) on a mesh set that also holds floating parts and parts just off
  contact (`meshes.embedded.floating_per_prompt=3`, `displaced_per_prompt=4`): the reward for guidance
  that moves parts (`configs/mesh/guided.yaml`). About 2 min.

Each reward folder's manifest carries the held-out metrics it was measured with; the run's own
`report.md` stays in `--work-dir`. Finished stages in `--work-dir` are reused, so a killed run
resumes where it stopped.

Usage: `python scripts/train_mesh_reward.py --work-dir /tmp/mesh-reward-work [--asset rounds|contact] [--seed 0]`.
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


CONTACT_OVERRIDES = [
    "reward_cs.meshes.embedded.floating_per_prompt=3",
    "reward_cs.meshes.embedded.displaced_per_prompt=4",
    "reward_cs.encoder.part_contact=true",
]


def train(config: str, run: Path, seed: int, overrides: list[str]) -> None:
    command = [
        sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / "mesh" / config),
        f"seed={seed}", f"output_dir={run}", "train.threads=1", *overrides,
    ]  # fmt: skip
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--asset", choices=["rounds", "contact"], default="rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.asset == "contact":
        run = args.work_dir / f"reward_cs_contact-seed{args.seed}"
        train("reward_cs.yaml", run, args.seed, CONTACT_OVERRIDES)
        shipped = {ASSETS / "mesh-reward-cs-contact": run / "final" / "reward"}
    else:
        run = args.work_dir / f"reward_cs_rounds-seed{args.seed}"
        train("reward_cs_rounds.yaml", run, args.seed, [])
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
