"""DenseDPO and RDPO on the shared trainer with a tiny Wan pipeline: pairs, stages, loss at init, resume."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmalign
from mmalign.config import load_config
from mmalign.models.diffusion import DiffusionModel
from mmalign.train.diffusion_method import DiffusionPairMethod
from mmalign.video.pair_method import VideoPairMethod

ROOT = Path(__file__).resolve().parents[1]


def _overrides(model: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.path={model}", f"output_dir={out}", f"train.max_steps={steps}", "train.batch_size=2",
        "train.checkpoint_every=2", "train.log_every=1", "train.threads=1", "eval.every=0", "eval.num_prompts=2",
        "eval.samples_per_prompt=1", "eval.num_steps=2", "eval.grid_size=2", *extra,
    ]  # fmt: skip


SMALL = {  # each method's recipe at a test's scale
    "densedpo": ("densedpo.num_videos=4", "densedpo.build_batch=4", "densedpo.sample_steps=4",
                 "densedpo.labeler_args={threshold: 0.001}"),
    "rdpo": ("rdpo.num_videos=4", "rdpo.build_batch=4", "rdpo.sample_steps=4"),
}  # fmt: skip


def _dense(model: Path, out: Path, steps: int, *extra: str):
    return load_config(ROOT / "configs/video/densedpo.yaml", _overrides(model, out, steps, *SMALL["densedpo"], *extra))


def _rdpo(model: Path, out: Path, steps: int, *extra: str):
    return load_config(ROOT / "configs/video/rdpo.yaml", _overrides(model, out, steps, *SMALL["rdpo"], *extra))


def _pairs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]


def _same_checkpoint(a: Path, b: Path, step: int) -> bool:
    name = f"step-{step:06d}"
    first = load_file(str(a / "checkpoints" / name / "trainable.safetensors"))
    second = load_file(str(b / "checkpoints" / name / "trainable.safetensors"))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _kill_after_step_2(run, out: Path) -> None:
    """Run, then remove what steps 3–4 wrote, as if killed after the step-2 checkpoint; run again."""
    mmalign.train(run)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    mmalign.train(run)


def test_densedpo_builds_labelled_pairs_starts_at_log2_and_resumes_exactly(tiny_video_pipelines, tmp_path):
    wan = tiny_video_pipelines["wan"]
    report = mmalign.train(_dense(wan, tmp_path / "a", 4))
    rows = _pairs(tmp_path / "a" / "pairs")
    assert rows and all(len(r["seg_labels"]) == 3 and any(r["seg_labels"]) for r in rows)
    assert all(0.65 <= r["eta"] <= 0.8 and r["pair_kind"] == "structural" for r in rows)
    assert report["gold_metric"] == "balls-physics" and "motion-smoothness" in report["metrics"]["after"]
    assert (tmp_path / "a" / "samples" / "step-000004.gif").is_file()
    assert "(samples/step-000004.gif)" in (tmp_path / "a" / "report.md").read_text()
    _kill_after_step_2(_dense(wan, tmp_path / "b", 4), tmp_path / "b")
    assert _same_checkpoint(tmp_path / "a", tmp_path / "b", 4)
    first = mmalign.train(_dense(wan, tmp_path / "init", 1, "densedpo.labels=clip", "densedpo.pairs=vanilla"))
    rows = _pairs(tmp_path / "init" / "pairs")
    assert all(len(set(r["seg_labels"])) == 1 and r["eta"] == 1.0 for r in rows)  # one label per clip, from noise
    assert first["train"]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at the first step


def test_densedpo_refuses_the_gold_metric_as_labeller(tiny_video_pipelines, tmp_path):
    run = _dense(tiny_video_pipelines["wan"], tmp_path / "gold", 1, "densedpo.labeler_reward=balls-physics")
    with pytest.raises(ValueError, match="gold metric must never label"):
        mmalign.train(run)
    # combinations of the method's own options are refused when the config is built
    with pytest.raises(ValueError, match="sft_target=real needs structural pairs"):
        _dense(tiny_video_pipelines["wan"], tmp_path / "vanilla", 1, "densedpo.pairs=vanilla",
               "densedpo.sft_target=real")  # fmt: skip
    with pytest.raises(ValueError, match="labeler=reference .* needs structural pairs"):
        _dense(tiny_video_pipelines["wan"], tmp_path / "ref", 1, "densedpo.pairs=vanilla", "densedpo.labeler=reference")


def test_densedpo_supervised_term_on_the_real_clip_and_reference_labels(tiny_video_pipelines, tmp_path):
    run = _dense(tiny_video_pipelines["wan"], tmp_path, 1, "densedpo.sft_weight=0.5", "densedpo.sft_target=real",
                 "densedpo.labeler=reference")  # fmt: skip
    first = mmalign.train(run)["train"]
    rows = _pairs(tmp_path / "pairs")
    assert rows and all(r["label_source"] == "reference" and any(r["seg_labels"]) for r in rows)
    latents = load_file(str(tmp_path / "pairs" / "latents.safetensors"))
    assert latents["latents_real"].shape == latents["latents_0"].shape  # the real clip each pair was made from
    assert not torch.equal(latents["latents_real"], latents["latents_0"])
    # at θ = reference the DPO term is log 2, so the first step's loss is log 2 + λ·e_θ(x_real)
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["sft_loss"], rel=1e-4)


def test_rdpo_stages_ordering_loss_composition_and_resume(tiny_video_pipelines, tmp_path):
    wan = tiny_video_pipelines["wan"]
    extra = ("model.lora_rank=null", "rdpo.refresh_reference=true", "rdpo.positive_depths=[0.5,0.25]",
             "rdpo.sft_weight=0.5", "rdpo.sft_target=positive")  # fmt: skip
    mmalign.train(_rdpo(wan, tmp_path / "a", 4, *extra))
    stages = [_pairs(tmp_path / "a" / "pairs" / f"stage-{s}") for s in (0, 1)]
    assert [rows[0]["k_w"] for rows in stages] == [0.5, 0.25]  # heavy → light
    assert all(r["k_l"] == 1.0 for rows in stages for r in rows)
    latents = load_file(str(tmp_path / "a" / "pairs" / "stage-0" / "latents.safetensors"))
    to_real = {k: (latents[k] - latents["latents_real"]).flatten(1).norm(dim=1) for k in ("latents_0", "latents_1")}
    assert (to_real["latents_0"] < to_real["latents_1"]).all()  # the shallower regeneration stays closer to real
    assert (tmp_path / "a" / "pairs" / "stage-1" / "reference.safetensors").is_file()
    _kill_after_step_2(_rdpo(wan, tmp_path / "b", 4, *extra), tmp_path / "b")
    assert _same_checkpoint(tmp_path / "a", tmp_path / "b", 4)
    # at θ = reference the DPO term is log 2, so the first step's loss is log 2 + λ·e_θ(x_real) (the recipe's target)
    first = mmalign.train(_rdpo(wan, tmp_path / "init", 1, "rdpo.sft_weight=0.5"))["train"]
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["sft_loss"], rel=1e-4)


def test_rdpo_nearest_selection_picks_the_closest_candidate(tiny_video_pipelines, tmp_path):
    wan = tiny_video_pipelines["wan"]
    distances = {}
    for select in ("nearest", "random"):
        out = tmp_path / select
        mmalign.train(_rdpo(wan, out, 1, f"rdpo.select={select}", "rdpo.candidates=3", "rdpo.positive_depths=[0.5]"))
        distances[select] = [r["selection_distance"] for r in _pairs(out / "pairs" / "stage-0")]
    assert all(n <= r + 1e-6 for n, r in zip(distances["nearest"], distances["random"]))
    assert sum(distances["nearest"]) < sum(distances["random"])


class PromptEncodings:
    """Counts the prompts `DiffusionModel.encode_prompt` encodes for the prompt memo (`encode_prompts`) and
    inside training steps (`compute_loss`), and records each step's loss."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.memo, self.in_steps, self.losses, self._where = Counter(), Counter(), [], None
        encode, memoise, loss = (
            DiffusionModel.encode_prompt,
            VideoPairMethod.encode_prompts,
            VideoPairMethod.compute_loss,
        )

        def counting_encode(model, prompts, resolution=None):
            {"memo": self.memo, "step": self.in_steps}.get(self._where, Counter()).update(prompts)
            return encode(model, prompts, resolution)

        def within(where, fn):
            def wrapped(*args, **kwargs):
                self._where = where
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._where = None

            return wrapped

        def recording_loss(method, batch, step, micro):
            value, metrics = within("step", loss)(method, batch, step, micro)
            self.losses.append(value.item())
            return value, metrics

        monkeypatch.setattr(DiffusionModel, "encode_prompt", counting_encode)
        monkeypatch.setattr(VideoPairMethod, "encode_prompts", within("memo", memoise))
        monkeypatch.setattr(VideoPairMethod, "compute_loss", recording_loss)


