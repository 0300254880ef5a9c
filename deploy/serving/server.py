"""HTTP inference server (FastAPI + uvicorn): POST /predict, GET /healthz, GET /metrics (Prometheus).

Concurrent requests are batched: the first request waits at most `max_wait_ms` for others, up to
`max_batch` images, and the batch runs once on the runtime (in a worker thread, so the event loop
keeps accepting requests while the model runs).

Limits: request line and headers must arrive within `header_timeout` s of the connection (or of its first byte
after a keep-alive pause), the body within `request_timeout` s (else 408); idle keep-alive connections close after
`keep_alive_timeout` s; at most `max_connections` are open (a new one closes the idle one, between requests,
that has waited longest). With `api_key`, every endpoint but /healthz needs `Authorization: Bearer KEY` or
`X-API-Key: KEY`.
Every error body is `{"error": "..."}`.
"""

import asyncio
import hmac
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..errors import DeployError
from .predictor import Predictor

OPEN_ROUTES = {"/healthz"}  # answered without the API key, for health checks
BACKLOG = 128  # pending connections; also how many asyncio accepts in one go, before evicted ones close
log = logging.getLogger("uvicorn.error")


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_bytes: int = 10 * 1024 * 1024  # request body limit
    top_k: int = 5
    header_timeout: float = 10.0
    request_timeout: float = 30.0  # to receive the body
    keep_alive_timeout: int = 5
    max_connections: int = 1000
    api_key: str | None = None
    max_decodes: int = 2  # decoding threads: bound memory (up to ~400 MB each at the 50-Mpixel limit)


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
            try:
                batch = np.stack([img for img, _, _ in items])
                results = await asyncio.to_thread(self.predictor.top_k, batch, max(k for _, k, _ in items))
            except Exception as err:  # every waiting request must get an answer
                log.exception("inference failed on a batch of %d", len(items))
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
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.routing import Match

    registry = CollectorRegistry()
    requests = Counter("deploy_requests", "HTTP requests by route ('other': no route)", ["endpoint", "status"],
                       registry=registry)  # fmt: skip
    latency = Histogram("deploy_request_latency_seconds", "POST /predict latency", registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))  # fmt: skip
    batch_sizes = Histogram("deploy_batch_size", "images per model run", registry=registry,
                            buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, cfg.max_batch})))  # fmt: skip
    batcher = Batcher(predictor, cfg, batch_sizes.observe)
    decoder = ThreadPoolExecutor(cfg.max_decodes, "decode")  # its own threads: a request that goes away
    # cannot leave its decode running beside new ones, and decoding never delays the model's thread

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="edge-deploy", lifespan=lifespan)

    def route(scope) -> str:
        """The matched route's path template, so that metrics have one series per route, not per URL."""
        for r in app.router.routes:
            if r.matches(scope)[0] is not Match.NONE:
                return r.path
        return "other"

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next):
        start, endpoint = time.perf_counter(), route(request.scope)
        if cfg.api_key and endpoint not in OPEN_ROUTES and not _authorized(request.headers, cfg.api_key):
            response = JSONResponse({"error": "missing or wrong API key: send 'Authorization: Bearer KEY' or "
                                     "'X-API-Key: KEY'"}, 401, headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        else:
            try:
                response = await call_next(request)
            except Exception:
                requests.labels(endpoint, "500").inc()
                raise
        requests.labels(endpoint, str(response.status_code)).inc()
        if endpoint == "/predict":
            latency.observe(time.perf_counter() - start)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        return JSONResponse({"error": f"{'.'.join(map(str, first['loc']))}: {first['msg']}"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal server error ({type(exc).__name__})"}, status_code=500)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": str(predictor.model_file.name), "runtime": predictor.runtime.name}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request, k: int = Query(cfg.top_k, ge=1, le=100)):
        try:
            body = await asyncio.wait_for(_limited_body(request, cfg.max_bytes, HTTPException), cfg.request_timeout)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"request body not received within {cfg.request_timeout:g} s",
                                headers={"Connection": "close"}) from None  # fmt: skip

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
            image = await asyncio.get_running_loop().run_in_executor(
                decoder, predictor.decode, payload, upload.filename or "image")  # fmt: skip
        except DeployError as err:
            raise HTTPException(400, str(err)) from None
        try:
            preds, batch = await batcher.submit(image, k)
        except Exception as err:  # noqa: BLE001 - logged by the batcher
            raise HTTPException(500, f"inference failed ({type(err).__name__})") from None
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


def _authorized(headers, key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port; a one-line DeployError when it cannot be (address in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise DeployError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise DeployError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def run(app, sock: socket.socket, cfg: ServeConfig) -> None:
    """Serve `app` on the bound `sock` until interrupted, with the connection limits of `cfg`."""
    import uvicorn

    _return_freed_memory()
    cfg = replace(cfg, max_connections=_connection_cap(cfg.max_connections))
    config = uvicorn.Config(app, log_level="warning", http=_protocol(cfg), ws="none", lifespan="on",
                            timeout_keep_alive=cfg.keep_alive_timeout, backlog=BACKLOG)  # fmt: skip
    with sock:
        uvicorn.Server(config).run(sockets=[sock])


def _return_freed_memory() -> None:
    """Have glibc's malloc serve blocks of 1 MiB or more with mmap, so that a decoded image's memory goes back
    to the system when it is freed (by default malloc's arenas keep the peak of concurrent large images)."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _connection_cap(wanted: int, reserve: int = 2 * BACKLOG + 64) -> int:
    """`wanted`, or fewer when the open-file limit (raised up to its hard limit) leaves no room for them and
    `reserve` other files (one accept burst, the model, logs): accept() must never run out of files."""
    import resource

    from ..console import warn

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted + reserve:
        return wanted
    soft = wanted + reserve if hard == resource.RLIM_INFINITY else min(wanted + reserve, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft >= wanted + reserve:
        return wanted
    cap = max(1, soft - reserve)
    warn(f"--max-connections lowered from {wanted} to {cap}: the open-file limit is {soft} (ulimit -n)")
    return cap


def _protocol(cfg: ServeConfig):
    """uvicorn's h11 protocol with a deadline for the request line and headers, and a cap on open connections."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        idle_since = 0.0  # when it began to wait for a request

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_headers()
            if len(self.connections) > cfg.max_connections:  # make room: close the longest-waiting idle one
                idle = [c for c in self.connections if c.conn.their_state is h11.IDLE and not c.transport.is_closing()]
                min(idle, key=lambda c: c.idle_since, default=self).transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._stop_timer()
            elif self.header_timer is None:
                self._await_headers()

        def on_response_complete(self) -> None:
            self.idle_since = self.loop.time()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            self.idle_since = self.loop.time()
            self.header_timer = self.loop.call_later(cfg.header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE:
                self.transport.close()

        def _stop_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

    return Guarded
