"""An HTTP server for any reward (FastAPI + uvicorn): `mmalign serve-reward NAME --port 8300`.

Routes (the wire format is in `mmalign.rewards.http`):

- `POST /<name>`: score `{"images": [base64 PNG, …], "prompts": … }` → `{"reward", "scores"}`;
- `GET /<name>`: what is served and counters (`requests`, `calls`, `scored`);
- `GET /health`: `{"status": "ok"}`.

Concurrent requests are batched: a queue takes each request's decoded images; a single worker
takes the first waiting request, then keeps gathering requests until `max_batch` images are
gathered or `max_wait_ms` has passed since the first, and scores them with one `reward(...)` call
(one call per image size when sizes differ; the reward splits a call into its own `batch_size`
chunks). Scores go back to each request in order. If a gathered batch fails, each of its requests is
scored alone, so one bad request fails only itself.

Errors are JSON `{"error": "<one line>"}`: 400 for a body that is not JSON, a missing or ill-typed
field (named: `images[3]: not valid base64`), or input the reward refuses; 404 for another route;
405 for another method; 413 for more than `max_request_images` images; 500 when the reward itself
fails. None of them stops the server.
"""

from __future__ import annotations

import asyncio
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

from mmalign.rewards.base import Reward, RewardInputError
from mmalign.rewards.http import decode_png

REQUEST_KEYS = ("images", "prompts")


class RequestError(RewardInputError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Pending:
    """One request waiting in the queue: images `(3, H, W)` in [0, 1], prompts, and where its scores go."""

    images: list[torch.Tensor]
    prompts: list[str] | None
    future: asyncio.Future


def parse_request(body: Any, needs_prompts: bool, max_images: int) -> tuple[list[torch.Tensor], list[str] | None]:
    """A decoded JSON body → images `(3, H, W)` in [0, 1] and prompts (one per image, or None).

    Raises `RequestError` naming the field at fault."""
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object with 'images' (and 'prompts')")
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(f"body: unknown field {unknown[0]!r}; expected {', '.join(REQUEST_KEYS)}")
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise RequestError("field 'images': expected a non-empty list of base64 PNG strings")
    if len(images) > max_images:
        raise RequestError(f"field 'images': {len(images)} images; this server takes at most {max_images}", 413)
    prompts = body.get("prompts")
    if prompts is None:
        if needs_prompts:
            raise RequestError("field 'prompts': this reward scores images against prompts; send one or one per image")
    elif isinstance(prompts, str):
        prompts = [prompts] * len(images)
    elif isinstance(prompts, list):
        if len(prompts) != len(images):
            raise RequestError(f"field 'prompts': {len(prompts)} prompts for {len(images)} images")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise RequestError(f"prompts[{i}]: expected a string, got {type(prompt).__name__}")
    else:
        raise RequestError(f"field 'prompts': expected a string or a list of strings, got {type(prompts).__name__}")
    try:
        tensors = [decode_png(text, f"images[{i}]") for i, text in enumerate(images)]
    except RequestError:
        raise
    except RewardInputError as error:
        raise RequestError(str(error)) from None
    return tensors, prompts


class Batcher:
    """Gathers queued requests up to `max_batch` images or `max_wait_s`, then scores them in one call."""

    def __init__(self, reward: Reward, max_batch: int = 64, max_wait_s: float = 0.005):
        self.reward, self.max_batch, self.max_wait_s = reward, int(max_batch), float(max_wait_s)
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

    async def score(self, images: list[torch.Tensor], prompts: list[str] | None) -> list[float]:
        """Queue one request's images (and prompts) and wait for their scores."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(images, prompts, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size, deadline = len(batch[0].images), loop.time() + self.max_wait_s
            while size < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
                size += len(batch[-1].images)
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
        images = [image for pending in batch for image in pending.images]
        with_prompts = all(p.prompts is not None for p in batch)
        prompts = [prompt for p in batch for prompt in p.prompts] if with_prompts else None
        scores = torch.empty(len(images))
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(i)
        for indices in by_shape.values():
            group_prompts = None if prompts is None else [prompts[i] for i in indices]
            result = self.reward(torch.stack([images[i] for i in indices]), group_prompts, progress=False)
            scores[indices] = result.detach().float().cpu()
            self.calls += 1
        self.requests += len(batch)
        self.scored += len(images)
        values = [None if math.isnan(s) else s for s in scores.tolist()]
        out, start = [], 0
        for pending in batch:
            out.append(values[start : start + len(pending.images)])
            start += len(pending.images)
        return out


def build_app(
    reward: Reward, route: str, max_batch: int = 64, max_wait_ms: float = 5.0, max_request_images: int = 1024
) -> FastAPI:
    """The FastAPI application serving `reward` at `/<route>` (module doc)."""
    batcher = Batcher(reward, max_batch, max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"mmalign reward server: {route}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RewardInputError)
    async def refused(request: Request, exc: RewardInputError) -> JSONResponse:
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
            "needs_prompts": reward.needs_prompts,
            "max_batch": batcher.max_batch,
            "max_wait_ms": max_wait_ms,
            "requests": batcher.requests,
            "calls": batcher.calls,
            "scored": batcher.scored,
        }

    @app.post("/{name}")
    async def score(name: str, request: Request) -> dict[str, Any]:
        check_route(name)
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("body: not valid JSON") from None
        images, prompts = await asyncio.to_thread(parse_request, body, reward.needs_prompts, max_request_images)
        return {"reward": route, "scores": await batcher.score(images, prompts)}

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
) -> None:
    """Serve `reward` at `http://host:port/<route>` until interrupted (blocks)."""
    import uvicorn

    app = build_app(reward, route, max_batch, max_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
