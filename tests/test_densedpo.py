"""DenseDPO: pair construction, labellers, stored pairs and their errors, the segment-masked loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmalign.data import balls_world
from mmalign.data.segments import SegmentError
from mmalign.data.video import write_video
from mmalign.losses import diffusion_dpo_loss, per_segment_mse
from mmalign.rewards.video import MotionSmoothness, foreground_track, segment_scores
from mmalign.video.clips import (
    ClipDataConfig,
    VideoDataError,
    VideoPair,
    load_clips,
    load_video_pairs,
    write_video_pairs,
)
from mmalign.video.labels import (
    ReferenceTrackLabeler,
    RewardSegmentLabeler,
    VLMSegmentJudge,
    majority,
    margin_labels,
    parse_choice,
)


def clip(seed: int = 0) -> np.ndarray:
    return balls_world.render(balls_world.captions("train")[seed], np.random.default_rng(seed))


# ------------------------------------------------------------------------------------ labels
def test_margin_labels_signs_ties_and_nan():
    labels = margin_labels(torch.tensor([[0.9, 0.5, 0.30, float("nan")]]), torch.tensor([[0.1, 0.6, 0.31, 0.2]]), 0.02)
    assert labels.tolist() == [[1, -1, 0, 0]]
    assert majority(torch.tensor([[1, 1, -1], [1, -1, 0], [-1, 0, 0]])).tolist() == [1, 0, -1]


def test_reward_labeller_prefers_the_clean_clip_per_segment():
    real = torch.from_numpy(clip()).permute(3, 0, 1, 2).float()[None] / 255
    broken = real.clone()
    broken[:, :, 8:16] = broken[:, :, 8:16][:, :, torch.randperm(8)]  # the second second is scrambled
    labels = RewardSegmentLabeler(MotionSmoothness())(real, broken, ["p"], fps=8, segment_seconds=1.0)
    assert labels.shape == (1, 3)
    assert labels[0, 0] >= 0 and labels[0, 1] == 1 and labels[0, 2] == 0  # one-frame last segment: a tie
    swapped = RewardSegmentLabeler(MotionSmoothness())(broken, real, ["p"], fps=8, segment_seconds=1.0)
    assert torch.equal(swapped, -labels)
    scores = segment_scores(MotionSmoothness(), real, 8, 1.0)
    assert scores[0, 0] > 0.8 and scores[0, 1] > 0.8  # ballistic motion is smooth, bounces aside
    assert torch.isnan(scores[0, 2])  # no jerk window is centred in the last frame: a tie, never a label


def test_reference_labeller_prefers_the_copy_that_moves_like_the_real_clip():
    real = torch.from_numpy(clip()).permute(3, 0, 1, 2).float()[None] / 255
    broken = real.clone()
    broken[:, :, 8:16] = broken[:, :, 8:16][:, :, torch.randperm(8, generator=torch.Generator().manual_seed(0))]
    labeller = ReferenceTrackLabeler()
    labels = labeller(real, broken, ["p"], 8, 1.0, references=real)
    # the first second's last triple (frames 6–8) reaches the scrambled frame 8; the one-frame last
    # segment centres no triple: a tie
    assert labels.tolist() == [[1, 1, 0]]
    assert torch.equal(labeller(broken, real, ["p"], 8, 1.0, references=real), -labels)
    scores = labeller.segment_scores(torch.cat([real, broken]), ["p"] * 2, 8, 1.0, torch.cat([real, real]))
    assert scores[0, :2].tolist() == [1.0, 1.0] and scores[1, 1] < 0.5 and torch.isnan(scores[:, 2]).all()
    # independent reference computation for the scrambled second: mean |Δ²p_copy − Δ²p_real| over triples 8…15
    track = lambda v: foreground_track(v[0].permute(1, 2, 3, 0).numpy(), 0.05)  # noqa: E731
    error = np.linalg.norm(np.diff(track(broken), 2, axis=0) - np.diff(track(real), 2, axis=0), axis=1)[7:15]
    assert scores[1, 1].item() == pytest.approx(np.exp(-np.nan_to_num(error, nan=8.0).mean()), rel=1e-5)
    vanished = real.clone()
    vanished[:, :, 4:6] = vanished[:, :, 3:4]  # the ball stops for two frames: no moving foreground there
    assert labeller(real, vanished, ["p"], 8, 1.0, references=real)[0, 0] == 1
    with pytest.raises(ValueError, match="needs the real clips"):
        labeller(real, broken, ["p"], 8, 1.0)


class StubJudgeVLM:
    """Answers by looking at which image is brighter, or a fixed script of answers."""

    def __init__(self, answers: list[str] | None = None):
        self.answers, self.calls = answers, 0

    def encode(self, conversations):
        return conversations

    def generate(self, prompts, max_new_tokens, do_sample):
        texts = []
        for conversation in prompts:
            if self.answers is not None:
                texts.append(self.answers[self.calls % len(self.answers)])
                self.calls += 1
            else:
                a, b = (np.asarray(im).mean() for im in conversation.images)
                texts.append("A" if a > b else "B")
        return texts, None

    def decode(self, ids, mask):
        return ids


def test_vlm_judge_asks_both_orders_and_keeps_consistent_answers():
    bright = torch.full((2, 3, 16, 8, 8), 0.8)
    dark = torch.full((2, 3, 16, 8, 8), 0.2)
    judge = VLMSegmentJudge(StubJudgeVLM())
    assert judge(bright, dark, ["p", "q"], fps=8, segment_seconds=1.0).tolist() == [[1, 1], [1, 1]]
    assert judge(dark, bright, ["p", "q"], fps=8, segment_seconds=1.0).tolist() == [[-1, -1], [-1, -1]]
    # a judge that always answers "A" contradicts itself when the order is swapped: ties
    assert VLMSegmentJudge(StubJudgeVLM(["A"]))(bright, dark, ["p"] * 2, 8, 1.0).abs().sum() == 0
    assert parse_choice("B.") == 1 and parse_choice("tie") is None and parse_choice("???") == -1


# ------------------------------------------------------------------------------------ stored pairs
def write_pairs(folder, rows, frames=None):
    frames = frames or (clip(0), clip(1))
    folder.mkdir(parents=True, exist_ok=True)
    write_video(folder / "a.gif", frames[0], 8)
    write_video(folder / "b.gif", frames[1], 8)
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def good_row(**change):
    return {"prompt": "a ball", "video_0": "a.gif", "video_1": "b.gif", "fps": 8, "seg_labels": [1, 0, -1], **change}


def test_pairs_round_trip(tmp_path):
    pair = VideoPair("a ball", clip(0), clip(1), 8.0, 1.0, [1, -1, 0], {"eta": 0.7})
    write_video_pairs(tmp_path / "pairs", [pair, pair])
    loaded = load_video_pairs(tmp_path / "pairs")
    assert len(loaded) == 2 and loaded[0].labels == [1, -1, 0] and loaded[0].meta["eta"] == 0.7
    np.testing.assert_array_equal(loaded[0].frames_0, clip(0))  # GIF is lossless for the world's colours


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (good_row(video_1="missing.gif"), "row 1 field 'video_1'.*no such video file"),
        (good_row(fps=None), "row 1: field 'fps' is missing"),
        (good_row(seg_labels=[1, 0]), "row 1: field 'seg_labels' must list 3 values"),
        (good_row(seg_labels=[1, 0, 2]), "seg_labels"),
        ({"prompt": "a ball", "video_0": "a.gif", "fps": 8, "seg_labels": [1, 0, 0]}, "missing field 'video_1'"),
    ],
)
def test_bad_pair_rows_name_file_row_and_field(tmp_path, row, message):
    folder = write_pairs(tmp_path / "pairs", [row])
    with pytest.raises(VideoDataError, match=message):
        load_video_pairs(folder)


def test_mismatched_lengths_short_clips_and_unreadable_videos(tmp_path):
    folder = write_pairs(tmp_path / "lengths", [good_row()], (clip(0), clip(1)[:9]))
    with pytest.raises(VideoDataError, match="differ in length or size"):
        load_video_pairs(folder)
    folder = write_pairs(tmp_path / "short", [good_row(seg_labels=[1])], (clip(0)[:5], clip(1)[:5]))
    with pytest.raises(SegmentError, match="short/pairs.jsonl row 1: 5 frames .* shorter than one 1.0 s segment"):
        load_video_pairs(folder)
    folder = write_pairs(tmp_path / "garbage", [good_row()])
    (folder / "a.gif").write_bytes(b"not a gif at all")
    with pytest.raises(VideoDataError, match="a.gif.*unreadable video"):
        load_video_pairs(folder)


def test_clips_from_the_simulator_and_from_a_folder(tmp_path):
    clips = load_clips(ClipDataConfig("embedded:balls-world"), 3, seed=0)
    assert len(clips) == 3 and clips[0].frames.shape == (17, 32, 32, 3) and clips[0].fps == 8
    write_video(tmp_path / "c.gif", clip(2), 8)
    (tmp_path / "videos.jsonl").write_text(json.dumps({"video": "c.gif", "prompt": "a ball"}) + "\n")
    assert load_clips(ClipDataConfig(str(tmp_path)), 5, seed=0)[0].fps == pytest.approx(8, rel=0.05)


def test_a_folder_of_unequal_clips_is_conformed_to_one_shape(tmp_path):
    """captions.jsonl with `file`/`caption` fields; clips at 8 and 16 fps, of two sizes, MP4 and GIF."""
    frames = np.zeros((24, 40, 48, 3), np.uint8)
    frames[:, 10:30, 14:34] = np.arange(24, dtype=np.uint8)[:, None, None, None] * 10  # brightness = time
    write_video(tmp_path / "a.mp4", frames, 8)
    write_video(tmp_path / "b.gif", frames[:, :32, :32], 16)  # twice the rate: half the duration
    rows = [{"file": "a.mp4", "caption": "a square"}, {"video": "b.gif", "prompt": "a square", "fps": 16}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_clips(ClipDataConfig(str(tmp_path), fps=8, resolution=[32, 32]), 5, seed=0)
    assert a.frames.shape == b.frames.shape == (12, 32, 32, 3) and a.fps == b.fps == 8
    # a keeps its first 12 frames; b at half its rate keeps every other one (brightness = 10 × source frame)
    np.testing.assert_allclose(a.frames[:, 16, 16].mean(-1), 10 * np.arange(12), atol=6)
    np.testing.assert_allclose(b.frames[:, 16, 16].mean(-1), 20 * np.arange(12), atol=6)
    with pytest.raises(VideoDataError, match="row 2: 24 frames at 16 fps give 12 at 8 fps, fewer than the 20"):
        load_clips(ClipDataConfig(str(tmp_path), fps=8, num_frames=20), 5, seed=0)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"clip": "a.mp4", "prompt": "x"}) + "\n")
    with pytest.raises(VideoDataError, match="row 1: missing field 'video' \\(or 'file'\\)"):
        load_clips(ClipDataConfig(str(tmp_path)), 5, seed=0)


# ------------------------------------------------------------------------------------ loss
def test_per_segment_sign_of_one_sgd_step():
    # labels [+1, −1]; one step from θ = ref lowers the policy error of video 0 on
    # segment 0 and of video 1 on segment 1, and raises the other two
    torch.manual_seed(0)
    target = torch.randn(2, 4, 4, 3, 3)  # rows: video 0, video 1; 4 latent frames, 2 per segment
    theta = torch.zeros_like(target, requires_grad=True)
    frame_segment = torch.tensor([0, 0, 1, 1])

    def errors(prediction):
        return per_segment_mse(prediction, target, frame_segment, 2)

    ref = errors(torch.zeros_like(target))
    err = errors(theta)
    loss, _ = diffusion_dpo_loss(err[:1], err[1:], ref[:1], ref[1:], beta=10.0, segment_labels=torch.tensor([[1, -1]]))
    assert loss.item() == pytest.approx(np.log(2))
    loss.backward()
    with torch.no_grad():
        after = errors(theta - 0.1 * theta.grad)
    assert after[0, 0] < ref[0, 0] and after[1, 1] < ref[1, 1]
    assert after[0, 1] > ref[0, 1] and after[1, 0] > ref[1, 0]


def test_a_real_tiny_vlm_judges_segments_through_the_wrapper(tmp_path):
    from mmalign.models.tiny_vlm import build_tiny_vlm
    from mmalign.models.vlm import VisionLanguageModel

    vlm = VisionLanguageModel.from_pretrained(build_tiny_vlm("qwen2-vl", tmp_path / "judge"))
    videos = torch.from_numpy(np.stack([clip(0), clip(1)])).permute(0, 4, 1, 2, 3).float() / 255
    labels = VLMSegmentJudge(vlm, image_size=28)(videos, videos.flip(0), ["a", "b"], fps=8, segment_seconds=1.0)
    assert labels.shape == (2, 3) and set(labels.flatten().tolist()) <= {-1, 0, 1}


def test_any_video_reward_scores_segments_as_sub_clips():
    from mmalign.rewards.balls_physics import BallsPhysics

    real = torch.from_numpy(clip(3)).permute(3, 0, 1, 2).float()[None] / 255
    scores = segment_scores(BallsPhysics(), real, fps=8, segment_seconds=1.0)  # no segment_scores of its own
    expected = [BallsPhysics()(real[:, :, a:b]).item() for a, b in ((0, 8), (8, 16), (16, 17))]
    assert scores.shape == (1, 3) and scores[0].tolist() == pytest.approx(expected, nan_ok=True)
