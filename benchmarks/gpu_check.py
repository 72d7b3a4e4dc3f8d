"""One command for a GPU machine: realistic-size models with random weights, a few steps of each recipe
family, throughput and peak memory as JSON.

    python benchmarks/gpu_check.py [--families sd15,sdxl,...] [--recipes dpo-lora,...] [--steps 5] [--out FILE]
    python benchmarks/gpu_check.py --tiny        # the same code on shrunk configs: a minute or two on a CPU
    python benchmarks/gpu_check.py --recipes dpo-full train.optimizer=adamw8bit model.gradient_checkpointing=true

Each family's model is built from the published configs (`mmalign.models.real_configs`: SD1.5 and SDXL
UNets, SD3.5-medium and FLUX.1-dev transformers, Wan2.1 1.3B, Qwen2.5-VL-3B) with random weights, saved
with `save_pretrained` into a temporary folder and loaded through the method's normal path
(`DiffusionModel.from_pretrained`, `VisionLanguageModel.from_pretrained`); nothing is downloaded. Then
each of its recipes runs one warm-up step and `--steps` timed steps through the method's own code
(`compute_loss`, online methods' `next_batch` rollouts, the run's optimizer):

- `dpo-lora` / `sft-lora`: Diffusion-DPO and SFT (on the same 2B images) with LoRA rank 16;
- `dpo-full`: Diffusion-DPO fine-tuning every denoiser weight (reference: a frozen copy);
- `flow-grpo`: Flow-GRPO, rollout (SDE sampling of `group_size` samples per prompt, JPEG-compressibility
  or motion-smoothness reward: no reward model to load) and update;
- `grpo`: GRPO on the VLM, rollout (generation) and update.

On a GPU the frozen weights are bfloat16 and trainable ones float32 under autocast (`model.dtype`); the
resolution is 512 px (video: 256 px × 17 frames). Printed per recipe: the median step time and its spread,
images (video: clips) or generated tokens per second, and the peak memory (CUDA: max allocated since the
recipe started loading; CPU: the process's peak resident set, which only grows), and per family the
DPO ÷ SFT step-time ratio. A family or recipe that fails (an error, an unsupported pipeline class, its
time cap) is recorded with its error and the run goes on; the JSON is printed and written to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Family:
    """One model to build (`real_configs` name) and the recipes run on it; `seconds`: its time cap on a GPU."""

    model: str
    recipes: tuple[str, ...]
    seconds: float
    video: bool = False


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", ("dpo-lora", "sft-lora", "dpo-full"), 50),
    "sdxl": Family("sdxl", ("dpo-lora", "sft-lora", "dpo-full"), 75),
    "sd35m": Family("sd35m", ("dpo-lora", "sft-lora", "dpo-full", "flow-grpo"), 75),
    "flux": Family("flux", ("dpo-lora", "sft-lora", "flow-grpo"), 100),
    "wan13b": Family("wan13b", ("flow-grpo",), 60, video=True),
    "qwen25vl3b": Family("qwen25vl3b", ("grpo",), 60),
}
RECIPES = ("dpo-lora", "sft-lora", "dpo-full", "flow-grpo", "grpo")


class FamilyTimeout(Exception):
    """A family ran past its time cap."""


@dataclass
class Setting:
    """What the command line chose, shared by every recipe."""

    tiny: bool
    steps: int
    device: torch.device
    dtype: str
    work: Path
    overrides: tuple[str, ...] = ()
    pairs: Path | None = None

    @property
    def resolution(self) -> int:
        return 64 if self.tiny else 512


# ---------------------------------------------------------------------------- measuring
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mib() -> float:
    """CUDA: max allocated since `reset_peak`; CPU: the process's peak resident set (VmHWM)."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise `FamilyTimeout` in the block once `seconds` have passed (SIGALRM; main thread, Unix)."""

    def expire(signum, frame):
        raise FamilyTimeout(f"ran past its time cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- recipes
def method_for(name: str, recipe_file: str | None, overrides: list[str], setting: Setting):
    """The method `name` configured like a run of `recipe_file` with `overrides`, set up on the device."""
    from accelerate import Accelerator

    from mmalign.config import load_config
    from mmalign.registry import METHODS, load

    config = load_config(
        ROOT / recipe_file if recipe_file else None,
        [
            f"method={name}",
            f"output_dir={setting.work / 'run'}",
            "eval.monitor.action=off",
            *overrides,
            *setting.overrides,
        ],
    )
    method = load(METHODS, "method", config.method)(config)
    method.setup(Accelerator(cpu=setting.device.type == "cpu"))
    method.set_trainable_module(method.trainable_module())
    return method, config


def diffusion_overrides(model_dir: Path, setting: Setting, lora: bool) -> list[str]:
    return [
        f"model={model_dir}",
        f"model.lora_rank={16 if lora else 'null'}",
        f"model.dtype={setting.dtype}",
        "eval.gold=null",
        "eval.num_prompts=1",
    ]


def pair_step(name: str, lora: bool) -> Callable[[Path, Family, Setting], tuple[Any, Any, Callable]]:
    """A DPO or SFT recipe: the method on the benchmark's pair folder; each step trains on 2B images."""

    def build(model_dir: Path, family: Family, setting: Setting):
        pairs = 1 if setting.tiny else 2
        overrides = [
            *diffusion_overrides(model_dir, setting, lora),
            f"data={setting.pairs}",
            f"data.resolution={setting.resolution}",
            f"train.batch_size={pairs}",
            "eval.rewards=[jpeg-compressibility]",
        ]
        if name == "diffusion-sft":
            overrides.append("diffusion_sft.both_images=true")
        method, config = method_for(name, None, overrides, setting)
        batch = method.collate([method.dataset[i] for i in range(pairs)])
        return method, config, lambda step: (method.compute_loss(batch, step, 0)[0], 2 * pairs)

    return build


def flow_grpo_step(model_dir: Path, family: Family, setting: Setting):
    """Flow-GRPO: a rollout of `group_size` samples per prompt (reward included), then the update."""
    recipe = "configs/video/flow_grpo.yaml" if family.video else "configs/image/flow_grpo.yaml"
    reward = "motion-smoothness" if family.video else "jpeg-compressibility"
    size = (32 if family.video else 64) if setting.tiny else (256 if family.video else setting.resolution)
    overrides = [
        *diffusion_overrides(model_dir, setting, True),
        f"data.resolution=[{size},{size}]",
        "train.batch_size=1" if setting.tiny else "train.batch_size=2",
        f"flow_grpo.rewards={reward}",
        f"eval.rewards=[{reward}]",
        "flow_grpo.group_size=2" if setting.tiny else "flow_grpo.group_size=4",
        f"flow_grpo.num_steps={4 if setting.tiny else 10}",
    ]
    if family.video:
        overrides += [f"data.num_frames={5 if setting.tiny else 17}", "eval.samples_per_prompt=1"]
    method, config = method_for("flow-grpo", recipe, overrides, setting)
    samples = config.train.batch_size * method.config.group_size

    def step(index: int):
        batch = method.next_batch(index, 0)
        return method.compute_loss(batch, index, 0)[0], samples

    return method, config, step


def grpo_step(model_dir: Path, family: Family, setting: Setting):
    """GRPO on the VLM world's questions: generation of `num_generations` completions per prompt, then the
    update; counts generated tokens."""
    overrides = [
        f"model.path={model_dir}",
        "model.lora_rank=16",
        f"model.dtype={setting.dtype}",
        f"train.batch_size={2 if setting.tiny else 4}",
        f"grpo.num_generations={2 if setting.tiny else 4}",
        f"grpo.max_new_tokens={8 if setting.tiny else 64}",
    ]
    method, config = method_for("grpo", "configs/vlm/grpo.yaml", overrides, setting)
    completions = config.train.batch_size * method.config.num_generations

    def step(index: int):
        loss, metrics = method.compute_loss(method.next_batch(index, 0), index, 0)
        return loss, float(metrics["completion_length"]) * completions

    return method, config, step


BUILDERS = {
    "dpo-lora": pair_step("diffusion-dpo", lora=True),
    "sft-lora": pair_step("diffusion-sft", lora=True),
    "dpo-full": pair_step("diffusion-dpo", lora=False),
    "flow-grpo": flow_grpo_step,
    "grpo": grpo_step,
}


def run_recipe(recipe: str, model_dir: Path, family: Family, setting: Setting) -> dict[str, Any]:
    """Load, one warm-up step, `setting.steps` timed steps; per-step seconds, throughput and peak memory."""
    from mmalign.train.optim import build_optimizer

    reset_peak()
    start = time.perf_counter()
    method, config, step = BUILDERS[recipe](model_dir, family, setting)
    params = [p for p in method.trainable_module().parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.train)
    load_s = time.perf_counter() - start
    times, units = [], []
    for index in range(setting.steps + 1):
        sync()
        begin = time.perf_counter()
        loss, count = step(index)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if index:  # step 0 warms up
            times.append(time.perf_counter() - begin)
            units.append(count)
    unit = "tokens" if recipe == "grpo" else ("clips" if family.video else "images")
    median = statistics.median(times)
    result = {
        "load_s": round(load_s, 2),
        "step_s": round(median, 4),
        "step_s_spread": [round(min(times), 4), round(max(times), 4)],
        f"{unit}_per_s": round(statistics.median(units) / median, 3),
        "trainable_params": sum(p.numel() for p in params),
        "peak_mib": peak_mib(),
        "steps": len(times),
    }
    del method, optimizer, params, step
    free_memory()
    return result


def run_family(name: str, family: Family, setting: Setting, recipes: tuple[str, ...]) -> dict[str, Any]:
    """Build and save the family's model, then run its recipes; every error is recorded, none raised."""
    from mmalign.models.real_configs import REAL_MODELS, build_real

    record: dict[str, Any] = {"model": REAL_MODELS.get(family.model, family.model), "recipes": {}}
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=setting.work))
    start = time.perf_counter()
    try:
        dtype = torch.bfloat16 if setting.dtype == "bfloat16" else torch.float32
        model_dir = build_real(family.model, folder / "model", tiny=setting.tiny, device=setting.device, dtype=dtype)
        record["build_s"] = round(time.perf_counter() - start, 2)
        free_memory()
        for recipe in recipes:
            try:
                record["recipes"][recipe] = run_recipe(recipe, model_dir, family, setting)
            except FamilyTimeout:
                raise
            except Exception as exc:  # recorded; the next recipe runs
                record["recipes"][recipe] = {"error": f"{type(exc).__name__}: {exc}"}
                free_memory()
    except Exception as exc:  # a build failure or the time cap: recorded, the next family runs
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        free_memory()
    record["seconds"] = round(time.perf_counter() - start, 2)
    done = record["recipes"]
    ratio = [done.get(r, {}).get("step_s") for r in ("dpo-lora", "sft-lora")]
    if all(ratio):
        record["dpo_sft_step_ratio"] = round(ratio[0] / ratio[1], 3)
    record["ok"] = "error" not in record and all("error" not in r for r in done.values()) and len(done) == len(recipes)
    return record


