"""The shipped recipes, run from the CLI in the background while the rest of the suite runs.

`conftest.py` starts them as the test loop begins (only if a test of this folder is selected) and
runs this folder's tests last, so the CPU work of the other tests and of the recipes overlaps. Each
recipe process runs one thread (more threads than cores make OpenMP spin) at the lowest priority: the
other tests run mostly on one core and wait on the processes they launch, so the recipes fill the
cores they leave idle without slowing them; the test process is left as it is.

DiffusionNFT (online RL, on the image and the video model) trains on its own rollouts and starts
with SmPO and GAN-RM.
The DPO and SmPO recipes share the embedded preference pairs: the DPO run generates them into the
session's cache (`$MMALIGN_CACHE`, as a user's first run would), the critical path of the whole
suite, so SmPO and GAN-RM start only once the pairs are there. The GAN-RM recipe runs both rounds at
a smaller scale (fewer renders, prompts and steps) to fit the suite's time budget; its full-scale
gold-metric gain is measured in docs/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GAN_RM_SMALL = [  # the shipped GAN-RM recipe, scaled down; everything else as shipped
    "gan_rm.num_targets=80",
    "gan_rm.raw_negatives=80",
    "gan_rm.num_prompts=48",
    "train.max_steps=20",
    "eval.num_prompts=32",
    "eval.num_steps=10",
    "eval.rewards=[]",
]
DPO_STEPS = 100  # a third of the shipped 300: the held-out gain peaks by step 100 (benchmarks/smpo_vs_dpo.py);
# the DPO run is the suite's critical path (100 steps here: +0.052 gold, clip-score up)
SMPO_STEPS = 40  # half the shipped 80: measured +0.034 held-out gold at step 40, +0.032 at 80 (eval.every=40)
NFT_STEPS = 10  # a third of the shipped 30: held-out gold +0.047 at step 10 (docs/results/online.md)
NFT_EVAL = 32  # held-out prompts evaluated, of the shipped 64: +0.083 at step 10 on these 32, a third less CPU
VIDEO_NFT_STEPS = 20  # two thirds of the shipped 30: held-out physics gold +0.026 ± 0.006 at step 20 over 3 seeds
RECIPES = {  # name: (config, overrides); every run skips intermediate evaluations
    "dpo": ("image/diffusion_dpo.yaml", ["eval.every=0", f"train.max_steps={DPO_STEPS}"]),
    "smpo": ("image/smpo.yaml", ["eval.every=0", f"train.max_steps={SMPO_STEPS}"]),
    "gan_rm": ("image/gan_rm.yaml", GAN_RM_SMALL),
    "nft": (
        "image/diffusion_nft.yaml",
        ["eval.every=0", f"train.max_steps={NFT_STEPS}", "train.checkpoint_every=0", f"eval.num_prompts={NFT_EVAL}"],
    ),
    "video_nft": (
        "video/diffusion_nft.yaml",
        ["eval.every=0", f"train.max_steps={VIDEO_NFT_STEPS}", "train.checkpoint_every=0"],
    ),
}
TIMEOUT = 1800  # seconds any one recipe may take
NICENESS = 19  # the runs take the CPU time the test process leaves, never the test process's own


def shared_pairs_directory() -> Path:
    """The cache folder the DPO recipe fills with the embedded pairs (SmPO's recipe reads the same)."""
    from mmalign.config import load_config
    from mmalign.data.sources import embedded_pairs_directory
    from mmalign.registry import resolve_model_path

    run = load_config(ROOT / "configs/image/diffusion_dpo.yaml", [])
    return embedded_pairs_directory(run.data, resolve_model_path(run.model.path))


class RecipeRuns:
    """Launches the recipes into `root/<name>` and hands out their reports."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: dict[str, subprocess.Popen] = {}
        self._pairs_done = threading.Event()

    def _launch(self, name: str) -> None:
        recipe, overrides = RECIPES[name]
        out = self.root / name
        cmd = [sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / recipe), f"output_dir={out}",
               *overrides]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.root / f"{name}.log", "w") as log:  # a file, not a pipe: nobody reads while it runs
            self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        os.setpriority(os.PRIO_PROCESS, self.processes[name].pid, NICENESS)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._launch("dpo")
        threading.Thread(target=self._start_the_others_after_pairs, daemon=True).start()

    def _start_the_others_after_pairs(self) -> None:
        pairs = shared_pairs_directory() / "pairs.jsonl"  # appears with the folder's atomic rename
        deadline = time.time() + TIMEOUT
        while not pairs.is_file() and self.processes["dpo"].poll() is None and time.time() < deadline:
            time.sleep(1)
        self._launch("smpo")
        self._launch("gan_rm")
        self._launch("nft")  # online: needs no pairs, but waits so as not to slow the DPO run that makes them
        self._launch("video_nft")
        self._pairs_done.set()

    def result(self, name: str) -> tuple[Path, dict]:
        """`(run directory, report.json)` of a finished recipe; fails with the log tail if it failed."""
        if name != "dpo":
            assert self._pairs_done.wait(TIMEOUT), f"{name} never started: the shared pairs never appeared"
        process = self.processes[name]
        process.wait(timeout=TIMEOUT)
        log = self.root / f"{name}.log"
        assert process.returncode == 0, log.read_text()[-4000:]
        return self.root / name, json.loads((self.root / name / "report.json").read_text())

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
