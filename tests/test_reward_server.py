"""The HTTP reward server: scores equal in-process ones (images, videos and meshes), concurrent requests are
batched, bad requests (malformed, of the wrong kind, too large) get a 4xx JSON error and the server keeps
serving; the client reward goes wherever a reward name of its kind goes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from mmalign.data import balls_world
from mmalign.rewards import Reward, RewardInputError, load_reward
from mmalign.rewards.http import encode_array, encode_png
from mmalign.rewards.media import wrapper_class
from mmalign.rewards.server import build_app, free_port, serving

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle left of a blue square"]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """`(n, 3, 32, 32)` images on the 1/255 grid (what an 8-bit PNG carries)."""
    return (torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_reward("clip-score", path=str(tiny_clip_dir))


@pytest.fixture(scope="module")
def server(clip):
    """A clip-score server on a free 127.0.0.1 port, gathering requests for up to 50 ms."""
    app = build_app(clip, "clip-score", max_batch=64, max_wait_ms=50)
    with serving(app) as base:
        yield base


def _post(url: str, body: bytes, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _info(server: str) -> dict:
    with urllib.request.urlopen(f"{server}/clip-score", timeout=30) as response:
        return json.loads(response.read())


def test_scores_through_the_server_equal_in_process_scores(clip, server):
    remote = load_reward(f"{server}/clip-score", batch_size=3)  # 2 requests for 4 images
    assert remote.name == "clip-score" and remote.needs_prompts
    images = _images(4)
    assert torch.allclose(remote(images, PROMPTS), clip(images, PROMPTS), atol=1e-4)
    status, answer = _post(
        f"{server}/clip-score", json.dumps({"images": [encode_png(images[0])], "prompts": "a red circle"}).encode()
    )
    assert status == 200 and answer["reward"] == "clip-score"
    assert answer["scores"][0] == pytest.approx(float(clip(images[:1], "a red circle")[0]), abs=1e-4)


def test_concurrent_clients_are_batched_and_each_gets_its_own_scores(clip, server):
    remote = load_reward(f"{server}/clip-score")
    images = _images(16, seed=1)
    prompts = [PROMPTS[i % 4] for i in range(16)]
    expected = clip(images, prompts)
    before = _info(server)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: remote(images[2 * i : 2 * i + 2], prompts[2 * i : 2 * i + 2]), range(8)))
    assert torch.allclose(torch.cat(results), expected, atol=1e-4)
    after = _info(server)
    assert after["requests"] - before["requests"] == 8 and after["scored"] - before["scored"] == 16
    assert after["calls"] - before["calls"] < 8  # requests waiting together were scored in one call


def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(clip, server):
    good = encode_png(_images(1)[0])
    url = f"{server}/clip-score"
    cases = {
        b"not json": (400, "body: not valid JSON"),
        b"[1, 2]": (400, "body: expected a JSON object"),
        b'{"imgs": []}': (400, "unknown field 'imgs'"),
        b'{"images": []}': (400, "field 'images': expected a non-empty list"),
        b'{"images": ["@@@"], "prompts": "x"}': (400, "images[0]: not valid base64"),
        b'{"images": ["aGVsbG8="], "prompts": "x"}': (400, "images[0]: not a readable image"),
        json.dumps({"images": [good, 7], "prompts": "x"}).encode(): (400, "images[1]: expected a base64 PNG string"),
        json.dumps({"images": [good]}).encode(): (400, "field 'prompts': this reward scores images against prompts"),
        json.dumps({"images": [good], "prompts": ["a", "b"]}).encode(): (400, "1 images"),
        json.dumps({"images": [good], "prompts": [3]}).encode(): (400, "prompts[0]: expected a string"),
    }
    for body, (status, message) in cases.items():
        got, answer = _post(url, body)
        assert got == status and message in answer["error"], (body[:40], got, answer)
    got, answer = _post(f"{server}/pickscore", json.dumps({"images": [good], "prompts": "x"}).encode())
    assert got == 404 and "serves /clip-score" in answer["error"]
    got, answer = _post(url, b"{}", method="PUT")
    assert got == 405 and "error" in answer
    # still serving, and a malformed request sent among good ones fails only itself
    remote = load_reward(url)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(remote, _images(2, seed=i), "a red circle") for i in range(3)]
        bad = pool.submit(_post, url, json.dumps({"images": [good], "prompts": ["a", "b"]}).encode())
        for i, future in enumerate(futures):
            assert torch.allclose(future.result(), clip(_images(2, seed=i), "a red circle"), atol=1e-4)
        assert bad.result()[0] == 400
    with pytest.raises(RewardInputError, match=r"reward server .*: 400 field 'prompts'"):
        remote.score_batch(_images(1), None)


class Touchy(Reward):
    """Mean pixel value; refuses the prompt "refuse" and fails on the prompt "crash"."""

    name = "touchy"

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        if "refuse" in prompts:
            raise RewardInputError("prompt 'refuse' refused")
        if "crash" in prompts:
            raise RuntimeError("out of memory")
        return images.mean(dim=(1, 2, 3))


def test_a_request_the_reward_fails_on_fails_alone():
    with serving(build_app(Touchy(), "touchy", max_wait_ms=200)) as base:
        url, images = f"{base}/touchy", _images(3, seed=7)
        remote = load_reward(url, batch_size=1)
        with ThreadPoolExecutor(3) as pool:
            futures = {p: pool.submit(remote, images[:1], p) for p in ("fine", "refuse", "crash")}
            assert torch.allclose(futures["fine"].result(), images[:1].mean(dim=(1, 2, 3)), atol=1e-6)
            with pytest.raises(RewardInputError, match="400 prompt 'refuse' refused"):
                futures["refuse"].result()
            with pytest.raises(RewardInputError, match="500 the reward failed: RuntimeError: out of memory"):
                futures["crash"].result()
        assert torch.allclose(remote(images, "fine"), images.mean(dim=(1, 2, 3)), atol=1e-6)
        info = json.loads(urllib.request.urlopen(url, timeout=30).read())
        assert info["requests"] == 4 and info["calls"] >= 2


def test_the_client_goes_where_reward_names_go(clip, server):
    url = f"{server}/clip-score"
    images = _images(4, seed=3)
    gold = load_reward("shapes-gold")(images, PROMPTS)
    summed = load_reward({url: 0.5, "shapes-gold": 2.0})
    assert torch.allclose(summed(images, PROMPTS), 0.5 * clip(images, PROMPTS) + 2 * gold, atol=1e-4)
    clips = images[:, :, None].expand(-1, -1, 3, -1, -1)  # videos: frames are sent as images
    assert torch.allclose(load_reward(url)(clips, PROMPTS), clip(clips, PROMPTS), atol=1e-4)
    mesh = trimesh.creation.box()
    views = load_reward(f"mesh-views:{url}", views=2, size=32)
    rendered = (views.render(mesh)[0] * 255).round() / 255  # the views as the PNGs carry them
    assert torch.allclose(views(mesh, "a cube"), clip(rendered, "a cube").mean(), atol=1e-4)
    with pytest.raises(RewardInputError, match=r"reward server http://127\.0\.0\.1:\d+/clip-score: not reachable"):
        load_reward(f"http://127.0.0.1:{free_port()}/clip-score")


def test_serve_reward_command_serves_until_stopped(tiny_clip_dir, clip):
    port = free_port()
    command = [sys.executable, "-m", "mmalign.cli", "serve-reward", "clip-score", "--path", str(tiny_clip_dir),
               "--port", str(port), "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}/clip-score"
        deadline = time.monotonic() + 120
        while True:
            try:
                remote = load_reward(url)
                break
            except RewardInputError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        images = _images(3, seed=5)
        assert torch.allclose(remote(images, "a red circle"), clip(images, "a red circle"), atol=1e-4)
        assert _post(url, b"nope")[0] == 400 and process.poll() is None
    finally:
        process.terminate()
        process.wait(30)


def _clips(n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` balls-world clips `(17, 32, 32, 3)` uint8."""
    rng = np.random.default_rng(seed)
    return [balls_world.render(caption, rng) for caption in balls_world.captions("train")[:n]]