def test_densedpo_encodes_each_prompt_once_per_run_and_trains_as_encoding_every_step(
    tiny_video_pipelines, tmp_path, monkeypatch
):
    wan = tiny_video_pipelines["wan"]
    mmalign.train(_dense(wan, tmp_path / "built", 1))
    pairs = tmp_path / "built" / "pairs"
    prompts = {r["prompt"] for r in _pairs(pairs)}
    extra = (f"densedpo.pairs_dir={pairs}", "densedpo.sft_weight=0.5")  # the supervised term reads the rows too
    cached = PromptEncodings(monkeypatch)
    mmalign.train(_dense(wan, tmp_path / "cached", 3, *extra))
    assert len(cached.losses) == 3 and not cached.in_steps
    assert cached.memo == Counter(prompts)  # each distinct prompt once, for every step
    monkeypatch.undo()
    monkeypatch.setattr(VideoPairMethod, "conditioning", DiffusionPairMethod.conditioning)  # encode at every step
    uncached = PromptEncodings(monkeypatch)
    mmalign.train(_dense(wan, tmp_path / "uncached", 3, *extra))
    assert sum(uncached.in_steps.values()) == 3 * 2  # train.batch_size prompts per step
    assert uncached.losses == cached.losses  # the same seed: the same losses, bit for bit


