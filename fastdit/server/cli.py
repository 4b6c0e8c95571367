"""`fastdit serve`: run the OpenAI-compatible image server.

`fastdit.cli.main` calls `add_parser(subparsers)`. This module parses the command line (it imports no torch,
fastapi or uvicorn); fastdit.server.run serves, and with --tp / --sp / --cfg-parallel fastdit.server.ranks
starts the ranks (a single rank takes the same path as ever).
"""

from __future__ import annotations

import argparse
import os

from fastdit.cache.cli import add_cache_arguments, check_cache_fits
from fastdit.cli.common import (
    TINY_RANDOM,
    ModelOptions,
    add_model_arguments,
    add_parallel_arguments,
    check_model_options,
    note,
    parallel_degrees,
    parallel_requested,
    positive_int,
    resolve_model,
)
from fastdit.cli.edit import add_image_area_arguments, check_area_flags, check_image_area_arguments
from fastdit.cli.lora import add_lora_arguments, check_lora_flags, read_loras
from fastdit.cli.memory import add_memory_arguments
from fastdit.cli.scheduler import add_scheduler_arguments
from fastdit.errors import FastditError
from fastdit.extras import require_extra
from fastdit.runtime.env import under_torchrun

API_KEY_ENV = "FASTDIT_API_KEY"  # read when --api-key is not given (fastdit.server.auth)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH, e.g. 512x512") from None
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 16")
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    add_memory_arguments(model)
    add_image_area_arguments(parser.add_argument_group("image editing (edit models)"))
    add_cache_arguments(parser.add_argument_group("step cache"))
    add_parallel_arguments(parser, "parallelism (one process per GPU; gloo on CPU; rank 0 serves HTTP)")
    add_lora_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    server.add_argument("--port", type=int, default=30000, help="port to bind (default: %(default)s)")
    server.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="requests that may wait; more get 429 (default: %(default)s)",
    )
    server.add_argument(
        "--max-batch", type=positive_int, default=8, help="images per pipeline call (default: %(default)s)"
    )
    server.add_argument(
        "--max-size",
        type=positive_int,
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
    add_scheduler_arguments(server)
    server.add_argument(
        "--stored-images-mb",
        type=positive_int,
        default=512,
        help="memory for the PNGs of response_format=url answers; the oldest are dropped beyond it (default: 512)",
    )
    server.add_argument(
        "--max-upload-mb",
        type=positive_int,
        default=32,
        help="largest body of an edit request (/v1/images/edits: its image files), in MiB; other requests: 1 MiB "
        "(default: 32)",
    )
    server.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV}); /health, /metrics and the page "
        "stay open. Bind beyond 127.0.0.1 only with a key or behind an authenticating proxy",
    )
    server.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: info)"
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible image server",
        description="Serve the OpenAI Images API (/v1/images/generations, /v1/images/edits), /health, /metrics and a "
        "web page.",
    )
    add_arguments(parser)
    parser.set_defaults(func=serve_main)
    return parser


def server_options(args: argparse.Namespace):
    from fastdit.server.engine import Warmup
    from fastdit.server.run import ServerOptions

    model_id = TINY_RANDOM if args.model == TINY_RANDOM else os.path.basename(os.path.abspath(args.model))
    return ServerOptions(
        model_id=model_id,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_size=args.max_size,
        warmup=None if args.no_warmup else Warmup(*args.warmup_size),
        log_level=args.log_level,
        scheduler=args.scheduler,
        stored_image_bytes=args.stored_images_mb << 20,
        api_key=api_key(args),
        max_upload_bytes=args.max_upload_mb << 20,
    )


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else FASTDIT_API_KEY, else None (no access control)."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise FastditError(f"--api-key / {API_KEY_ENV} is empty; give a key or leave both unset")
    return key


def serve_main(args: argparse.Namespace) -> int:
    require_extra("serve", "fastdit serve")  # before the imports below, which need it
    from fastdit.server import ranks
    from fastdit.server.run import bind_socket, load_generator, run_server

    if args.max_size < 16:
        raise FastditError(f"--max-size {args.max_size}: must be at least 16")
    if api_key(args) is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        note(f"serving on {args.host} without --api-key: anyone who reaches the port can generate images")
    tp, sp, cfg = parallel_degrees(args)
    check_image_area_arguments(args)
    model = ModelOptions.from_args(args)
    check_model_options(model, tp, sp)
    check_lora_flags(model.loras, model.fuse_lora)
    # First: a port in use fails before any model work. Under torchrun only rank 0 serves HTTP.
    serves_http = not under_torchrun() or os.environ["RANK"] == "0"
    sock = bind_socket(args.host, args.port) if serves_http else None
    try:
        path = str(resolve_model(args.model))  # a Hub download happens here, once, before any rank starts
        read_loras(model.loras, path)  # a missing, corrupt or mismatched LoRA stops the server before it loads
        check_cache_fits(model.cache, path)
        if model.image_areas:
            from fastdit.pipelines import pipeline_class

            check_area_flags(pipeline_class(path), dict(model.image_areas))
        if parallel_requested(tp, sp, cfg):
            ranks.check(path, model, tp, sp, cfg)  # degrees against the devices and the model's heads
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    options = server_options(args)
    if parallel_requested(tp, sp, cfg):
        return ranks.serve(ranks.RankSetup(path, model, options, tp, sp, cfg, args.master_port), sock)
    return run_server(sock, lambda: load_generator(path, model), options)
