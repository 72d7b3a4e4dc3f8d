"""How a mesh reward scores parts moved off contact: reward against the gap between two parts.

    python benchmarks/mesh_contact_profile.py [--rewards embedded:mesh-reward-cs-contact ...] [--meshes 4]

For each held-out composition of the mesh world, `--meshes` clean meshes (seeds 0, 1, …) are put in
the unit box and their parts moved (`world.parts_at_gap`) so that the gap between them is each of
`GAPS` (unit box; < 0: pushed into each other): for `on` prompts the upper part's bottom above the
lower part's top, for `next to` the gap between their boxes along the axis they stand side by side on.
Prints, per reward and prompt, the mean reward at every gap. The gold judge accepts a gap within
±0.03 on `on` (≥ −0.03 beside), so a reward that places parts should peak inside that band and fall
off on both sides of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GAPS = (-0.12, -0.08, -0.05, -0.03, -0.015, 0.0, 0.015, 0.03, 0.05, 0.08, 0.12)


def main() -> None:
    from mmalign.mesh import world
    from mmalign.mesh.io import normalise_to_unit_box
    from mmalign.rewards import load_reward

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewards", nargs="+", default=["embedded:mesh-reward-cs-contact"])
    parser.add_argument("--meshes", type=int, default=4)
    args = parser.parse_args()
    prompts = [p for p in world.prompts("heldout") if len(world.parse_prompt(p).parts) == 2]
    print(f"| reward | prompt | {' | '.join(f'{g:+.3f}' for g in GAPS)} |\n|---|---|{'---|' * len(GAPS)}")
    for name in args.rewards:
        reward = load_reward("reward-cs", path=name)
        for prompt in prompts:
            relation = world.parse_prompt(prompt).relation
            rngs = [np.random.default_rng(s) for s in range(args.meshes)]
            clean = [normalise_to_unit_box(world.good_mesh(prompt, rng)) for rng in rngs]
            moved = [[world.parts_at_gap(m, relation, g) for g in GAPS] for m in clean]
            scores = np.array([reward(meshes, prompt, progress=False) for meshes in moved])
            print(f"| {name} | {prompt} | {' | '.join(f'{v:.2f}' for v in scores.mean(axis=0))} |")


if __name__ == "__main__":
    main()
