"""Label ceiling of DenseDPO: retrain a finished run on its own pairs relabelled by the gold metric.

    python benchmarks/densedpo_gold_ceiling.py RUN_DIR [RUN_DIR ...] [--tie-margin 0.005]

A diagnostic, not a recipe: it gives the balls world's physics gold metric the labeller's job (one
label per segment, `sign(gold₀ − gold₁)`, ties within `--tie-margin` or where a segment has no
score), which no training objective may do, to ask whether better labels could help. For each
finished `densedpo` run it writes the relabelled pairs (same videos and latents) to
`RUN_DIR-gold-labels/pairs`, trains the run's own config on them (`densedpo.pairs_dir`) into
`RUN_DIR-gold-labels`, and prints the gold before and after for the run and for its ceiling, and how
often the run's labeller agreed with the gold on the segments both labelled.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mmalign.data import balls_world
from mmalign.data.video import read_video
from mmalign.io import atomic_directory
from mmalign.video.labels import margin_labels

PAIRS_FILE = "pairs.jsonl"


def gold_labels(folder: Path, row: dict, tie_margin: float) -> list[int]:
    """Per-segment labels of one stored pair by the physics gold metric (ties as the labellers make them)."""
    golds = [balls_world.physics_checks(read_video(folder / row[k]).frames, row["fps"], row["segment_len_s"])
             for k in ("video_0", "video_1")]  # fmt: skip
    scores = [torch.tensor(gold["segments"]) for gold in golds]
    return margin_labels(*scores, tie_margin).tolist()


def relabel(source: Path, target: Path, tie_margin: float) -> tuple[list[int], dict[str, float]]:
    """Copy the pairs folder `source` to `target` with gold labels; returns the counts of −1, 0, +1 and
    the run labeller's agreement with the gold on the segments both label (not ties)."""
    rows = [json.loads(line) for line in (source / PAIRS_FILE).read_text().splitlines() if line.strip()]
    counts, agree, both = [0, 0, 0], 0, 0
    for row in rows:
        gold = gold_labels(source, row, tie_margin)
        for label, ours in zip(gold, row["seg_labels"]):
            counts[label + 1] += 1
            if label and ours:
                both, agree = both + 1, agree + (label == ours)
        row["seg_labels"], row["label_source"] = gold, "balls-physics (diagnostic)"
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        (tmp / PAIRS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return counts, {"agreement": agree / max(both, 1), "segments": both}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished densedpo run folders")
    parser.add_argument("--tie-margin", type=float, default=0.005)
    args = parser.parse_args()
    results = {}
    for run in args.runs:
        ceiling = run.with_name(run.name + "-gold-labels")
        counts, agreement = relabel(run / "pairs", ceiling / "pairs", args.tie_margin)
        command = [sys.executable, "-m", "mmalign.cli", "train", str(run / "config.yaml"),
                   f"output_dir={ceiling}", f"densedpo.pairs_dir={ceiling / 'pairs'}"]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        reports = [json.loads((r / "report.json").read_text()) for r in (run, ceiling)]
        results[str(run)] = {"labels_-1_0_+1": counts, "labeller_vs_gold": agreement,
                             "run": [reports[0]["before"], reports[0]["after"]],
                             "gold_labels": [reports[1]["before"], reports[1]["after"]]}  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