# ---------------------------------------------------------------------------- command line
def _names(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--recipes", default=",".join(RECIPES), help="run only these of each family's recipes")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per recipe (default: 5, --tiny: 2)")
    parser.add_argument("--tiny", action="store_true", help="shrunk configs, float32: the same code on a CPU")
    parser.add_argument("--cap-scale", type=float, default=1.0, help="multiply every family's time cap")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON goes (also printed)")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for every recipe, e.g. train.optimizer=adamw8bit "
        "model.gradient_checkpointing=true (a key a recipe's method does not read is that recipe's error)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    families = _names(args.families, tuple(FAMILIES), "family")
    wanted = _names(args.recipes, RECIPES, "recipe")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" and not args.tiny else "float32"
    work = Path(tempfile.mkdtemp(prefix="mmalign-gpu-check-"))
    os.environ.setdefault("MMALIGN_CACHE", str(work / "cache"))
    setting = Setting(args.tiny, args.steps or (2 if args.tiny else 5), device, dtype, work, tuple(args.overrides))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "dtype": dtype,
        "steps": setting.steps,
        "overrides": list(setting.overrides),
        "families": {},
    }
    start = time.perf_counter()
    try:
        from tests.conftest import write_pair_folder

        setting.pairs = write_pair_folder(work / "pairs", n=4)
        for name in families:
            family = FAMILIES[name]
            recipes = tuple(r for r in family.recipes if r in wanted)
            cap = family.seconds * args.cap_scale * (2 if setting.tiny else 1)
            try:
                with time_cap(cap):
                    report["families"][name] = run_family(name, family, setting, recipes)
            except FamilyTimeout as exc:  # the cap expired while the family was cleaning up
                report["families"][name] = {"ok": False, "error": f"FamilyTimeout: {exc}"}
            print(json.dumps({name: report["families"][name]}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["total_s"] = round(time.perf_counter() - start, 2)
    report["ok"] = all(f["ok"] for f in report["families"].values())
    text = json.dumps(report, indent=2)
    out = Path(args.out)
    partial = out.with_name(f".{out.name}.tmp")
    partial.write_text(text)
    os.replace(partial, out)
    print(text)
    return report


if __name__ == "__main__":
    main()
