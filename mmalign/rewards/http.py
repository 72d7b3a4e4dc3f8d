"""A reward served over HTTP by `mmalign serve-reward`, and the wire format both sides share.

Wire format (JSON over HTTP, `POST http://host:port/<name>`):

    request:  {"images": ["<base64 PNG>", …], "prompts": ["…", …] | "one prompt for all" | null}
    200:      {"reward": "<name>", "scores": [float | null, …]}      # one per image; null = NaN
    4xx/5xx:  {"error": "<one line naming the field, e.g. images[2]: not a base64-encoded image>"}

`GET http://host:port/<name>` answers `{"reward", "needs_prompts", "max_batch", "max_wait_ms",
"requests", "calls", "scored"}` (the last three count requests served, `reward(...)` calls made and
images scored since start). Images are 8-bit RGB PNGs (any mode PIL reads is converted to RGB;
other formats PIL reads are accepted too), so a float image in [0, 1] is rounded to 1/255 on the
way: a server's score equals the in-process score of the rounded image.

`HttpReward(url)` (what `load_reward("http://host:port/name")` returns) is an image reward: it
sends `batch_size` images per request, and, being an image reward, scores videos and meshes by
sending their sampled frames or rendered views (`mmalign.rewards.media`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.data.images import IMAGE_ERRORS, to_rgb
from mmalign.rewards.base import Reward, RewardInputError


def encode_png(image: torch.Tensor) -> str:
    """`(3, H, W)` float in [0, 1] → base64 text of an 8-bit RGB PNG (values rounded to 1/255)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: Any, where: str) -> torch.Tensor:
    """base64 text of an image → `(3, H, W)` float in [0, 1]; a `RewardInputError` naming `where` otherwise."""
    if not isinstance(text, str):
        raise RewardInputError(f"{where}: expected a base64 PNG string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RewardInputError(f"{where}: not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(to_rgb(image))
    except IMAGE_ERRORS:
        raise RewardInputError(f"{where}: not a readable image (expected a base64-encoded PNG)") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


class HttpReward(Reward):
    """The reward served at `url` (`http://host:port/<name>`) by `mmalign serve-reward`.

    Args:
        url: the served reward's address.
        timeout: seconds to wait for each request.
        batch_size: images sent per request.
        device: accepted for the same call shape as local rewards; scoring happens on the server.
    """

    def __init__(self, url: str, timeout: float = 300.0, batch_size: int = 64, device: Any = None):
        self.url, self.timeout, self.batch_size = url.rstrip("/"), float(timeout), int(batch_size)
        info = self._request(None)
        self.name = str(info.get("reward", url))
        self.needs_prompts = bool(info.get("needs_prompts", True))

    def _request(self, payload: dict[str, Any] | None) -> dict[str, Any]:
        """GET (payload None) or POST `payload` as JSON to the server; its JSON answer, or a one-line error."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                message = json.loads(error.read()).get("error", error.reason)
            except (ValueError, AttributeError):
                message = error.reason
            raise RewardInputError(f"reward server {self.url}: {error.code} {message}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RewardInputError(f"reward server {self.url}: not reachable ({reason})") from None

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """`images (N, 3, H, W)` in [0, 1] → `(N,)` scores from the server (NaN where it answers null)."""
        answer = self._request({"images": [encode_png(im) for im in images], "prompts": prompts})
        scores = answer.get("scores")
        if not isinstance(scores, list) or len(scores) != len(images):
            raise RewardInputError(f"reward server {self.url}: expected {len(images)} scores, got {scores!r}")
        return torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float32)