def test_rdpo_encodes_each_prompt_once_over_its_stages(tiny_video_pipelines, tmp_path, monkeypatch):
    wan = tiny_video_pipelines["wan"]
    stages = PromptEncodings(monkeypatch)  # the second stage reads new pairs of the same clips' prompts
    mmalign.train(_rdpo(wan, tmp_path / "rdpo", 2, "rdpo.positive_depths=[0.5,0.25]"))
    assert len(stages.losses) == 2 and not stages.in_steps
    assert set(stages.memo.values()) == {1} and (tmp_path / "rdpo" / "pairs" / "stage-1").is_dir()


@pytest.mark.parametrize("method", ["densedpo", "rdpo"])
def test_the_cli_trains_on_a_folder_of_the_users_clips_and_scores_its_own_prompts(
    method, tiny_video_pipelines, tmp_path
):
    """MP4 and GIF clips of two sizes with captions.jsonl; evaluation on a prompt file with a video reward and
    no gold metric; the report names the folder and says which reward played which role."""
    from mmalign.cli import main
    from mmalign.data import balls_world
    from mmalign.data.video import write_video

    rng = np.random.default_rng(0)
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = []
    for i, caption in enumerate(balls_world.captions("train")[:4]):
        frames = balls_world.render(caption, rng)
        name = f"{i}.mp4" if i % 2 else f"{i}.gif"
        write_video(clips / name, frames if i % 2 else frames.repeat(2, axis=1).repeat(2, axis=2), balls_world.FPS)
        rows.append({"video": name, "caption": caption})
    (clips / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball bouncing\na blue ball falling\n")
    out = tmp_path / method
    overrides = _overrides(tiny_video_pipelines["wan"], out, 2, *SMALL[method], f"data={clips}",
                           "data.resolution=[32, 32]", f"eval.prompts={prompts}", "eval.gold=null",
                           "eval.rewards=[motion-smoothness]")  # fmt: skip
    assert main(["train", str(ROOT / f"configs/video/{method}.yaml"), *overrides]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {"path": str(clips)} and report["eval_prompts"] == str(prompts)
    assert report["gold_metric"] == "motion-smoothness"
    assert "no gold metric" in (out / "report.md").read_text()
    pairs = _pairs(out / "pairs" if method == "densedpo" else out / "pairs" / "stage-1")
    assert {p["prompt"] for p in pairs} <= {r["caption"] for r in rows}
