"""GRPO step time: mmalign's GRPO vs TRL's `GRPOTrainer` on the same tiny VLM, and PAPO ÷ GRPO.

    pip install trl==1.16.0      # not a dependency of mmalign; only this benchmark needs it
    python benchmarks/grpo_step.py [--model embedded:vlm-shapes] [--prompts 4] [--group 8] [--tokens 40]
                                   [--steps 20] [--warmup 3] [--threads 1]

All three arms use the same policy (full fine-tuning), the same prompts of the embedded VLM
world's training stream, `prompts × group` completions per optimizer step at temperature 1.0,
at most `tokens` new tokens, β = 0, one optimizer step per rollout, the accuracy reward, one
thread. A step is everything an optimizer step costs: sampling, rewards, log-prob forwards,
backward and AdamW. mmalign's arms call the method's `next_batch` + `compute_loss` + backward +
step directly; TRL's time is `trainer.train()` over `steps` minus a `warmup`-step run (setup and
the first steps excluded in both). Ratios are taken within this one run; completion lengths are
reported because sampled lengths drive the cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _CPU:
    device, num_processes, process_index = torch.device("cpu"), 1, 0


def time_mmalign(method_name: str, args: argparse.Namespace, work: Path) -> dict[str, float]:
    from mmalign.config import load_config
    from mmalign.registry import METHODS, load

    section = method_name
    run = load_config(
        ROOT / f"configs/vlm/{method_name}.yaml",
        [
            f"model.path={args.model}",
            f"output_dir={work / method_name}",
            f"train.batch_size={args.prompts}",
            f"{section}.num_generations={args.group}",
            f"{section}.max_new_tokens={args.tokens}",
            f"{section}.temperature=1.0",
            "data.embedded.kinds=[count,largest,arith]",
            f"{section}.rewards=[{{name: accuracy, weight: 1.0}}]",
        ],
    )
    method = load(METHODS, "method", run.method)(run)
    method.setup(_CPU())
    params = [p for p in method.trainable_module().parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times, lengths = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        batch = method.next_batch(step, 0)
        loss, metrics = method.compute_loss(batch, step, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            lengths.append(float(metrics["completion_length"]))
    return {"step_s": statistics.fmean(times), "step_sd": statistics.stdev(times), "length": statistics.fmean(lengths)}


def time_trl(args: argparse.Namespace, work: Path) -> dict[str, float]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from mmalign.models.vlm import VisionLanguageModel
    from mmalign.registry import resolve_model_path
    from mmalign.vlm import world
    from mmalign.vlm.rewards import accuracy_reward

    path = resolve_model_path(args.model)
    processor = VisionLanguageModel.from_pretrained(path).processor
    rows = []
    for i in range(args.prompts * (args.steps + args.warmup) * 2):
        q = world.mixed_stream(["count", "largest", "arith"], 1000, i)
        conversation = q.conversation()
        rows.append({"prompt": conversation.messages, "image": conversation.images[0], "answer": q.answer})
    dataset = Dataset.from_list(rows)
    lengths: list[float] = []

    def reward(completions, answer, **kwargs):
        texts = [c[0]["content"] for c in completions]
        lengths.append(statistics.fmean(len(ids) for ids in kwargs["completion_ids"]))
        return accuracy_reward(texts, answer)

    def run(steps: int) -> float:
        config = GRPOConfig(
            output_dir=str(work / f"trl-{steps}"),
            per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group,
            max_completion_length=args.tokens,
            max_steps=steps,
            beta=0.0,
            temperature=1.0,
            learning_rate=1e-5,
            use_vllm=False,
            use_cpu=True,
            bf16=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=path, reward_funcs=[reward], args=config, train_dataset=dataset, processing_class=processor
        )
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    warm = run(args.warmup)
    lengths.clear()
    total = run(args.warmup + args.steps)
    return {"step_s": (total - warm) / args.steps, "length": statistics.fmean(lengths[args.warmup :])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:vlm-shapes")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {
            "grpo": time_mmalign("grpo", args, work),
            "papo": time_mmalign("papo", args, work),
            "trl_grpo": time_trl(args, work),
        }
    results["ratios"] = {
        "mmalign_grpo_over_trl": results["grpo"]["step_s"] / results["trl_grpo"]["step_s"],
        "papo_over_grpo": results["papo"]["step_s"] / results["grpo"]["step_s"],
    }
    print(json.dumps({"settings": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
