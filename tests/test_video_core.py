"""Video in the shared core: video files, segments of time, and the Wan / AnimateDiff / HunyuanVideo families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from mmalign.data.segments import SegmentError, latent_frame_segments, pixel_segment_bounds, segment_count
from mmalign.data.video import VideoError, frames_to_tensor, read_video, tensor_to_frames, write_video
from mmalign.models.diffusion import DiffusionModel


def moving_square(frames: int = 9, size: int = 32) -> np.ndarray:
    video = np.zeros((frames, size, size, 3), np.uint8)
    for f in range(frames):
        video[f, 8:16, 2 + 2 * f : 10 + 2 * f] = (255, 64, 0)
    return video


# ---------------------------------------------------------------------------------------------- IO
@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_round_trip_keeps_frames_and_fps(tmp_path, suffix):
    frames = moving_square()
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=8)
    video = read_video(path)
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    tolerance = 0.05 if suffix == ".gif" else 1e-6  # GIF stores durations in 10 ms units (125 → 120 ms)
    assert video.fps == pytest.approx(8, rel=tolerance)
    assert np.abs(video.frames.astype(int) - frames).mean() < 6  # lossy codecs, small error
    assert [p.name for p in tmp_path.iterdir()] == [f"clip{suffix}"]  # no temp file left behind


def test_odd_sized_frames_are_padded_for_h264(tmp_path):
    video = read_video(write_video(tmp_path / "odd.mp4", moving_square(size=31)[:, :, :31], fps=4))
    assert video.frames.shape[1:3] == (32, 32)


def test_unreadable_empty_and_missing_videos_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 10)
    with pytest.raises(VideoError, match="garbage.mp4"):
        read_video(garbage)
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(VideoError, match="empty.mp4"):
        read_video(empty)
    with pytest.raises(VideoError, match="no such video file"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="unsupported video suffix"):
        read_video(garbage.rename(tmp_path / "clip.txt"))


def test_gif_without_frame_durations_has_no_fps(tmp_path):
    from PIL import Image

    path = tmp_path / "nofps.gif"
    images = [Image.fromarray(f) for f in moving_square(3)]
    images[0].save(path, save_all=True, append_images=images[1:])
    with pytest.raises(VideoError, match="fps"):
        read_video(path)


def test_bad_frames_are_refused_when_writing(tmp_path):
    with pytest.raises(VideoError, match="no frames"):
        write_video(tmp_path / "a.mp4", np.zeros((0, 8, 8, 3), np.uint8), fps=8)
    with pytest.raises(VideoError, match="uint8"):
        write_video(tmp_path / "a.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    with pytest.raises(VideoError, match="fps"):
        write_video(tmp_path / "a.gif", moving_square(2), fps=0)
    assert list(tmp_path.iterdir()) == []


def test_tensor_conversions_invert_each_other():
    frames = moving_square(3)
    pixels = frames_to_tensor(frames)
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    np.testing.assert_array_equal(tensor_to_frames((pixels + 1) / 2), frames)


# ---------------------------------------------------------------------------------------- segments
def test_densedpo_mask_mapping_example():
    # T = 17 frames, k = 4 causal (5 latent frames), 8 fps, 1 s segments
    frame_segment, count, empty = latent_frame_segments(17, 5, 8, 1.0, 4, causal=True)
    assert frame_segment.tolist() == [0, 0, 0, 1, 1] and count == 3 and empty == [2]
    assert pixel_segment_bounds(17, 8, 1.0) == [(0, 8), (8, 16), (16, 17)]


def test_majority_tie_goes_to_the_later_segment_and_per_frame_vaes_map_one_to_one():
    # 12 frames at 4 fps, 1 s segments; k = 2 non-causal: latent frame 1 covers pixels 2, 3 (segment 0),
    # and with k = 8 the first latent frame covers 4 + 4 pixels of segments 0 and 1: a tie → 1
    assert latent_frame_segments(12, 6, 4, 1.0, 2, causal=False)[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert latent_frame_segments(8, 1, 4, 1.0, 8, causal=False)[0].tolist() == [1]
    assert latent_frame_segments(8, 8, 4, 1.0, 1, causal=False)[0].tolist() == [0] * 4 + [1] * 4


def test_segment_errors_name_the_clip():
    with pytest.raises(SegmentError, match="clip.mp4.*fps is missing"):
        segment_count(16, None, 1.0, where="clip.mp4")
    with pytest.raises(SegmentError, match="clip.mp4.*shorter than one 1.0 s segment"):
        segment_count(5, 8, 1.0, where="clip.mp4")
    assert segment_count(8, 8, 1.0) == 1 and segment_count(9, 8, 1.0) == 2


# ---------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("family", ["wan", "animatediff", "hunyuan-video"])
def test_latent_frames_match_the_real_vae(family, tiny_video_pipelines):
    model = DiffusionModel.from_pretrained(tiny_video_pipelines[family], lora_rank=4)
    assert model.is_video
    for frames in (1, 5, 9):
        latents = model.encode_images(torch.rand(1, 3, frames, 32, 32) * 2 - 1, generator=torch.Generator())
        assert latents.shape[2] == model.latent_frame_count(frames)
        assert latents.shape == model.latent_shape(1, (32, 32), frames)
        assert model.decode_latents(latents).shape == (1, 3, frames, 32, 32)
    expected = {"wan": (3, 1 + (9 - 1) // 4), "animatediff": (8, 9), "hunyuan-video": (3, 3)}[family]
    assert (model.latent_frame_count(seconds=1.0, fps=8), model.latent_frame_count(9)) == expected
    if family == "wan":
        with pytest.raises(ValueError, match="1 \\+ 4·n frames"):
            model.latent_frame_count(8)
        frame_segment, count, _ = model.latent_frame_segments(17, fps=8, segment_seconds=1.0)
        assert frame_segment.tolist() == [0, 0, 0, 1, 1] and count == 3


@pytest.mark.parametrize("family", ["wan", "animatediff", "hunyuan-video"])
def test_video_dpo_step_lora_round_trip_and_sampling(family, tiny_video_pipelines, tmp_path):
    from mmalign.losses import diffusion_dpo_loss, per_segment_mse

    model = DiffusionModel.from_pretrained(tiny_video_pipelines[family], lora_rank=4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *model.latent_shape(1, (32, 32), 5)[1:], generator=g)  # one pair
    noise = torch.randn(x0.shape, generator=g)
    t = model.noise.sample_timesteps(1, generator=g).repeat(2)
    cond = model.encode_prompt(["a red ball"], (32, 32)).tile(2)
    x_t = model.noise.add_noise(x0, noise, t)
    target = model.noise.target(x0, noise, t)
    frame_segment = torch.arange(x0.shape[2]) * 2 // x0.shape[2]  # two segments
    err = per_segment_mse(model.predict(x_t, t, cond), target, frame_segment, 2)
    ref = per_segment_mse(model.predict_reference(x_t, t, cond), target, frame_segment, 2)
    loss, _ = diffusion_dpo_loss(err[:1], err[1:], ref[:1], ref[1:], beta=100.0, segment_labels=torch.ones(1, 2))
    assert loss.item() == pytest.approx(np.log(2), abs=1e-4)  # policy = reference at init
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())

    model.save_lora(tmp_path / "lora")
    pipe = DiffusionPipeline.from_pretrained(tiny_video_pipelines[family])
    pipe.load_lora_weights(tmp_path / "lora")  # diffusers' own loader reads the adapter
    sampled = model.sample(["a red ball"], num_steps=2, resolution=(32, 32), num_frames=5, generator=g)
    assert sampled.shape == model.latent_shape(1, (32, 32), 5) and torch.isfinite(sampled).all()
    init = model.sample(["a red ball"], num_steps=2, init_latents=sampled, strength=0.5, generator=g)
    assert init.shape == sampled.shape


def test_wan_default_resolution_comes_from_the_pipeline(tiny_video_pipelines):
    model = DiffusionModel.from_pretrained(tiny_video_pipelines["wan"], lora_rank=4)
    assert model.default_resolution == (480, 832) and model.default_num_frames == 81
    assert type(model.noise).__name__ == "FlowMatching"


def test_flow_prediction_multistep_schedulers_train_as_flow_matching():
    from diffusers import UniPCMultistepScheduler

    from mmalign.models.noise import FlowMatching, noise_process

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    process = noise_process(unipc)
    assert isinstance(process, FlowMatching) and process.shift == 5.0


def test_the_shipped_balls_model_loads_and_draws_the_ball():
    from mmalign.data import balls_world
    from mmalign.rewards.balls_physics import BallsPhysics

    model = DiffusionModel.from_pretrained("embedded:balls-t2v", lora_rank=4)
    assert model.latent_frame_count(balls_world.FRAMES) == 9  # the embedded autoencoder halves time
    captions = balls_world.captions("heldout")[:4]
    latents = model.sample(captions, num_steps=10, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                           resolution=(balls_world.SIZE, balls_world.SIZE), num_frames=balls_world.FRAMES)  # fmt: skip
    videos = model.decode_latents(latents)
    assert videos.shape == (4, 3, balls_world.FRAMES, balls_world.SIZE, balls_world.SIZE)
    assert BallsPhysics().breakdown(videos, captions)["visible"] > 0.5
