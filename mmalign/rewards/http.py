"""A reward served over HTTP by `mmalign serve-reward`, and the wire format both sides share.

Wire format (JSON over HTTP, `POST http://host:port/<name>`); `"kind"` says what the items are and
the items go in the field named after it (`images`, `videos` or `meshes`):

    image:  {"kind": "image", "images": ["<base64 PNG>", …], "prompts": …}     # "kind" may be left out
    video:  {"kind": "video", "videos": [<array uint8 (T, H, W, 3)>, …], "prompts": …}
    mesh:   {"kind": "mesh", "meshes": [{"vertices": <array float64 or float32 (V, 3)>,
                                         "faces": <array int64 or int32 (F, 3)>}, …], "prompts": …}
    array:  {"shape": [T, H, W, 3], "dtype": "uint8", "data": "<base64 of the C-order little-endian bytes>"}
    prompts: ["…", …] (one per item) | "one prompt for all" | null
    200:      {"reward": "<name>", "scores": [float | null, …]}      # one per item; null = NaN
    4xx/5xx:  {"error": "<one line naming the field, e.g. videos[2]: shape [17, 32, 32]: expected [T, H, W, 3]>"}

`GET http://host:port/<name>` answers `{"reward", "kind", "needs_prompts", "max_batch",
"max_wait_ms", "max_request_items", "max_request_bytes", "requests", "calls", "scored"}` (the last
three count requests served, `reward(...)` calls made and items scored since start). A server
scores one kind, its reward's: a request of another kind is refused (400) naming the kind expected.

Images are 8-bit RGB PNGs (any mode PIL reads is converted to RGB; other formats PIL reads are
accepted too), and video frames 8-bit RGB, so a float image or clip in [0, 1] is rounded to 1/255 on
the way: a server's score equals the in-process score of the rounded input. A mesh travels as its
triangles, vertices and faces exactly as `mmalign.mesh.io.load_mesh(..., normalise=False)` reads them
(merged, validated; textures and colours are not sent), in float64 as trimesh holds them, so its
score equals the in-process one.

`HttpReward(url)` (what `load_reward("http://host:port/name")` returns) takes the kind of the served
reward from the info route when constructed (`file_kind`: `image`, `video` or `mesh`), so it goes
wherever a reward of that kind goes. It sends at most `batch_size` items per request, and fewer
where they would pass the server's `max_request_bytes`. The client of an image reward scores videos
and meshes as image rewards do, by sending their sampled frames or rendered views
(`mmalign.rewards.media`); the client of a video or mesh reward sends the clips or meshes.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmalign.data.images import IMAGE_ERRORS, to_rgb
from mmalign.data.video import VIDEO_SUFFIXES
from mmalign.io import expand_files
from mmalign.registry import import_string
from mmalign.rewards.base import Reward, RewardInputError, broadcast_prompts
from mmalign.rewards.media import MESH_SUFFIXES
from mmalign.rewards.video import as_video_batch

#: what a request's items are, and the field that holds them
KINDS: dict[str, str] = {"image": "images", "video": "videos", "mesh": "meshes"}
#: dtypes each array of the wire format may take (the client sends the first)
VIDEO_DTYPES = ("uint8",)
VERTEX_DTYPES = ("float64", "float32")
FACE_DTYPES = ("int64", "int32")


class PayloadTooLarge(RewardInputError):
    """A request (or one of its items) over the server's size limits: HTTP 413."""

    status = 413


