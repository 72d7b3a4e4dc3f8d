"""Convert a pickled reward checkpoint to safetensors, once, without running code from it.

    python scripts/convert_reward_weights.py HPS_v2.1_compressed.pt [more.pt ...] [--out DIR]

Reads each file with `torch.load(weights_only=True)` (a pickle holding anything but tensors and
plain containers is refused), takes the nested `state_dict` when there is one (HPSv2's releases),
and writes `<stem>.safetensors` next to it (or into `--out`). The rewards read that file by default:
`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt` (hpsv2, hpsv2.1), `ImageReward.pt` (imagereward),
`sac+logos+ava1-l14-linearMSE.pth` (aesthetic).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def convert(source: Path, out_dir: Path | None = None) -> Path:
    """Write `source`'s tensors as `<stem>.safetensors`; returns the new file."""
    from mmalign.models.weights import read_state_dict

    state = read_state_dict(source, allow_pickle=True, key="state_dict")
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    skipped = sorted(set(state) - set(tensors))
    if skipped:
        print(f"{source}: skipping non-tensor entries {', '.join(skipped[:5])}", file=sys.stderr)
    target = (out_dir or source.parent) / f"{source.stem}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="pickled .pt / .pth / .bin checkpoints")
    parser.add_argument("--out", type=Path, default=None, help="folder for the .safetensors files (default: beside)")
    args = parser.parse_args(argv)
    for file in args.files:
        print(convert(file, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
