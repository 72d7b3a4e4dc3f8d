"""`report.json` and `report.md` of a finished run: gold metric before/after, other metrics, grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from mmalign.config import RunConfig
from mmalign.io import atomic_write_json, atomic_write_text
from mmalign.train.grids import side_by_side


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_report(
    out: Path,
    run: RunConfig,
    gold: str,
    state,
    saved: list[str],
    data: dict[str, Any],
    num_processes: int = 1,
    description: str = "",
) -> dict[str, Any]:
    """Write both report files (atomically) and return the JSON object.

    `gold` names the metric reported as `gold_metric`; `state` is the trainer's state with the
    evaluation history (the first entry is "before", the last "after"); `description` says what
    was trained and how it was evaluated (`Method.report_description`); `data` what it really read
    (`Method.data_used`).
    """
    evaluations = state.evaluations
    before, after = evaluations[0], evaluations[-1]
    samples = {"before": f"samples/step-{before['step']:06d}.png", "after": f"samples/step-{after['step']:06d}.png"}
    if (out / samples["before"]).exists() and (out / samples["after"]).exists():
        with Image.open(out / samples["before"]) as b, Image.open(out / samples["after"]) as a:
            side_by_side(b.convert("RGB"), a.convert("RGB")).save(out / "samples" / "before_after.png")
        samples["comparison"] = "samples/before_after.png"
    for key in ("before", "after"):  # video methods also write the clips as animated GIFs
        gif = samples[key][: -len(".png")] + ".gif"
        if (out / gif).exists():
            samples[f"{key}_animation"] = gif
    last_train = state.train_log[-1] if state.train_log else {}
    report = {
        "recipe": run.recipe or run.method,
        "method": run.method,
        "steps": state.step,
        "gold_metric": gold,
        "before": before["metrics"].get(gold),
        "after": after["metrics"].get(gold),
        "delta": after["metrics"].get(gold, 0.0) - before["metrics"].get(gold, 0.0),
        "metrics": {"before": before["metrics"], "after": after["metrics"]},
        "train": {k: v for k, v in last_train.items() if k != "step"},
        "train_seconds": round(state.seconds, 1),
        "num_processes": num_processes,
        "model": run.model.path if run.model is not None else None,
        "data": data,
        "eval_prompts": getattr(run.eval, "prompts", None),
        "samples": samples,
        "saved": saved,
        "evaluations": evaluations,
    }
    atomic_write_json(out / "report.json", report)

    keys = list(dict.fromkeys([*before["metrics"], *after["metrics"]]))
    b, a = before["metrics"], after["metrics"]
    rows = "\n".join(
        f"| {'**' + k + '**' if k == gold else k} | {_fmt(b.get(k))} | {_fmt(a.get(k))} |"
        f" {_fmt(a.get(k, 0.0) - b.get(k, 0.0))} |"
        for k in keys
    )
    curve = "\n".join(
        f"| {e['step']} | " + " | ".join(_fmt(e["metrics"].get(k)) for k in keys[:4]) + " |" for e in evaluations
    )
    train_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in report["train"].items())
    animations = "".join(f"\n{key.split('_')[0].capitalize()}, animated: ![{key}]({samples[key]})\n"
                         for key in ("before_animation", "after_animation") if key in samples)  # fmt: skip
    md = f"""# Run report: {report["recipe"]}

Method `{run.method}`; {state.step} optimizer steps, {report["train_seconds"]} s of training.
{description}

**Gold metric `{gold}`: {_fmt(report["before"])} → {_fmt(report["after"])} ({report["delta"]:+.4f}).**

| metric | before | after | change |
|---|---|---|---|
{rows}

## Evaluations during training

| step | {" | ".join(keys[:4])} |
|---|{"---|" * len(keys[:4])}
{curve}

## Last logged training metrics

| metric | value |
|---|---|
{train_rows}

## Samples

Before (left) and after (right):

![before and after]({samples.get("comparison", samples["after"])})
{animations}

Saved: {", ".join(f"`{p}`" for p in saved)}. Resolved config: `config.yaml`.
TensorBoard: `tensorboard --logdir {out / "logs"}`.
"""
    atomic_write_text(out / "report.md", md)
    return report
