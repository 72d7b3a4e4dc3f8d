"""An HTTP server for any reward (FastAPI + uvicorn): `mmalign serve-reward NAME --port 8300`.

Image, video and mesh rewards are served alike. Routes (the wire format is in `mmalign.rewards.http`):

- `POST /<name>`: score `{"kind": "image" | "video" | "mesh", "images" | "videos" | "meshes": […],
  "prompts": …}` → `{"reward", "scores"}`;
- `GET /<name>`: what is served (`kind`, limits) and counters (`requests`, `calls`, `scored`);
- `GET /health`: `{"status": "ok"}`.

The server scores the kind of items its reward declares (`file_kind`: images unless the reward says
videos or meshes); a request of another kind gets a 400 naming the kind expected.

Concurrent requests are batched: a queue takes each request's decoded items (images, clips or meshes);
a single worker takes the first waiting request, then keeps gathering requests until `max_batch` items
are gathered or `max_wait_ms` has passed since the first, and scores them with one `reward(...)` call
(images and clips: one call per size, a clip's size being its frame count and frame size; meshes: one
call; the reward splits a call into its own `batch_size` chunks). Scores go back to each request in
order. If a gathered batch fails, each of its requests is scored alone, so one bad request fails only
itself.

Limits: a request body of at most `max_request_bytes` bytes and `max_request_items` items (413
otherwise); a request's PNG images may decode to at most `DECODED_FACTOR` × `max_request_bytes` bytes of
RGB pixels (413: PNG compresses, and a small file can hold a huge image). Videos and meshes travel raw,
so the body limit bounds them.

Errors are JSON `{"error": "<one line>"}`: 400 for a body that is not JSON, a missing or ill-typed
field (named: `images[3]: not valid base64`, `videos[0]: shape [17, 32, 32]: expected [T, H, W, 3]`,
`meshes[1].faces: index 9 is outside the vertices 0..7`), a request of the wrong kind, or input the
reward refuses; 404 for another route; 405 for another method; 413 for a request over the limits;
500 when the reward itself fails. None of them stops the server.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mmalign.errors import UserInputError
from mmalign.rewards.base import Reward, RewardInputError
from mmalign.rewards.http import KINDS, PayloadTooLarge, decode_clip, decode_mesh, decode_png

REQUEST_KEYS = ("kind", *KINDS.values(), "prompts")
MAX_REQUEST_MB = 128.0
DECODED_FACTOR = 4


class RequestError(RewardInputError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def reward_kind(reward: Reward) -> str:
    """What `reward` scores: `image`, `video` or `mesh` (its `file_kind`; images when it declares none)."""
    kind = getattr(reward, "file_kind", "image")
    if kind not in KINDS:
        raise RewardInputError(f"{reward.name} scores {kind}s; the server takes {', '.join(KINDS)} rewards")
    return kind


@dataclass
class Pending:
    """One request waiting in the queue: its decoded items, prompts, and where its scores go.

    Items are images `(3, H, W)` float in [0, 1], clips `(T, H, W, 3)` uint8, or `trimesh.Trimesh` meshes."""

    items: list[Any]
    prompts: list[str] | None
    future: asyncio.Future


def parse_request(
    body: Any, kind: str, needs_prompts: bool, max_items: int, max_pixels: int | None = None
) -> tuple[list[Any], list[str] | None]:
    """A decoded JSON body → the items of `kind` (see `Pending`) and prompts (one per item, or None).

    Raises `RequestError` naming the field at fault; `max_pixels` bounds the pixels a request's images decode to."""
    field = KINDS[kind]
    if not isinstance(body, dict):
        raise RequestError(f"body: expected a JSON object with 'kind', {field!r} (and 'prompts')")
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(f"body: unknown field {unknown[0]!r}; expected {', '.join(REQUEST_KEYS)}")
    asked = body.get("kind", "image")
    if not isinstance(asked, str) or asked not in KINDS:
        choices = ", ".join(repr(k) for k in KINDS)
        raise RequestError(f"field 'kind': expected one of {choices}, got {json.dumps(asked)}")
    if asked != kind:
        raise RequestError(
            f"field 'kind': this server's reward scores {field}, not {KINDS[asked]}; "
            f'send "kind": "{kind}" with {field!r}'
        )
    misplaced = sorted(set(body) & set(KINDS.values()) - {field})
    if misplaced:
        raise RequestError(f"field {misplaced[0]!r}: a request of kind {kind!r} sends its items in {field!r}")
    items = body.get(field)
    what = {"image": "base64 PNG strings", "video": "video arrays", "mesh": "meshes"}[kind]
    if not isinstance(items, list) or not items:
        raise RequestError(f"field {field!r}: expected a non-empty list of {what}")
    if len(items) > max_items:
        raise RequestError(f"field {field!r}: {len(items)} {field}; this server takes at most {max_items}", 413)
    prompts = body.get("prompts")
    if prompts is None:
        if needs_prompts:
            raise RequestError(
                f"field 'prompts': this reward scores {field} against prompts; send one or one per {kind}"
            )
    elif isinstance(prompts, str):
        prompts = [prompts] * len(items)
    elif isinstance(prompts, list):
        if len(prompts) != len(items):
            raise RequestError(f"field 'prompts': {len(prompts)} prompts for {len(items)} {field}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise RequestError(f"prompts[{i}]: expected a string, got {type(prompt).__name__}")
    else:
        raise RequestError(f"field 'prompts': expected a string or a list of strings, got {type(prompts).__name__}")
    try:
        decoded: list[Any] = []
        for i, item in enumerate(items):
            where = f"{field}[{i}]"
            if kind == "image":
                image = decode_png(item, where, max_pixels)
                decoded.append(image)
                if max_pixels is not None:
                    max_pixels -= image.shape[1] * image.shape[2]
            else:
                decoded.append(decode_clip(item, where) if kind == "video" else decode_mesh(item, where))
    except RequestError:
        raise
    except PayloadTooLarge as error:
        raise RequestError(str(error), 413) from None
    except RewardInputError as error:
        raise RequestError(str(error)) from None
    return decoded, prompts


class Batcher:
    """Gathers queued requests up to `max_batch` items or `max_wait_s`, then scores them in one call."""

    def __init__(self, reward: Reward, max_batch: int = 64, max_wait_s: float = 0.005):
        self.reward, self.max_batch, self.max_wait_s = reward, int(max_batch), float(max_wait_s)
        self.kind = reward_kind(reward)
        self.requests = self.calls = self.scored = 0
        self.queue: asyncio.Queue[Pending] | None = None
        self.task: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, items: list[Any], prompts: list[str] | None) -> list[float]:
        """Queue one request's decoded items (and prompts) and wait for their scores."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(items, prompts, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size, deadline = len(batch[0].items), loop.time() + self.max_wait_s
            while size < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
                size += len(batch[-1].items)
            try:
                results = await loop.run_in_executor(self.executor, self._score, batch)
            except Exception as error:  # the worker itself failed: every request of the batch gets it
                results = [error] * len(batch)
            for pending, result in zip(batch, results):
                if pending.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _score(self, batch: list[Pending]) -> list[list[float] | Exception]:
        """Scores per request, or the exception that request met (a failed batch is retried one request at a time)."""
        try:
            return self._score_together(batch)
        except Exception as error:
            if len(batch) == 1:
                return [error]
        out: list[list[float] | Exception] = []
        for pending in batch:
            try:
                out.extend(self._score_together([pending]))
            except Exception as error:
                out.append(error)
        return out

    def _score_together(self, batch: list[Pending]) -> list[list[float]]:
        items = [item for pending in batch for item in pending.items]
        with_prompts = all(p.prompts is not None for p in batch)
        prompts = [prompt for p in batch for prompt in p.prompts] if with_prompts else None
        scores = torch.empty(len(items))
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(items):  # images and clips: one call per size; meshes: one call
            groups.setdefault(None if self.kind == "mesh" else tuple(item.shape), []).append(i)
        for indices in groups.values():
            group_prompts = None if prompts is None else [prompts[i] for i in indices]
            if self.kind == "mesh":
                samples: Any = [items[i] for i in indices]
            elif self.kind == "video":  # uint8 (T, H, W, 3) → (N, 3, T, H, W) in [0, 1]
                samples = torch.stack([items[i] for i in indices]).permute(0, 4, 1, 2, 3).float() / 255.0
            else:
                samples = torch.stack([items[i] for i in indices])
            result = self.reward(samples, group_prompts, progress=False)
            scores[indices] = result.detach().float().cpu()
            self.calls += 1
        self.requests += len(batch)
        self.scored += len(items)
        values = [None if math.isnan(s) else s for s in scores.tolist()]
        out, start = [], 0
        for pending in batch:
            out.append(values[start : start + len(pending.items)])
            start += len(pending.items)
        return out


def build_app(
    reward: Reward,
    route: str,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    max_request_items: int = 1024,
    max_request_mb: float = MAX_REQUEST_MB,
) -> FastAPI:
    """The FastAPI application serving `reward` at `/<route>` (module doc); requests of at most
    `max_request_items` items and `max_request_mb` MiB."""
    batcher = Batcher(reward, max_batch, max_wait_ms / 1000)
    kind = batcher.kind
    max_bytes = int(max_request_mb * 2**20)
    if max_bytes < 1 or max_request_items < 1:
        raise RewardInputError(f"max_request_mb={max_request_mb}, max_request_items={max_request_items}: need > 0")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"mmalign reward server: {route}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(UserInputError)  # input the reward refuses (RewardInputError, MeshInputError, …)
    async def refused(request: Request, exc: UserInputError) -> JSONResponse:
        return error(getattr(exc, "status", 400), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, f"bad request: {exc.errors()[0].get('msg', exc)}" if exc.errors() else "bad request")

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        message = str(exc).splitlines()[0] if str(exc) else ""
        return error(500, f"the reward failed: {type(exc).__name__}: {message}")

    def check_route(name: str) -> None:
        if name != route:
            raise RequestError(f"no reward {name!r} here; this server serves /{route}", 404)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/{name}")
    async def info(name: str) -> dict[str, Any]:
        check_route(name)
        return {
            "reward": route,
            "kind": kind,
            "needs_prompts": reward.needs_prompts,
            "max_batch": batcher.max_batch,
            "max_wait_ms": max_wait_ms,
            "max_request_items": max_request_items,
            "max_request_bytes": max_bytes,
            "requests": batcher.requests,
            "calls": batcher.calls,
            "scored": batcher.scored,
        }

    @app.post("/{name}")
    async def score(name: str, request: Request) -> dict[str, Any]:
        check_route(name)
        too_large = f"this server takes requests of at most {max_bytes} bytes (--max-request-mb)"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise RequestError(f"body: {length} bytes; {too_large}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise RequestError(f"body: over {max_bytes} bytes; {too_large}", 413)
        items, prompts = await asyncio.to_thread(read_request, bytes(body))
        return {"reward": route, "scores": await batcher.score(items, prompts)}

    def read_request(body: bytes) -> tuple[list[Any], list[str] | None]:
        try:
            decoded = json.loads(body)
        except ValueError:
            raise RequestError("body: not valid JSON") from None
        max_pixels = DECODED_FACTOR * max_bytes // 3
        return parse_request(decoded, kind, reward.needs_prompts, max_request_items, max_pixels)

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (`http://host:port`), stops on exit."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="reward-server", daemon=True)
    thread.start()
    start = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - start > timeout:
            raise RuntimeError(f"the reward server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def serve(
    reward: Reward,
    route: str,
    host: str = "127.0.0.1",
    port: int = 8300,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    log_level: str = "info",
    max_request_mb: float = MAX_REQUEST_MB,
) -> None:
    """Serve `reward` at `http://host:port/<route>` until interrupted (blocks)."""
    import uvicorn

    app = build_app(reward, route, max_batch, max_wait_ms, max_request_mb=max_request_mb)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
