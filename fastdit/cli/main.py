"""The `fastdit` command line: one subcommand per module (generate, edit, bench, serve, quantize, eval-cache).

Bad input (sizes, steps, paths, prompts, incomplete models) exits with status 2 and one line on stderr,
`fastdit: error: ...`; only fastdit's own errors (FastditError) count as bad input. A run that failed for another
known reason (`RunFailed`: a rank died) prints one line and exits 1; anything else is a bug and prints its
traceback (exit 1). Each subcommand module imports its heavy dependencies when it runs, so `fastdit --help`
imports no torch, fastapi or uvicorn.
"""

from __future__ import annotations

import logging
import sys

from fastdit.bench import cli as bench_cli
from fastdit.cli import edit, eval_cache, generate, quantize
from fastdit.cli.common import Parser
from fastdit.errors import FastditError, RunFailed
from fastdit.server import cli as serve_cli


def build_parser() -> Parser:
    parser = Parser(prog="fastdit", description="Fast inference for Qwen-Image diffusion transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in (generate, edit, bench_cli, serve_cli, quantize, eval_cache):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="fastdit: warning: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FastditError, RunFailed) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"fastdit: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, FastditError) else 1
    except KeyboardInterrupt:
        print("fastdit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