def _array(shape: tuple[int, ...], dtype: str = "uint8") -> dict:
    return encode_array(np.zeros(shape, dtype))


@pytest.fixture(scope="module")
def physics():
    return load_reward("balls-physics")


@pytest.fixture(scope="module")
def physics_server(physics):
    """A balls-physics (video) server on a free 127.0.0.1 port, gathering requests for up to 50 ms."""
    with serving(build_app(physics, "balls-physics", max_wait_ms=50)) as base:
        yield f"{base}/balls-physics"


def test_video_rewards_through_the_server_equal_in_process_scores(clip, physics, physics_server):
    remote = load_reward(physics_server, batch_size=2)  # 2 requests for 4 clips
    assert remote.file_kind == "video" and not remote.needs_prompts and ".mp4" in remote.file_suffixes
    clips = _clips(3) + [_clips(1, seed=1)[0][:9]]  # a shorter clip: scored in its own call
    assert torch.equal(remote(clips), physics(clips))
    tensor = torch.from_numpy(np.stack(clips[:3])).permute(0, 4, 1, 2, 3).float() / 255  # (N, 3, T, H, W)
    assert torch.equal(remote(tensor), physics(tensor))
    # a video reward with prompts; the client is a video reward wherever the kind is checked
    framed = wrapper_class("video:")(clip, frames=4)
    with serving(build_app(framed, "video-clip")) as base:
        served = load_reward(f"{base}/video-clip")
        assert served.file_kind == "video" and served.needs_prompts
        assert torch.allclose(served(clips, PROMPTS), framed(clips, PROMPTS), atol=1e-4)
        summed = load_reward({f"{base}/video-clip": 0.5, physics_server: 2.0})
        expected = 0.5 * framed(clips, PROMPTS) + 2 * physics(clips)
        assert summed.file_kind == "video" and torch.allclose(summed(clips, PROMPTS), expected, atol=1e-4)
        with pytest.raises(RewardInputError, match="video: takes an image reward"):
            load_reward(f"video:{base}/video-clip")


