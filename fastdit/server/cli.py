"""`fastdit serve`: run the OpenAI-compatible image server.

`fastdit.cli` calls `add_parser(subparsers)`; `python -m fastdit.server.cli serve ...` works too.
Adding a flag: declare it in `add_arguments` and read it in `load_generator` (model-side flags such
as quantization or compilation) or in `serve_main` (server-side flags). With --tp / --sp /
--cfg-parallel the server runs on several ranks: `fastdit.server.ranks` holds that glue, and a single
rank takes the same path as ever.
"""

from __future__ import annotations

import argparse
import copy
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable

import uvicorn

from fastdit.cli import (
    MODEL_HELP,
    TINY_RANDOM,
    add_attention_argument,
    add_cuda_graph_argument,
    add_parallel_arguments,
    check_cuda_graph_device,
    cuda_graph_hint,
    note,
    parallel_requested,
    resolve_model,
)
from fastdit.errors import FastditError
from fastdit.server.app import create_app
from fastdit.server.engine import Engine, Generator, Warmup

log = logging.getLogger("fastdit.server")


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH, e.g. 512x512") from None
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 16")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, help=MODEL_HELP)
    model.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="weights and activations (auto: bfloat16 on CUDA, float32 otherwise)",
    )
    model.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: the pipeline's)")
    model.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="run the DiT's block linears in fp8 e4m3 (CUDA, compute capability >= 8.9)",
    )
    add_attention_argument(model)
    model.add_argument(
        "--compile", action="store_true", help="torch.compile the DiT block by block (the warmup compiles it)"
    )
    add_cuda_graph_argument(model)
    add_parallel_arguments(parser, "parallelism (one process per GPU; gloo on CPU; rank 0 serves HTTP)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    server.add_argument("--port", type=int, default=30000, help="port to bind (default: %(default)s)")
    server.add_argument(
        "--max-queue",
        type=_positive,
        default=64,
        help="requests that may wait; more get 429 (default: %(default)s)",
    )
    server.add_argument(
        "--max-batch", type=_positive, default=8, help="images per pipeline call (default: %(default)s)"
    )
    server.add_argument(
        "--max-size",
        type=_positive,
        default=2048,
        help="largest width or height served (default: %(default)s)",
    )
    server.add_argument(
        "--warmup-size",
        type=_size,
        default=(512, 512),
        metavar="WxH",
        help="size of the 2-step warmup run before /health turns 200 (default: 512x512)",
    )
    server.add_argument("--no-warmup", action="store_true", help="skip the warmup run")
    server.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible image server",
        description="Serve the OpenAI Images API (/v1/images/generations), /health, /metrics and a web page.",
    )
    add_arguments(parser)
    parser.set_defaults(func=serve_main)
    return parser


def _torch_dtype(name: str, device: str | None):
    import torch

    if name == "auto":
        on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    return getattr(torch, name)


def load_generator(args: argparse.Namespace, model_path: str, parallel=None) -> Generator:
    """Build the pipeline (this rank's shard of it, given a `ParallelState`); runs on the engine thread
    of rank 0 and the main thread of the other ranks. Model-side flags are applied here."""
    from fastdit.pipeline import QwenImagePipeline

    device = parallel.device if parallel is not None else args.device
    pipe = QwenImagePipeline.from_pretrained(
        model_path,
        dtype=_torch_dtype(args.dtype, args.device),
        device=device,
        parallel=parallel,
        quantize=args.quantize,
        attention=args.attention,
    )
    if args.compile:
        pipe.compile()
    if args.cuda_graph:
        pipe.enable_cuda_graph()
    return pipe


def _check_device_options(args: argparse.Namespace) -> None:
    """--quantize fp8 on a device without fp8 GEMMs, or an --attention backend the device lacks, is a one-line
    error before anything binds or loads."""
    if args.cuda_graph:
        check_cuda_graph_device(args.device)
    if hint := cuda_graph_hint(args):
        note(hint)
    if args.quantize is None and args.attention == "auto":
        return
    from fastdit.attention import resolve_backend
    from fastdit.loader import default_device
    from fastdit.quant import check_fp8_device

    try:
        device = args.device or default_device()
        if args.quantize is not None:
            check_fp8_device(device)
        resolve_backend(args.attention, device)
    except RuntimeError as e:  # torch.device() on a malformed --device
        raise FastditError(f"--device {args.device}: {e}") from None


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


def _log_config(level: str) -> dict:
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["fastdit"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


class _Server(uvicorn.Server):
    """uvicorn's server, which also closes the engine's queue as soon as shutdown begins, so that
    queued requests answer 503 at once instead of being run before the process may exit."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        self.engine.close()
        await super().shutdown(sockets)


def serve_main(args: argparse.Namespace) -> int:
    from fastdit.server import ranks

    if args.max_size < 16:
        raise FastditError(f"--max-size {args.max_size}: must be at least 16")
    _check_device_options(args)
    # First: a port in use fails before any model work. Under torchrun only rank 0 serves HTTP.
    sock = bind_socket(args.host, args.port) if ranks.serves_http() else None
    try:
        path = str(resolve_model(args.model))  # a Hub download happens here, once, before any rank starts
        if parallel_requested(args):
            ranks.check(args, path)  # degrees against the devices and the model's heads, before loading
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    if parallel_requested(args):
        return ranks.serve(args, sock, path)
    return run_server(args, sock, lambda: load_generator(args, path))


def run_server(args: argparse.Namespace, sock: socket.socket, load: Callable[[], Generator]) -> int:
    """Serve on `sock` until a signal (or a load failure) stops the server; `load` runs on the engine
    thread. Returns the exit status; raises the engine's load error."""
    server: _Server | None = None

    def stop_on_load_error(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    engine = Engine(
        load,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        warmup=None if args.no_warmup else Warmup(*args.warmup_size),
        on_load_error=stop_on_load_error,
    )
    model_id = TINY_RANDOM if args.model == TINY_RANDOM else os.path.basename(os.path.abspath(args.model))
    app = create_app(engine, model_id=model_id, max_side=args.max_size)
    config = uvicorn.Config(
        app, log_config=_log_config(args.log_level), log_level=args.log_level, timeout_graceful_shutdown=30
    )
    server = _Server(config, engine)
    host, port = sock.getsockname()[:2]
    log.info("fastdit serving %s on http://%s:%d", model_id, host, port)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        return 130
    finally:
        sock.close()
    if engine.load_error is not None:
        if isinstance(engine.load_error, FastditError):
            raise FastditError(f"--model {args.model}: {engine.load_error}") from engine.load_error
        raise engine.load_error
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdit.server.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FastditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
