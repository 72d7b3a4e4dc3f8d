"""`report.json` and `report.md` of a finished run: gold metric before/after, other metrics, grids, and
the reward-hacking monitor's plot and firings when it is on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mmalign.config import RunConfig
from mmalign.io import atomic_write_json, atomic_write_text
from mmalign.train import monitor
from mmalign.train.grids import side_by_side

#: where the monitor's plot goes, relative to the run directory
MONITOR_PLOT = "plots/monitor.png"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def line_chart(
    panels: list[tuple[str, list[int], list[float]]],
    marks: list[tuple[int, str, str]] = (),
    width: int = 640,
    panel_height: int = 170,
) -> Image.Image:
    """Line plots stacked on one step axis, drawn with PIL like the sample grids: each panel is
    `(title, steps, values)` with its own value axis; `marks` are `(step, colour, label)` vertical
    lines across every panel, named in a legend under the plot."""
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 16, 18, 18
    legend = 14 * len({(colour, label) for _, colour, label in marks})
    height = len(panels) * (panel_height + top) + bottom + legend + 4
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    all_steps = [s for _, steps, _ in panels for s in steps] or [0]
    lo, hi = min(all_steps), max(all_steps)
    hi = hi if hi > lo else lo + 1

    def x_of(step: float) -> float:
        return left + (step - lo) / (hi - lo) * (width - left - right)

    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
    for i, (title, steps, values) in enumerate(panels):
        y0 = i * (panel_height + top) + top
        y1 = y0 + panel_height
        draw.text((left, y0 - 14), title, fill="black", font=font)
        draw.rectangle((left, y0, width - right, y1), outline="#999999")
        vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
        pad = (vmax - vmin) * 0.08 or max(abs(vmax) * 0.05, 0.5)
        vmin, vmax = vmin - pad, vmax + pad

        def y_of(value: float, y0: int = y0, vmin: float = vmin, vmax: float = vmax) -> float:
            return y0 + panel_height - (value - vmin) / (vmax - vmin) * panel_height

        for value in (vmin + pad, (vmin + vmax) / 2, vmax - pad):
            draw.text((2, y_of(value) - 5), f"{value:.4g}", fill="#444444", font=font)
            draw.line((left - 3, y_of(value), left, y_of(value)), fill="#999999")
        for step, colour, _ in marks:
            for y in range(y0, y1, 6):  # dashed
                draw.line((x_of(step), y, x_of(step), min(y + 3, y1)), fill=colour)
        points = [(x_of(s), y_of(v)) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=colours[i % len(colours)], width=2)
        for x, y in points:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colours[i % len(colours)])
    axis = len(panels) * (panel_height + top)
    shown = sorted(set(all_steps))
    for step in shown[:: max(1, len(shown) // 8)]:
        draw.text((x_of(step) - 6, axis + 3), str(step), fill="#444444", font=font)
    draw.text((4, axis + 3), "step", fill="black", font=font)
    for j, (colour, label) in enumerate(dict.fromkeys((c, label) for _, c, label in marks)):
        y = axis + bottom + 2 + 14 * j
        draw.line((left, y + 5, left + 18, y + 5), fill=colour, width=2)
        draw.text((left + 24, y), label, fill="black", font=font)
    return image


def _step_cell(evaluation: dict[str, Any]) -> str:
    """An evaluation's step in a table; the evaluation of weights restored after a stop says whose they are."""
    if "restored_from" in evaluation:
        return f"{evaluation['step']} (final: weights of step {evaluation['restored_from']})"
    return str(evaluation["step"])


def monitor_summary(out: Path, run: RunConfig, gold: str, state) -> dict[str, Any] | None:
    """The monitor's part of `report.json` (None when it is off); draws its plot into `out`."""
    config = getattr(run.eval, "monitor", None)
    if not monitor.is_on(config):
        return None
    metric = monitor.metric_name(config, gold)
    history = [e for e in monitor.monitored(state.evaluations)
               if config.reward in e["metrics"] and metric in e["metrics"]]  # fmt: skip
    steps = [e["step"] for e in history]
    stopped = state.stopped
    top = stopped["best"] if stopped else monitor.best(history, metric)
    marks = [(e["step"], "#d62728", f"monitor fired ({e['action']})") for e in state.monitor]
    if top is not None:
        marks.append((top["step"], "#2ca02c", f"best {metric} (best/)"))
    chart = line_chart(
        [
            (
                f"training reward: {config.reward} (held-out prompts)",
                steps,
                [e["metrics"][config.reward] for e in history],
            ),
            (f"monitor metric: {metric}", steps, [e["metrics"][metric] for e in history]),
        ],
        marks,
    )
    (out / MONITOR_PLOT).parent.mkdir(exist_ok=True)
    chart.save(out / MONITOR_PLOT)
    return {
        "action": config.action,
        "reward": config.reward,
        "metric": metric,
        "baseline": config.baseline,
        "patience": config.patience,
        "min_delta": config.min_delta,
        "best": top,
        "events": state.monitor,
        "stopped": {"step": stopped["step"], "best": stopped["best"], "message": monitor.stop_line(stopped)}
        if stopped
        else None,
        "plot": MONITOR_PLOT,
    }


