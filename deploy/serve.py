"""HTTP inference server (FastAPI + uvicorn): POST /predict, GET /healthz, GET /metrics (Prometheus).

Concurrent requests are batched: the first request waits at most `max_wait_ms` for others, up to
`max_batch` images, and the batch runs once on the runtime (in a worker thread, so the event loop
keeps accepting requests while the model runs).
"""


import asyncio
import time
from dataclasses import dataclass

import numpy as np

from .errors import DeployError
from .predictor import Predictor


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_bytes: int = 10 * 1024 * 1024  # request body limit
    top_k: int = 5


class Batcher:
    """Collects (image, future) pairs into batches and runs them one batch at a time."""

    def __init__(self, predictor: Predictor, cfg: ServeConfig, on_batch):
        self.predictor, self.cfg, self.on_batch = predictor, cfg, on_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def submit(self, image: np.ndarray, k: int):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((image, k, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_wait_ms / 1e3
            while len(items) < self.cfg.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = np.stack([img for img, _, _ in items])
            k = max(k for _, k, _ in items)
            try:
                results = await asyncio.to_thread(self.predictor.top_k, batch, k)
            except Exception as err:  # noqa: BLE001 - every waiting request must get an answer
                for _, _, fut in items:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.on_batch(len(items))
            for (_, want, fut), preds in zip(items, results):
                if not fut.done():
                    fut.set_result((preds[:want], len(items)))


def create_app(predictor: Predictor, cfg: ServeConfig = ServeConfig()):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.datastructures import UploadFile

    registry = CollectorRegistry()
    requests = Counter("deploy_requests", "HTTP requests", ["endpoint", "status"], registry=registry)
    latency = Histogram("deploy_request_latency_seconds", "POST /predict latency", registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))  # fmt: skip
    batch_sizes = Histogram("deploy_batch_size", "images per model run", registry=registry,
                            buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, cfg.max_batch})))  # fmt: skip
    batcher = Batcher(predictor, cfg, batch_sizes.observe)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="edge-deploy", lifespan=lifespan)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        requests.labels(request.url.path, str(response.status_code)).inc()
        if request.url.path == "/predict":
            latency.observe(time.perf_counter() - start)
        return response

    @app.exception_handler(HTTPException)
    async def one_line(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": str(predictor.model_file.name), "runtime": predictor.runtime.name}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request, k: int = Query(cfg.top_k, ge=1, le=100)):
        body = await _limited_body(request, cfg.max_bytes, HTTPException)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send the image as multipart/form-data with a file field named 'image'")
        try:
            form = await Request(request.scope, replay).form()
        except Exception as err:  # noqa: BLE001 - the multipart parser raises several types
            raise HTTPException(400, f"malformed multipart body ({err})") from None
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "no file field named 'image' in the form")
        payload = await upload.read()
        if not payload:
            raise HTTPException(400, "the uploaded image is empty")
        try:
            image = await asyncio.to_thread(predictor.decode, payload, upload.filename or "image")
        except DeployError as err:
            raise HTTPException(400, str(err)) from None
        preds, batch = await batcher.submit(image, k)
        return {"model": predictor.model_file.name, "runtime": predictor.runtime.name, "batch_size": batch,
                "top_k": [{"index": p.index, "name": p.name, "probability": p.probability} for p in preds]}  # fmt: skip

    return app


async def _limited_body(request, limit: int, http_error) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise http_error(413, f"request body of {int(declared)} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise http_error(413, f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