def test_concurrent_video_clients_are_batched(physics, physics_server):
    remote = load_reward(physics_server)
    clips = _clips(6, seed=2)
    before = json.loads(urllib.request.urlopen(physics_server, timeout=30).read())
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda clip: remote([clip]), clips))
    assert torch.equal(torch.cat(results), physics(clips))
    after = json.loads(urllib.request.urlopen(physics_server, timeout=30).read())
    assert after["requests"] - before["requests"] == 6 and after["scored"] - before["scored"] == 6
    assert after["calls"] - before["calls"] < 6


def test_mesh_rewards_through_the_server_equal_in_process_scores(clip, tmp_path):
    views = wrapper_class("mesh-views:")(clip, views=2, size=32)
    trimesh.creation.cylinder(radius=0.3, height=1.0, sections=8).export(tmp_path / "cylinder.ply")
    meshes = [trimesh.creation.box(), trimesh.creation.icosphere(subdivisions=1), str(tmp_path / "cylinder.ply")]
    prompts = PROMPTS[:3]
    with serving(build_app(views, "mesh-views", max_wait_ms=50)) as base:
        remote = load_reward(f"{base}/mesh-views", batch_size=2)
        assert remote.file_kind == "mesh" and ".obj" in remote.file_suffixes
        assert torch.allclose(remote(meshes, prompts), views(meshes, prompts), atol=1e-4)
        assert torch.allclose(remote(str(tmp_path), "a cube"), views(str(tmp_path), "a cube"), atol=1e-4)  # a folder
        with pytest.raises(RewardInputError, match="mesh-views: takes an image reward"):
            load_reward(f"mesh-views:{base}/mesh-views")
        # malformed meshes: 400 naming the field, and the server keeps serving
        box = trimesh.creation.box()
        good = {"vertices": encode_array(box.vertices), "faces": encode_array(box.faces)}
        flat = {
            "vertices": encode_array(np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]])),
            "faces": encode_array(np.array([[0, 1, 2]])),
        }
        nan = np.array(box.vertices)
        nan[0, 0] = np.nan
        cases = {
            "meshes[0]: expected a mesh": [{"vertices": good["vertices"]}],
            "meshes[0].vertices: shape [8, 2]: expected [V, 3]": [{**good, "vertices": _array((8, 2), "float64")}],
            "meshes[0].faces: dtype 'float32'; expected 'int64' or 'int32'": [
                {**good, "faces": _array((12, 3), "float32")}
            ],
            "meshes[0].faces: index 8 is outside the vertices 0..7": [
                {**good, "faces": encode_array(np.array([[0, 1, 8]]))}
            ],
            "meshes[1].vertices: 1 of 8 vertices have NaN": [good, {**good, "vertices": encode_array(nan)}],
            "meshes[0]: all 1 faces are degenerate": [flat],
            "meshes[0].vertices: data: not valid base64": [{**good, "vertices": {**good["vertices"], "data": "@@"}}],
        }
        for message, items in cases.items():
            got, answer = _post(
                f"{base}/mesh-views", json.dumps({"kind": "mesh", "meshes": items, "prompts": "x"}).encode()
            )
            assert got == 400 and message in answer["error"], (message, got, answer)
        got, answer = _post(
            f"{base}/mesh-views", json.dumps({"kind": "mesh", "meshes": [good], "prompts": "x"}).encode()
        )
        assert got == 200 and answer["scores"][0] == pytest.approx(float(views(box, "x")[0]), abs=1e-4)