#: how the report names each `eval.monitor.baseline`
_BASELINE_WORDS = {"best": "the best evaluation before", "previous": "the evaluation before"}


def _monitor_markdown(summary: dict[str, Any], evaluations: list[dict[str, Any]]) -> str:
    reward, metric, top = summary["reward"], summary["metric"], summary["best"]
    fired = {e["step"]: e["action"] for e in summary["events"]}
    rows = []
    for e in evaluations:
        m = e["metrics"]
        if "restored_from" in e:
            note = f"final: the weights of step {e['restored_from']}"
        elif e["step"] in fired:
            note = "fired, stopped here" if fired[e["step"]] == "stop" else "fired (warning)"
        else:
            note = "best" if top and e["step"] == top["step"] else ""
        rows.append(f"| {e['step']} | {_fmt(m.get(reward))} | {_fmt(m.get(metric))} | {note} |")
    events = "\n".join(f"- step {e['step']} ({e['action']}): {e['message']}" for e in summary["events"])
    outcome = (
        f"**{summary['stopped']['message'][0].upper() + summary['stopped']['message'][1:]}.**"
        if summary["stopped"]
        else f"The best `{metric}` was {_fmt(top['value'])} at step {top['step']} (weights in `best/`)."
        if top
        else ""
    )
    return f"""## Reward-hacking monitor

Action `{summary["action"]}`: it compares the training reward `{reward}`, measured on held-out prompts, with
`{metric}`, and fires when for {summary["patience"]} evaluations in a row the reward is higher and `{metric}` lower
(each by more than {summary["min_delta"]:g}) than at {_BASELINE_WORDS[summary["baseline"]]}.

{outcome}

![training reward and monitor metric against step]({summary["plot"]})

| step | {reward} | {metric} | |
|---|---|---|---|
{chr(10).join(rows)}

Firings: {len(summary["events"])}.
{events}
"""


def sample_stem(evaluation: dict[str, Any]) -> str:
    """The file name, without suffix, of an evaluation's sample grid in `samples/`: `step-000300`, or
    `step-000300-best-000200` for the evaluation of the best weights restored after a stop at step 300
    (so the grid of the stopped weights at that step is kept beside it)."""
    stem = f"step-{evaluation['step']:06d}"
    if "restored_from" in evaluation:
        stem += f"-best-{evaluation['restored_from']:06d}"
    return stem


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
    samples = {"before": f"samples/{sample_stem(before)}.png", "after": f"samples/{sample_stem(after)}.png"}
    if (out / samples["before"]).exists() and (out / samples["after"]).exists():
        with Image.open(out / samples["before"]) as b, Image.open(out / samples["after"]) as a:
            side_by_side(b.convert("RGB"), a.convert("RGB")).save(out / "samples" / "before_after.png")
        samples["comparison"] = "samples/before_after.png"
    for key in ("before", "after"):  # video methods also write the clips as animated GIFs
        gif = samples[key][: -len(".png")] + ".gif"
        if (out / gif).exists():
            samples[f"{key}_animation"] = gif
    last_train = state.train_log[-1] if state.train_log else {}
    watched = monitor_summary(out, run, gold, state)
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
    if watched is not None:
        report["monitor"] = watched
    atomic_write_json(out / "report.json", report)

    keys = list(dict.fromkeys([*before["metrics"], *after["metrics"]]))
    b, a = before["metrics"], after["metrics"]
    rows = "\n".join(
        f"| {'**' + k + '**' if k == gold else k} | {_fmt(b.get(k))} | {_fmt(a.get(k))} |"
        f" {_fmt(a.get(k, 0.0) - b.get(k, 0.0))} |"
        for k in keys
    )
    curve = "\n".join(
        f"| {_step_cell(e)} | " + " | ".join(_fmt(e["metrics"].get(k)) for k in keys[:4]) + " |" for e in evaluations
    )
    stopped = watched and watched["stopped"]
    stop_line = f"\n**{stopped['message'][0].upper() + stopped['message'][1:]}.**\n" if stopped else ""
    monitor_section = _monitor_markdown(watched, evaluations) + "\n" if watched else ""
    train_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in report["train"].items())
    animations = "".join(f"\n{key.split('_')[0].capitalize()}, animated: ![{key}]({samples[key]})\n"
                         for key in ("before_animation", "after_animation") if key in samples)  # fmt: skip
    md = f"""# Run report: {report["recipe"]}

Method `{run.method}`; {state.step} optimizer steps, {report["train_seconds"]} s of training.
{description}

**Gold metric `{gold}`: {_fmt(report["before"])} → {_fmt(report["after"])} ({report["delta"]:+.4f}).**
{stop_line}
| metric | before | after | change |
|---|---|---|---|
{rows}

## Evaluations during training

| step | {" | ".join(keys[:4])} |
|---|{"---|" * len(keys[:4])}
{curve}

{monitor_section}## Last logged training metrics

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
