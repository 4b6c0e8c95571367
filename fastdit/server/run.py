"""Running the server: the listening socket, the model loader, uvicorn around the app and the engine.

`run_server(sock, load, options)` serves on `sock` until a signal (or a load failure) stops it; `load` builds
the generator on the engine's thread (`load_generator` for a pipeline folder). fastdit.server.cli parses the
command line into these arguments; fastdit.server.ranks calls them on the ranks of a multi-GPU server.
"""

from __future__ import annotations

import copy
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from fastdit.cli.common import ModelOptions, torch_dtype
from fastdit.errors import FastditError
from fastdit.server.engine import Engine, Generator, Warmup

log = logging.getLogger("fastdit.server")


@dataclass(frozen=True)
class ServerOptions:
    """The server-side settings of `fastdit serve` (the model-side ones are a `ModelOptions`)."""

    model_id: str  # the name /v1/models reports
    max_queue: int = 64
    max_batch: int = 8
    max_size: int = 2048
    warmup: Warmup | None = Warmup()
    log_level: str = "info"
    scheduler: str = "checkpoint"  # every request's sampling schedule (and its default steps and CFG scale)
    stored_image_bytes: int = 512 << 20  # PNGs kept for response_format="url"
    api_key: str | None = None  # required as a bearer token on /v1/* when set
    max_upload_bytes: int = 32 << 20  # the body of an edit request (its image files)


class ImageAreas:
    """An edit pipeline with the server's --vae-image-area / --vl-image-area: passed to every call (edit pipelines
    are only called with images) and to `output_size` (the size of a request that gives none)."""

    def __init__(self, pipe, areas: dict[str, int]):
        self.pipe, self.areas = pipe, dict(areas)

    def __getattr__(self, name: str):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        return self.pipe(**self.areas, **kwargs)

    def output_size(self, images):
        return self.pipe.output_size(images, **{k: v for k, v in self.areas.items() if k == "vae_image_area"})


def load_generator(model_path: str, options: ModelOptions, parallel=None) -> Generator:
    """Build the pipeline (this rank's shard of it, given a `ParallelState`); runs on the engine thread of rank 0
    and the main thread of the other ranks."""
    from fastdit.cli.common import torch_device
    from fastdit.cli.memory import memory_plan
    from fastdit.pipelines import load_pipeline
    from fastdit.server.lora import serve_loras

    device = parallel.device if parallel is not None else torch_device(options.device)
    dtype = torch_dtype(options.dtype, options.device)
    plan = memory_plan(options, model_path, device=device, dtype=dtype, parallel=parallel)
    pipe = load_pipeline(
        model_path,
        dtype=dtype,
        device=device,
        parallel=parallel,
        quantize=options.quantize,
        attention=options.attention,
        **({} if plan is None else {"memory": plan}),
    )
    if options.compile:
        pipe.compile()
    if options.cuda_graph:
        pipe.enable_cuda_graph()
    if options.cache is not None:
        pipe.enable_step_cache(options.cache)
    if options.image_areas:  # fastdit.cli.edit.check_area_flags let them through for edit pipelines only
        pipe = ImageAreas(pipe, dict(options.image_areas))
    return serve_loras(pipe, options)  # the --lora adapters, and calls that choose among them


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so that a port in use is a clear error before anything loads."""
    if not 0 <= port <= 65535:
        raise FastditError(f"--port {port}: must be between 0 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FastditError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise FastditError(f"--port {port}: already in use on {host}; pick another port") from None
        raise FastditError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(sock: socket.socket, load: Callable[[], Generator], options: ServerOptions) -> int:
    """Serve on `sock` until a signal (or a load failure) stops the server; `load` runs on the engine thread.
    Returns the exit status; raises the engine's load error."""
    import uvicorn

    from fastdit.server.app import create_app

    class Server(uvicorn.Server):
        """uvicorn's server, which also closes the engine's queue as soon as shutdown begins, so that queued
        requests answer 503 at once instead of being run before the process may exit."""

        async def shutdown(self, sockets=None) -> None:
            engine.close()
            await super().shutdown(sockets)

    server: Server | None = None

    def stop_on_load_error(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    engine = Engine(
        load,
        max_queue=options.max_queue,
        max_batch=options.max_batch,
        warmup=options.warmup,
        on_load_error=stop_on_load_error,
    )
    app = create_app(
        engine,
        model_id=options.model_id,
        max_side=options.max_size,
        stored_image_bytes=options.stored_image_bytes,
        max_upload_bytes=options.max_upload_bytes,
        api_key=options.api_key,
        scheduler=options.scheduler,
    )
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["fastdit"] = {"handlers": ["default"], "level": options.log_level.upper(), "propagate": False}
    config = uvicorn.Config(app, log_config=log_config, log_level=options.log_level, timeout_graceful_shutdown=30)
    server = Server(config)
    host, port = sock.getsockname()[:2]
    log.info("fastdit serving %s on http://%s:%d", options.model_id, host, port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        return 130
    finally:
        sock.close()
    if engine.load_error is not None:
        if isinstance(engine.load_error, FastditError):
            raise FastditError(f"--model {options.model_id}: {engine.load_error}") from engine.load_error
        raise engine.load_error
    return 0