def encode_png(image: torch.Tensor) -> str:
    """`(3, H, W)` float in [0, 1] → base64 text of an 8-bit RGB PNG (values rounded to 1/255)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _base64_bytes(text: Any, where: str, expected: str) -> bytes:
    """The bytes of base64 `text`; a `RewardInputError` naming `where` when it is not `expected` (a string)
    or not valid base64."""
    if not isinstance(text, str):
        raise RewardInputError(f"{where}: expected {expected}, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RewardInputError(f"{where}: not valid base64") from None


def decode_png(text: Any, where: str, max_pixels: int | None = None) -> torch.Tensor:
    """base64 text of an image → `(3, H, W)` float in [0, 1]; a `RewardInputError` naming `where` otherwise
    (`PayloadTooLarge` for an image of more than `max_pixels` pixels, refused before it is decoded)."""
    data = _base64_bytes(text, where, "a base64 PNG string")
    unreadable = f"{where}: not a readable image (expected a base64-encoded PNG)"
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except IMAGE_ERRORS:
        raise RewardInputError(unreadable) from None
    with image:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise PayloadTooLarge(
                f"{where}: a {image.width}×{image.height} image; this request may decode to at most "
                f"{max_pixels} more pixels"
            )
        try:
            array = np.asarray(to_rgb(image))
        except IMAGE_ERRORS:
            raise RewardInputError(unreadable) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """An array → `{"shape", "dtype", "data"}`: base64 of its C-order little-endian bytes."""
    array = np.ascontiguousarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"shape": list(array.shape), "dtype": array.dtype.name, "data": base64.b64encode(little.tobytes()).decode()}


def decode_array(value: Any, where: str, dtypes: Sequence[str], shape: Sequence[int | str]) -> np.ndarray:
    """`{"shape", "dtype", "data"}` → a writable array; a `RewardInputError` naming `where` unless the dtype
    is one of `dtypes` and the shape matches `shape` (an int is a fixed size, a letter any size ≥ 1)."""
    pattern = f"[{', '.join(str(s) for s in shape)}]"
    if not isinstance(value, dict) or set(value) != {"shape", "dtype", "data"}:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise RewardInputError(f'{where}: expected an array {{"shape", "dtype", "data"}}, got {got}')
    dtype, dims, text = value["dtype"], value["shape"], value["data"]
    if dtype not in dtypes:
        raise RewardInputError(f"{where}: dtype {dtype!r}; expected {' or '.join(repr(d) for d in dtypes)}")
    if (
        not isinstance(dims, list)
        or len(dims) != len(shape)
        or not all(type(d) is int and d >= 1 for d in dims)
        or any(isinstance(s, int) and d != s for d, s in zip(dims, shape))
    ):
        raise RewardInputError(f"{where}: shape {json.dumps(dims)}: expected {pattern}")
    data = _base64_bytes(text, f"{where}: data", "a base64 string")
    native = np.dtype(dtype)
    expected = math.prod(dims) * native.itemsize
    if len(data) != expected:
        raise RewardInputError(f"{where}: {len(data)} bytes of data; shape {dims} of {dtype} takes {expected}")
    return np.frombuffer(data, native.newbyteorder("<")).astype(native).reshape(dims)


def encode_clip(clip: torch.Tensor) -> dict[str, Any]:
    """`(3, T, H, W)` float in [0, 1] → the wire array of its uint8 frames `(T, H, W, 3)` (rounded to 1/255)."""
    return encode_array((clip.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0).cpu().numpy())


def decode_clip(value: Any, where: str) -> torch.Tensor:
    """The wire array of a clip → uint8 frames `(T, H, W, 3)`."""
    return torch.from_numpy(decode_array(value, where, VIDEO_DTYPES, ("T", "H", "W", 3)))


def mesh_items(samples: Any) -> list[Any]:
    """One mesh (a path or a trimesh object), a folder of mesh files, or a sequence of these → a list."""
    if isinstance(samples, (str, Path)) or type(samples).__module__.startswith("trimesh"):
        samples = [samples]
    out: list[Any] = []
    for item in samples:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            out.extend(expand_files([item], MESH_SUFFIXES, "mesh"))
        else:
            out.append(item)
    return out


def encode_mesh(mesh: Any, where: str) -> dict[str, Any]:
    """A mesh file or trimesh object → `{"vertices", "faces"}` wire arrays of its validated triangles
    (`mmalign.mesh.io.load_mesh(..., normalise=False)`, whose `MeshInputError` names `where`)."""
    load_mesh = import_string("mmalign.mesh.io:load_mesh")
    loaded = load_mesh(mesh, normalise=False, name=None if isinstance(mesh, (str, Path)) else where)
    vertices = np.asarray(loaded.vertices, dtype=np.float64)
    return {"vertices": encode_array(vertices), "faces": encode_array(np.asarray(loaded.faces, dtype=np.int64))}


def decode_mesh(value: Any, where: str) -> Any:
    """`{"vertices", "faces"}` wire arrays → a validated `trimesh.Trimesh` (vertices and faces as sent)."""
    import trimesh

    if not isinstance(value, dict) or set(value) != {"vertices", "faces"}:
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise RewardInputError(f'{where}: expected a mesh {{"vertices", "faces"}}, got {got}')
    vertices = decode_array(value["vertices"], f"{where}.vertices", VERTEX_DTYPES, ("V", 3)).astype(np.float64)
    faces = decode_array(value["faces"], f"{where}.faces", FACE_DTYPES, ("F", 3)).astype(np.int64)
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices).all(axis=1)).sum())
        raise RewardInputError(f"{where}.vertices: {bad} of {len(vertices)} vertices have NaN or infinite coordinates")
    if faces.min() < 0 or faces.max() >= len(vertices):
        index = int(faces.min()) if faces.min() < 0 else int(faces.max())
        raise RewardInputError(f"{where}.faces: index {index} is outside the vertices 0..{len(vertices) - 1}")
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    try:
        import_string("mmalign.mesh.io:validate_mesh")(mesh, where)
    except ValueError as error:  # MeshInputError: degenerate or absurdly sized
        raise RewardInputError(str(error)) from None
    return mesh


class HttpReward(Reward):
    """The reward served at `url` (`http://host:port/<name>`) by `mmalign serve-reward`.

    Its `name`, `needs_prompts` and input kind (`file_kind`: `image`, `video` or `mesh`) are the served
    reward's, read from the server when constructed (module doc).

    Args:
        url: the served reward's address.
        timeout: seconds to wait for each request.
        batch_size: items (images, clips or meshes) sent per request at most.
        device: accepted for the same call shape as local rewards; scoring happens on the server.
    """

    def __init__(self, url: str, timeout: float = 300.0, batch_size: int = 64, device: Any = None):
        self.url, self.timeout, self.batch_size = url.rstrip("/"), float(timeout), int(batch_size)
        info = self._request(None)
        self.name = str(info.get("reward", url))
        self.needs_prompts = bool(info.get("needs_prompts", True))
        kind = info.get("kind", "image")
        if kind not in KINDS:
            raise RewardInputError(
                f"reward server {self.url}: serves {kind!r} items; this client sends {', '.join(KINDS)}"
            )
        self.file_kind = kind
        if kind != "image":  # what `mmalign score` collects from folders
            self.file_suffixes = VIDEO_SUFFIXES if kind == "video" else MESH_SUFFIXES
        limit = info.get("max_request_bytes")
        self.max_request_bytes = int(limit) if isinstance(limit, int) and limit > 0 else None

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

    def _post(self, items: list[Any], prompts: list[str] | None) -> torch.Tensor:
        """POST one request of encoded `items` → `(len(items),)` scores (NaN where the server answers null)."""
        answer = self._request({"kind": self.file_kind, KINDS[self.file_kind]: items, "prompts": prompts})
        scores = answer.get("scores")
        if not isinstance(scores, list) or len(scores) != len(items):
            raise RewardInputError(f"reward server {self.url}: expected {len(items)} scores, got {scores!r}")
        return torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float32)

    def _requests(self, encoded: Iterator[Any], prompts: list[str] | None) -> Iterator[tuple[list[Any], list | None]]:
        """Encoded items gathered into requests of at most `batch_size` items and `max_request_bytes` bytes."""
        budget = (
            None if self.max_request_bytes is None else self.max_request_bytes - min(4096, self.max_request_bytes // 8)
        )  # the envelope
        items: list[Any] = []
        size, start = 0, 0
        for i, item in enumerate(encoded):
            cost = len(json.dumps(item)) + (0 if prompts is None else len(json.dumps(prompts[i])) + 2)
            if budget is not None and cost > budget:
                raise PayloadTooLarge(
                    f"sample {i}: {cost} bytes encoded; the reward server {self.url} takes requests of at most "
                    f"{self.max_request_bytes} bytes (mmalign serve-reward --max-request-mb)"
                )
            if items and (len(items) == self.batch_size or (budget is not None and size + cost > budget)):
                yield items, None if prompts is None else prompts[start:i]
                items, size, start = [], 0, i
            items.append(item)
            size += cost
        if items:
            yield items, None if prompts is None else prompts[start:]

    def _score_items(
        self, encoded: Iterator[Any], n: int, prompts: list[str] | None, progress: bool | None
    ) -> torch.Tensor:
        show = n > self.progress_threshold if progress is None else progress
        scores = []
        with tqdm(total=n, desc=f"scoring ({self.name})", disable=not show, unit=self.file_kind) as bar:
            for items, chunk_prompts in self._requests(encoded, prompts):
                scores.append(self._post(items, chunk_prompts))
                bar.update(len(items))
        return torch.cat(scores) if scores else torch.zeros(0)

    def __call__(
        self, samples: Any, prompts: str | Sequence[str] | None = None, progress: bool | None = None
    ) -> torch.Tensor:
        """Scores `(N,)` of `samples` against `prompts`: images (and, through frames or views, videos and
        meshes) for an image reward, clips for a video reward, meshes for a mesh reward (module doc)."""
        if self.file_kind == "image":
            return super().__call__(samples, prompts, progress)
        if self.file_kind == "video":
            items: Any = as_video_batch(samples)
            encoded: Iterator[Any] = (encode_clip(clip) for clip in items)
        else:
            items = mesh_items(samples)
            encoded = (encode_mesh(mesh, f"mesh {i}") for i, mesh in enumerate(items))
        prompt_list = broadcast_prompts(prompts, len(items), self.needs_prompts)
        return self._score_items(encoded, len(items), prompt_list, progress)

    def score_batch(self, images: Any, prompts: list[str] | None) -> torch.Tensor:
        """Scores `(N,)` from the server of `images (N, 3, H, W)` in [0, 1] — or, for a video reward, of
        `videos (N, 3, T, H, W)`, for a mesh reward of a list of meshes (NaN where it answers null)."""
        if self.file_kind == "image":
            return self._score_items((encode_png(im) for im in images), len(images), prompts, False)
        return self(images, prompts, progress=False)
