"""Start-up cost of the listing commands of the CLI against importing torch, measured in one run.

    python benchmarks/cli_startup.py [--rounds 10]

Times, as fresh processes, `mmalign methods`, `mmalign --help`, `mmalign train --help` and
`mmalign score --help` (each `python -m mmalign.cli …`) and `python -c "import torch"`, the arms
interleaved A B C D E, A B C D E, … so drift hits every arm alike, after one untimed warm-up round.
Prints, per arm, the median wall time with its min–max over the rounds, and the median over rounds of
its time ÷ that round's `import torch` time with the min–max of that ratio (target for `mmalign
methods`: ≤ 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "import torch"
ARMS = {
    "mmalign methods": [sys.executable, "-m", "mmalign.cli", "methods"],
    "mmalign --help": [sys.executable, "-m", "mmalign.cli", "--help"],
    "mmalign train --help": [sys.executable, "-m", "mmalign.cli", "train", "--help"],
    "mmalign score --help": [sys.executable, "-m", "mmalign.cli", "score", "--help"],
    BASELINE: [sys.executable, "-c", "import torch"],
}


def wall_time(cmd: list[str]) -> float:
    """Seconds from start to exit of `cmd` (output discarded); fails if it fails."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def spread(values: list[float], digits: int) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each runs every arm once)")
    args = parser.parse_args()
    for cmd in ARMS.values():  # warm-up: the file cache holds every module afterwards
        wall_time(cmd)
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for _ in range(args.rounds):
        for name, cmd in ARMS.items():
            times[name].append(wall_time(cmd))
    result = {}
    for name, values in times.items():
        ratios = [t / base for t, base in zip(values, times[BASELINE])]
        result[name] = {"seconds": spread(values, 3), f"ratio to {BASELINE}": spread(ratios, 3)}
    print(json.dumps({"rounds": args.rounds, "python": sys.version.split()[0], "arms": result}, indent=2))
    print(f"\n| command | wall s, median (min–max) | ÷ `{BASELINE}`, median (min–max) |\n|---|---|---|")
    for name, r in result.items():
        s, q = r["seconds"], r[f"ratio to {BASELINE}"]
        print(f"| `{name}` | {s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) "
              f"| {q['median']:.3f} ({q['min']:.3f}–{q['max']:.3f}) |")  # fmt: skip
    methods = result["mmalign methods"][f"ratio to {BASELINE}"]["median"]
    print(f"\n`mmalign methods` ÷ `{BASELINE}`: {methods} (target ≤ 2)")


if __name__ == "__main__":
    main()
