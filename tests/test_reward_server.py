"""The HTTP reward server: scores equal in-process ones, concurrent requests are batched, bad requests get
a 4xx JSON error and the server keeps serving; the client reward goes wherever a reward name goes."""

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

import pytest
import torch
import trimesh

from mmalign.rewards import Reward, RewardInputError, load_reward
from mmalign.rewards.http import encode_png
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
