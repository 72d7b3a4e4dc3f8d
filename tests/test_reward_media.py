"""Image rewards on videos (sampled frames, pooled) and meshes (rendered views, pooled)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

import mmalign
from mmalign.cli import main
from mmalign.data.video import read_video, write_video
from mmalign.mesh.render import render_mesh
from mmalign.rewards import RewardInputError, load_reward
from mmalign.rewards.media import VideoFrames, frame_indices

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def clip_path(tiny_clip_dir) -> str:
    return str(tiny_clip_dir)


@pytest.fixture(scope="module")
def clip(clip_path):
    return load_reward("clip-score", path=clip_path)


def _clips(n: int = 2, frames: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_frame_indices_are_evenly_spaced_and_keep_both_ends():
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(16, 2) == [0, 15]
    assert frame_indices(3, 8) == [0, 1, 2]
    assert frame_indices(5, 1) == [0]


def test_an_image_reward_scores_video_tensors_by_pooled_frames(clip, clip_path):
    videos = _clips()
    by_frame = torch.stack([clip(videos[:, :, t], PROMPT) for t in range(10)], dim=1)  # (N, T)
    picked = by_frame[:, [0, 3, 6, 9]]
    assert torch.allclose(clip(videos, PROMPT), by_frame[:, frame_indices(10, 8)].mean(1), atol=1e-4)
    assert torch.allclose(
        mmalign.score(videos, PROMPT, reward="clip-score", path=clip_path), clip(videos, PROMPT), atol=1e-4
    )
    video4 = VideoFrames(clip, frames=4)  # what load_reward("video:clip-score", frames=4) builds
    assert torch.allclose(video4(videos, PROMPT), picked.mean(1), atol=1e-4)
    worst = VideoFrames(clip, frames=4, pool="min")
    assert torch.allclose(worst(videos, [PROMPT, "a blue square"])[0], picked[0].min(), atol=1e-4)
    # clips of different lengths in a list, (3, T, H, W) each; a short clip gives all its frames
    short = videos[1, :, :3]
    scores = video4([videos[0], short], PROMPT)
    assert torch.allclose(scores, torch.stack([picked[0].mean(), by_frame[1, :3].mean()]), atol=1e-4)


def test_video_files_are_read_and_scored(clip, clip_path, tmp_path):
    frames = (_clips(1, 6)[0].permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)  # (T, H, W, 3)
    as_tensor = torch.from_numpy(frames).permute(3, 0, 1, 2).float()[None] / 255  # (1, 3, T, H, W)
    assert torch.allclose(clip(frames, PROMPT), clip(as_tensor, PROMPT), atol=1e-4)  # one (T, H, W, 3) array
    mp4 = write_video(tmp_path / "clip.mp4", frames, fps=8)
    gif = write_video(tmp_path / "clip.gif", frames, fps=8)
    decoded = torch.from_numpy(read_video(mp4).frames).permute(3, 0, 1, 2).float() / 255
    assert torch.allclose(clip([str(mp4)], PROMPT), clip(decoded[None], PROMPT), atol=1e-4)
    video = load_reward("video:clip-score", path=clip_path)
    gif_frames = torch.from_numpy(read_video(gif).frames).permute(3, 0, 1, 2).float() / 255
    assert torch.allclose(video(str(gif), PROMPT), clip(gif_frames[None], PROMPT), atol=1e-4)
    # the command line collects videos from a folder when the reward is a video: one
    code = main(["score", str(tmp_path), "--reward", "video:clip-score", "--reward-arg", f"path={clip_path}",
                 "--prompt", PROMPT, "--json", str(tmp_path / "scores.json")])  # fmt: skip
    assert code == 0 and (tmp_path / "scores.json").is_file()


def test_an_image_reward_scores_meshes_by_pooled_views(clip, clip_path, tmp_path):
    box, sphere = trimesh.creation.box(extents=(1, 2, 3)), trimesh.creation.icosphere(subdivisions=1)
    vertices = box.vertices.copy()
    views = load_reward("mesh-views:clip-score", path=clip_path, views=3, size=32, elevation=10)
    azimuths = [35.0, 155.0, 275.0]
    assert views.azimuths == azimuths
    rendered = torch.stack([torch.from_numpy(render_mesh(box, 32, a, 10.0)).permute(2, 0, 1).float() for a in azimuths])
    expected = clip(rendered, PROMPT)
    scores = views([box, sphere], PROMPT)
    assert scores.shape == (2,) and torch.allclose(scores[0], expected.mean(), atol=1e-4)
    assert np.array_equal(box.vertices, vertices)  # the caller's mesh is not modified
    worst = load_reward("mesh-views:clip-score", path=clip_path, views=3, size=32, elevation=10, pool="min")
    assert torch.allclose(worst(box, PROMPT), expected.min(), atol=1e-4)
    # a plain image reward takes mesh files: 4 views of 224 px, mean-pooled
    box.export(tmp_path / "box.obj")
    default = load_reward("mesh-views:clip-score", path=clip_path)
    assert torch.allclose(clip([str(tmp_path / "box.obj")], PROMPT), default(str(tmp_path / "box.obj"), PROMPT))


def test_gold_reward_on_videos_and_wrapper_errors(clip, clip_path):
    gold = load_reward("shapes-gold")
    white = torch.ones(2, 3, 5, 32, 32)
    assert gold(white, "a red circle").tolist() == gold(white[:, :, 0], "a red circle").tolist()
    with pytest.raises(RewardInputError, match="pool='max'"):
        load_reward("video:clip-score", path=clip_path, pool="max")
    with pytest.raises(RewardInputError, match="frames=0"):
        load_reward("video:shapes-gold", frames=0)
    with pytest.raises(RewardInputError, match="motion-smoothness.*videos"):
        load_reward("video:motion-smoothness")
    with pytest.raises(RewardInputError, match="takes no argument 'view'"):
        load_reward("mesh-views:shapes-gold", view=3)
    with pytest.raises(RewardInputError, match="2 samples but 3 prompts"):
        clip(_clips(), ["a", "b", "c"])
