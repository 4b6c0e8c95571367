"""The HTTP API: OpenAI's Images API plus health, metrics, progress streaming and a web page.

Routes:
- POST /v1/images/generations         OpenAI `images.generate`; extensions: negative_prompt,
                                      num_inference_steps, true_cfg_scale, seed.
- POST /v1/images/generations/stream  the same body; answers server-sent events `progress`
                                      ({"step", "total"}), then `result` (the OpenAI response) or
                                      `error` (an OpenAI error plus "status"). Used by the web page.
- POST /v1/images/edits (and /stream)  OpenAI `images.edit`: multipart uploads (fastdit.server.edits).
- GET  /v1/images/files/{id}.png      images of response_format="url" (the latest, up to `stored_image_bytes`).
- GET  /v1/models, /health (503 until the engine is ready), /metrics (Prometheus text), / (web page).

Every error is OpenAI-shaped, {"error": {"message", "type", "param", "code"}}: invalid input is 400
(OpenAI's status for it; FastAPI's 422 is remapped) naming the field in "param", a body over
`max_body_bytes` (an edit's upload: `max_upload_bytes`) is 413, a full queue is 429 with Retry-After,
an engine failure is 500 for that request only, and a request caught by shutdown is 503.

A handler waiting on its job polls for a client disconnect: a queued job is then dropped, a running
one finishes unobserved (or stops early, when every client of its batch is gone).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import html
import io
import json
import logging
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastdit.cli.scheduler import request_sampling
from fastdit.errors import FastditError
from fastdit.server.auth import ApiKeyGuard
from fastdit.server.edits import DEFAULT_MAX_UPLOAD_BYTES, EDIT_PATHS, add_edit_routes, image_limit
from fastdit.server.engine import Engine, EngineClosed, Job, QueueFull
from fastdit.server.lora import add_lora_routes, request_loras
from fastdit.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fastdit.server.schema import (
    ERROR_RESPONSES,
    ApiError,
    ErrorResponse,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
)
from fastdit.validation import InputError

log = logging.getLogger("fastdit.server")

DISCONNECT_POLL_S = 0.2  # how often a waiting handler checks whether its client is still there
STATIC = resources.files("fastdit.server") / "static"


# ---- helpers ------------------------------------------------------------------------------------


class _ImageStore:
    """The latest PNGs of response_format="url", by id, at most `capacity` bytes together (oldest evicted
    first; a count would not bound memory: one 2048x2048 PNG is up to 12 MB)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._pngs: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def put(self, png: bytes) -> str:
        image_id = uuid.uuid4().hex
        self._pngs[image_id] = png
        self.size += len(png)
        while self.size > self.capacity:
            self.size -= len(self._pngs.popitem(last=False)[1])
        return image_id

    def get(self, image_id: str) -> bytes | None:
        return self._pngs.get(image_id)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _abandon(future: asyncio.Future) -> None:
    """Nobody will await `future` (its client left): retrieve its result when it comes, so asyncio does not
    log "exception was never retrieved" for the EngineClosed the engine answers a dropped job with."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


class _RequestGuard:
    """Pure ASGI middleware: rejects bodies over `max_body_bytes` (the edit routes' uploads: `max_upload_bytes`)
    with 413 before any parsing (the body is read here and replayed, so a chunked body is bounded too), and counts
    image requests by status."""

    def __init__(self, app, *, max_body_bytes: int, max_upload_bytes: int, count_status):
        self.app, self.count_status = app, count_status
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        counted = scope["path"].startswith(("/v1/images/generations", "/v1/images/edits"))
        limit = self.max_upload_bytes if scope["path"] in EDIT_PATHS else self.max_body_bytes

        async def counting_send(message):
            if counted and message["type"] == "http.response.start":
                self.count_status(message["status"])
            await send(message)

        too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large").response()
        headers = dict(scope["headers"])
        with contextlib.suppress(ValueError):
            if int(headers.get(b"content-length", b"0")) > limit:
                return await too_large(scope, receive, counting_send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await too_large(scope, receive, counting_send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: waits for http.disconnect

        await self.app(scope, replay_receive, counting_send)


# ---- the app ------------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    *,
    model_id: str,
    max_side: int = 2048,
    max_body_bytes: int = 1 << 20,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    stored_image_bytes: int = 512 << 20,
    api_key: str | None = None,
    scheduler: str = "checkpoint",
) -> FastAPI:
    """The server around `engine`. The app's lifespan starts the engine and stops it on shutdown. With `api_key`,
    /v1/* needs `Authorization: Bearer <api_key>` (fastdit.server.auth)."""
    metrics = engine.metrics
    store = _ImageStore(stored_image_bytes)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.close()  # queued jobs fail with 503; the running batch finishes
        await asyncio.to_thread(engine.join, 60.0)

    app = FastAPI(
        title="fastdit",
        summary="Qwen-Image text-to-image server with an OpenAI-compatible Images API",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_middleware(
        _RequestGuard,
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        count_status=lambda s: metrics.requests.labels(str(s)).inc(),
    )
    if api_key is not None:
        app.add_middleware(ApiKeyGuard, api_key=api_key)  # outermost: before the body is read
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    add_lora_routes(app, engine)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's 422 list -> OpenAI's 400 naming the first bad field.
        first = exc.errors()[0]
        loc = list(first.get("loc", ()))
        loc = loc[1:] if loc[:1] == ["body"] else loc
        # A field path starts with a name; ('body', 17) is a position in malformed JSON.
        param = ".".join(str(part) for part in loc) if loc and isinstance(loc[0], str) else None
        message = first.get("msg", "invalid request")
        content_type = request.headers.get("content-type", "")
        if loc == [] and "json" not in content_type:  # FastAPI parses a body as JSON only when it says so
            message = f"send the body as JSON with 'content-type: application/json' (got {content_type or 'none'})"
            return ApiError(400, message, code="unsupported_content_type").response()
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
        if param and not message.startswith(param):
            message = f"{param}: {message}"
        return ApiError(400, message, param=param, code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    def submit(
        body: ImageGenerationRequest, *, streaming: bool = False, images: tuple = (), image_key: str = ""
    ) -> Job:
        """Queue the request as a Job. `images`: an edit's decoded reference images (`image_key`: their digest);
        without a size the request gets the pipeline's choice for them."""
        if body.stream and not streaming:
            raise ApiError(
                400,
                "stream=true is not supported here; add /stream to the route (/v1/images/generations/stream, "
                "/v1/images/edits/stream)",
                param="stream",
                code="unsupported_value",
            )
        if not engine.ready.is_set():
            raise ApiError(
                503,
                "the model is still loading; retry later",
                type="server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        generator = engine.generator
        if not images and getattr(generator, "needs_image", False):
            message = "image is required: this model edits images; send them to POST /v1/images/edits"
            raise ApiError(400, message, param="image", code="missing_image")
        try:
            width, height = body.width_height() or generator.output_size(list(images))
        except InputError as e:  # a reference too elongated for the pipeline's area
            raise ApiError(400, str(e), param="image", code="invalid_image") from None
        if max(width, height) > max_side:
            problem = f"too big: each side must be at most {max_side} pixels (the server's --max-size)"
        elif min(width, height) < 16:
            problem = "too small: each side must be at least 16 pixels"
        else:
            problem = None
        if problem is not None:
            raise ApiError(400, f"size {width}x{height} is {problem}", param="size", code="invalid_size")
        if body.n > engine.max_batch:
            raise ApiError(
                400,
                f"n must be at most {engine.max_batch} (the server's --max-batch)",
                param="n",
                code="invalid_value",
            )
        job = Job(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            n=body.n,
            width=width,
            height=height,
            seed=body.seed,
            loras=request_loras(body.loras, engine),
            images=images,
            image_key=image_key,
            **request_sampling(scheduler, body.num_inference_steps, body.true_cfg_scale),
        )
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(
                429,
                str(e),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except EngineClosed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        return job

    def client_gone(job: Job) -> None:
        stage = engine.cancel(job)
        if stage != "done":
            metrics.dropped.labels(stage).inc()
            log.info("client of request %s went away (%s)", job.id, stage)

    def job_images(future: asyncio.Future) -> list[Image.Image]:
        try:
            return future.result()
        except EngineClosed as e:
            raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
        except FastditError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        except Exception as e:
            raise ApiError(
                500,
                f"image generation failed: {type(e).__name__}: {e}",
                type="server_error",
                code="generation_failed",
            ) from None

    async def images_response(images: list[Image.Image], response_format: str, request: Request) -> dict:
        pngs = await asyncio.to_thread(lambda: [_png(image) for image in images])
        if response_format == "url":
            data = [{"url": str(request.url_for("image_file", name=f"{store.put(png)}.png"))} for png in pngs]
        else:
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        return {"created": int(time.time()), "data": data}

    async def answer(job: Job, response_format: str, request: Request):
        """Wait for `job` (dropping it if the client leaves) and answer with its images."""
        future = asyncio.wrap_future(job.future)
        while not future.done():
            await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
            if not future.done() and await request.is_disconnected():
                client_gone(job)
                _abandon(future)
                return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        return await images_response(job_images(future), response_format, request)

    def answer_stream(job: Job, response_format: str, request: Request) -> StreamingResponse:
        """Answer `job` as server-sent events: `progress` per denoising step, then `result` or `error`."""

        async def events():
            future = asyncio.wrap_future(job.future)
            loop = asyncio.get_running_loop()
            # The worker thread pushes every step, so each reaches the stream however fast the steps come. Its
            # pushes and the future's completion arrive on this loop in the order they happened.
            steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
            job.listeners.append(lambda step, total: loop.call_soon_threadsafe(steps.put_nowait, (step, total)))
            if job.total:  # steps taken before the listener was added
                steps.put_nowait((job.step, job.total))
            getter = None
            try:
                while not future.done() or not steps.empty():
                    getter = asyncio.ensure_future(steps.get())
                    await asyncio.wait({future, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        step, total = getter.result()
                        yield _sse("progress", {"step": step, "total": total})
                    else:
                        getter.cancel()
            finally:
                if getter is not None:
                    getter.cancel()
                if not future.done():  # cancelled by Starlette: the client disconnected
                    client_gone(job)
                    _abandon(future)
            try:
                response = await images_response(job_images(future), response_format, request)
            except ApiError as e:
                yield _sse("error", {**e.body, "status": e.status})
                return
            yield _sse("result", response)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=ERROR_RESPONSES)
    async def create_image(body: ImageGenerationRequest, request: Request):
        """OpenAI's `images.generate`."""
        return await answer(submit(body), body.response_format, request)

    @app.post(
        "/v1/images/generations/stream",
        responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
        response_class=StreamingResponse,
    )
    async def create_image_stream(body: ImageGenerationRequest, request: Request):
        """Like /v1/images/generations, answered as server-sent events: `progress` per denoising
        step, then `result` or `error`. Input errors and a full queue still answer 400/429."""
        return answer_stream(submit(body, streaming=True), body.response_format, request)

    add_edit_routes(app, engine, submit=submit, answer=answer, answer_stream=answer_stream)

    @app.get("/v1/images/files/{name}", name="image_file", responses={404: {"model": ErrorResponse}})
    async def image_file(name: str) -> Response:
        png = store.get(name.removesuffix(".png")) if name.endswith(".png") else None
        if png is None:
            raise ApiError(
                404,
                f"no image {name!r} (the server keeps the latest {stored_image_bytes >> 20} MiB of images)",
                param="name",
                code="not_found",
            )
        return Response(png, media_type="image/png")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": started}]}

    @app.get("/health", responses={503: {"description": "Loading, warming up, failed to load, or dead"}})
    async def health():
        if engine.ready.is_set():
            return {"status": "ok"}
        if engine.load_error is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        # failed to load, or dead after a sticky device error; the process is on its way out
        error = f"{type(engine.load_error).__name__}: {engine.load_error}"
        return JSONResponse({"status": "failed", "error": error}, status_code=503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {METRICS_CONTENT_TYPE: {}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.expose(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{MODEL}}", html.escape(model_id))
        # What the model takes, for the page's edit mode; empty while it loads (the page then waits and reloads).
        generator = engine.generator if engine.ready.is_set() else None
        takes = "" if generator is None else str(image_limit(generator))
        needs = "" if generator is None else str(bool(getattr(generator, "needs_image", False))).lower()
        return HTMLResponse(page.replace("{{MAX_IMAGES}}", takes).replace("{{NEEDS_IMAGE}}", needs))

    return app