def test_wrong_kind_and_malformed_videos_get_a_4xx_and_the_server_keeps_serving(clip, physics, physics_server, server):
    png = encode_png(_images(1)[0])
    clip_array = encode_array(_clips(1)[0])
    cases = {
        (
            physics_server,
            json.dumps({"images": [png]}),
        ): 'this server\'s reward scores videos, not images; send "kind": "video"',
        (physics_server, json.dumps({"kind": "mesh", "meshes": [{}]})): "scores videos, not meshes",
        (physics_server, json.dumps({"kind": "video", "images": [png]})): "field 'images': a request of kind 'video'",
        (physics_server, json.dumps({"kind": "audio", "videos": []})): "field 'kind': expected one of 'image', 'video'",
        (physics_server, json.dumps({"kind": ["video"], "videos": []})): "field 'kind': expected one of",
        (f"{server}/clip-score", json.dumps({"kind": "video", "videos": [clip_array], "prompts": "x"})): (
            'scores images, not videos; send "kind": "image"'
        ),
        (physics_server, json.dumps({"kind": "video", "videos": "x"})): "field 'videos': expected a non-empty list",
        (physics_server, json.dumps({"kind": "video", "videos": [png]})): 'videos[0]: expected an array {"shape"',
        (physics_server, json.dumps({"kind": "video", "videos": [_array((2, 4, 4, 3), "float32")]})): (
            "videos[0]: dtype 'float32'; expected 'uint8'"
        ),
        (physics_server, json.dumps({"kind": "video", "videos": [_array((17, 32, 32))]})): (
            "videos[0]: shape [17, 32, 32]: expected [T, H, W, 3]"
        ),
        (physics_server, json.dumps({"kind": "video", "videos": [{**_array((2, 4, 4, 3)), "shape": [0, 4, 4, 3]}]})): (
            "shape [0, 4, 4, 3]"
        ),
        (
            physics_server,
            json.dumps({"kind": "video", "videos": [{**_array((2, 4, 4, 3)), "shape": [2, 4, 4, 3.5]}]}),
        ): ("expected [T, H, W, 3]"),
        (
            physics_server,
            json.dumps({"kind": "video", "videos": [clip_array, _array((2, 4, 4, 3)) | {"data": "AAAA"}]}),
        ): ("videos[1]: 3 bytes of data; shape [2, 4, 4, 3] of uint8 takes 96"),
        (
            physics_server,
            json.dumps({"kind": "video", "videos": [clip_array], "prompts": [1]}),
        ): "prompts[0]: expected a string",
    }
    for (url, body), message in cases.items():
        got, answer = _post(url, body.encode())
        assert got == 400 and message in answer["error"], (body[:60], got, answer)
    clips = _clips(2, seed=3)
    assert torch.equal(load_reward(physics_server)(clips), physics(clips))
    assert torch.allclose(load_reward(f"{server}/clip-score")(_images(1), "x"), clip(_images(1), "x"), atol=1e-4)


def test_requests_over_the_size_limits_get_413_and_the_client_splits_under_them(physics):
    clips = _clips(3, seed=4)  # each about 70 kB as base64
    with serving(build_app(physics, "balls-physics", max_request_items=2, max_request_mb=0.1)) as base:
        url = f"{base}/balls-physics"
        info = json.loads(urllib.request.urlopen(url, timeout=30).read())
        assert info["kind"] == "video" and info["max_request_bytes"] == 104857 and info["max_request_items"] == 2
        got, answer = _post(url, json.dumps({"kind": "video", "videos": [encode_array(c) for c in clips[:2]]}).encode())
        assert got == 413 and "at most 104857 bytes (--max-request-mb)" in answer["error"]
        small = [encode_array(c[:2, :4, :4]) for c in clips]
        got, answer = _post(url, json.dumps({"kind": "video", "videos": small}).encode())
        assert got == 413 and "3 videos; this server takes at most 2" in answer["error"]
        remote = load_reward(url)  # one clip per request: two would pass the byte limit
        assert torch.equal(remote(clips), physics(clips))
        assert json.loads(urllib.request.urlopen(url, timeout=30).read())["requests"] == 3
        with pytest.raises(RewardInputError, match="sample 0: .* bytes encoded; .* at most 104857 bytes"):
            remote([np.zeros((40, 32, 32, 3), np.uint8)])
    with serving(build_app(Touchy(), "touchy", max_request_mb=0.1)) as base:  # PNGs decode to ≤ 4 × 0.1 MiB
        got, answer = _post(
            f"{base}/touchy", json.dumps({"images": [encode_png(torch.zeros(3, 400, 400))], "prompts": "x"}).encode()
        )
        assert got == 413 and "images[0]: a 400×400 image" in answer["error"]


def test_serve_reward_command_serves_video_and_mesh_rewards(monkeypatch):
    from mmalign import cli
    from mmalign.rewards import server

    served = []
    monkeypatch.setattr(server, "serve", lambda reward, route, *args: served.append((reward, route, args)))
    assert cli.main(["serve-reward", "balls-physics", "--max-request-mb", "2"]) == 0
    reward, route, args = served[0]
    assert reward.file_kind == "video" and route == "balls-physics" and args[-1] == 2.0
