"""The embedded balls world: captions, simulation and the physics gold metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmalign
from mmalign.data import balls_world as bw


def test_captions_parse_back_and_splits_are_disjoint():
    train, heldout = bw.captions("train"), bw.captions("heldout")
    assert heldout and train and not set(train) & set(heldout)
    assert sorted(train + heldout) == bw.captions("all")
    for caption in bw.captions("all"):
        assert bw.parse_caption(caption).caption == caption
    with pytest.raises(ValueError, match="not a balls-world caption"):
        bw.parse_caption("a purple ball thrown from the left bounces once")


def test_every_caption_simulates_inside_the_frame_with_its_bounce_count():
    rng = np.random.default_rng(0)
    for caption in bw.captions("all"):
        scene = bw.parse_caption(caption)
        trajectory = bw.simulate(scene, rng)
        xy, r = trajectory.xy, trajectory.radius
        assert xy.shape == (bw.FRAMES, 2)
        assert (xy - r).min() >= 0 and (xy[:, 0] + r).max() <= bw.SIZE and (xy[:, 1] + r).max() <= bw.FLOOR + 1e-6
        side = np.sign(xy[-1, 0] - xy[0, 0])
        assert scene.side == "centre" or side == {"left": 1, "right": -1}[scene.side] or abs(xy[-1, 0] - xy[0, 0]) < 8


def test_rendering_is_deterministic_per_generator():
    caption = bw.captions("train")[0]
    a = bw.render(caption, np.random.default_rng(3))
    b = bw.render(caption, np.random.default_rng(3))
    assert a.shape == (bw.FRAMES, bw.SIZE, bw.SIZE, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_centroids_track_the_simulated_ball():
    rng = np.random.default_rng(1)
    for caption in bw.captions("all")[:12]:
        scene = bw.parse_caption(caption)
        trajectory = bw.simulate(scene, rng)
        centroids, mass = bw.ball_centroids(bw.draw(trajectory, scene.colour))
        assert np.abs(centroids - trajectory.xy).max() < 0.35
        assert mass.min() > bw._MIN_BALL_MASS


def test_physics_gold_separates_real_motion_from_broken_motion():
    rng = np.random.default_rng(2)
    real, shuffled, frozen, noisy = [], [], [], []
    for caption in bw.captions("all")[:16]:
        clip = bw.render(caption, rng)
        real.append(bw.physics_checks(clip)["physics"])
        shuffled.append(bw.physics_checks(clip[rng.permutation(len(clip))])["physics"])
        frozen.append(bw.physics_checks(np.repeat(clip[:1], len(clip), 0))["physics"])
        noise = rng.normal(0, 30, clip.shape)
        noisy.append(bw.physics_checks(np.clip(clip + noise, 0, 255).astype(np.uint8))["physics"])
    assert min(real) > 0.55 and np.mean(real) > 0.8
    assert np.mean(real) > np.mean(noisy) + 0.3 and np.mean(real) > np.mean(shuffled) + 0.5
    assert np.mean(frozen) == pytest.approx(np.exp(-1))  # no acceleration at all: error of exactly one g·dt²
    assert all(0 < s <= 1 for s in real + shuffled + noisy)


def test_missing_ball_and_segments():
    clip = bw.render(bw.captions("train")[0], np.random.default_rng(4))
    empty = clip.copy()
    empty[5:9] = np.array(bw.BACKGROUND, np.uint8)  # the ball vanishes for half a second
    empty[5:9, int(bw.FLOOR) :] = bw.FLOOR_COLOUR
    full, gap = bw.physics_checks(clip), bw.physics_checks(empty)
    assert gap["visible"] == pytest.approx(13 / 17) and gap["physics"] < full["physics"] - 0.3
    assert len(full["segments"]) == 3  # 17 frames at 8 fps in 1 s segments
    assert gap["segments"][1] < full["segments"][1]


def test_video_rewards_score_files_arrays_and_tensors_from_python_and_the_cli(tmp_path, capsys):
    import torch

    from mmalign.cli import main
    from mmalign.data.video import write_video

    clip = bw.render(bw.captions("train")[0], np.random.default_rng(5))
    write_video(tmp_path / "clips" / "real.gif", clip, bw.FPS)
    write_video(tmp_path / "clips" / "scrambled.mp4", clip[np.random.default_rng(0).permutation(len(clip))], bw.FPS)
    gold = mmalign.load_reward("balls-physics")
    from_file = gold([tmp_path / "clips" / "real.gif"])
    from_array = gold(clip)
    from_tensor = gold(torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 255)
    assert from_file.item() == pytest.approx(from_array.item(), abs=1e-6) == pytest.approx(from_tensor.item(), abs=1e-6)
    out = tmp_path / "s.json"
    assert main(["score", "--reward", "motion-smoothness", str(tmp_path / "clips"), "--json", str(out)]) == 0
    scores = {Path(r["file"]).name: r["score"] for r in json.loads(out.read_text())["scores"]}
    assert scores["real.gif"] > scores["scrambled.mp4"]
    with pytest.raises(mmalign.rewards.base.RewardInputError, match="nothing.mp4"):
        gold([tmp_path / "nothing.mp4"])


def test_colour_match_reads_the_caption_colour_and_ignores_missing_frames():
    caption = "a small red ball thrown from the left bounces once"
    clip = bw.render(caption, np.random.default_rng(3))
    assert bw.ball_colours(clip) == ["red"] * len(clip)
    assert bw.colour_match(clip, caption) == 1.0
    assert bw.colour_match(clip, caption.replace("red", "blue")) == 0.0
    recoloured = clip.copy()
    ball = np.linalg.norm(clip.astype(float) - bw.BACKGROUND, axis=-1) > 60
    ball[:, int(bw.FLOOR) :] = False
    recoloured[:4][ball[:4]] = bw.COLOURS["blue"]  # the ball turns blue in 4 frames
    recoloured[4:6] = clip[0, 0, 0]  # and vanishes in 2 (background only): they do not count
    assert bw.ball_colours(recoloured)[4:6] == [None, None]
    assert bw.colour_match(recoloured, caption) == pytest.approx((len(clip) - 6) / (len(clip) - 2))
    empty = np.broadcast_to(clip[0, 0, 0], clip.shape).copy()
    assert bw.colour_match(empty, caption) == 0.0


def test_balls_colour_reward_needs_world_captions():
    reward = mmalign.load_reward("balls-colour")
    clip = bw.render("a large green ball thrown from the right bounces twice", np.random.default_rng(0))
    video = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 255
    assert reward(video, "a large green ball thrown from the right bounces twice").item() == 1.0
    with pytest.raises(mmalign.rewards.base.RewardInputError, match="not a balls-world caption"):
        reward(video, "a cat")
