"""Where a Flow-GRPO step spends its time, and what a short training window saves, measured in one run.

    python benchmarks/flow_grpo_step.py [--model embedded:shapes-t2i-flow] [--prompts 2] [--rounds 5] [OVERRIDES]

For each arm, a step of `configs/image/flow_grpo.yaml` (`train.batch_size` prompts × `group_size`
samples) is split into:
- rollout: sampling the trajectories (`generate`);
- reward: decoding the samples and scoring them (the toy CLIP by default);
- update: the loss over the window's steps, backward and the optimizer step.

Arms: `window: all` (Flow-GRPO) and `window: random` with `window_size: 2` (Flow-GRPO-Fast), run
alternately A B A B over `--rounds` rounds after one warm-up round each. Prints, as JSON, the median
and spread (min–max) of each part's seconds per arm, and the speed-up of the short window on the
update and on the whole step (all ÷ short, median over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmalign.losses import reward_advantages  # noqa: E402
from mmalign.train.diffusion_rl import RolloutBatch  # noqa: E402

ARMS = {"all": ["flow_grpo.window=all"], "short": ["flow_grpo.window=random", "flow_grpo.window_size=2"]}


def build(model: str, prompts: int, overrides: list[str]):
    from mmalign.config import load_config
    from mmalign.registry import METHODS, load

    run = load_config(
        ROOT / "configs/image/flow_grpo.yaml",
        [f"model={model}", f"train.batch_size={prompts}", "eval.num_prompts=1", "eval.monitor.action=off", *overrides],
    )
    method = load(METHODS, "method", run.method)(run)
    method.setup(Accelerator(cpu=not torch.cuda.is_available()))
    method.set_trainable_module(method.trainable_module())
    return method


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_step(method, optimizer, step: int) -> dict[str, float]:
    """Seconds of one step's rollout, reward and update."""
    c = method.config
    method._rollout_index = step
    prompts = [p for p in method.rollouts.prompts(step, 0) for _ in range(c.group_size)]
    times = {}
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        latents, trajectory = method.generate(prompts)
    sync()
    times["rollout"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        scores, weights = method.score(method.model.decode_latents(latents), prompts)
    sync()
    times["reward"] = time.perf_counter() - start
    advantages = reward_advantages(scores, weights, c.group_size).to(method.device)
    batch = RolloutBatch(prompts, latents, advantages, step, trajectory)
    start = time.perf_counter()
    loss, _ = method.compute_loss(batch, step, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    times["update"] = time.perf_counter() - start
    times["step"] = times["rollout"] + times["reward"] + times["update"]
    return times


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:shapes-t2i-flow")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (each × group_size samples)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides for both arms, e.g. flow_grpo.kernel=ddim")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = {name: build(args.model, args.prompts, [*args.overrides, *arm]) for name, arm in ARMS.items()}
    optimizers = {n: torch.optim.AdamW(m.model.trainable_parameters(), lr=1e-5) for n, m in methods.items()}
    records: dict[str, list[dict[str, float]]] = {name: [] for name in ARMS}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, method in methods.items():
            times = timed_step(method, optimizers[name], round_index)
            if round_index:
                records[name].append(times)
    parts = ("rollout", "reward", "update", "step")
    out = {
        "model": args.model,
        "samples_per_step": args.prompts * methods["all"].config.group_size,
        "sampling_steps": methods["all"].config.num_steps,
        "rounds": args.rounds,
        "seconds": {n: {p: summary([r[p] for r in recs]) for p in parts} for n, recs in records.items()},
        "short_window_speedup": {
            p: round(statistics.median(a[p] / b[p] for a, b in zip(records["all"], records["short"])), 3)
            for p in ("update", "step")
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
