"""The `--cache` flag shared by `fastdit generate` and `fastdit serve` (no torch imported here)."""

from __future__ import annotations

import argparse

from fastdit.cache.config import StepCache
from fastdit.errors import ConfigError, FastditError

CACHE_HELP = (
    "reuse the middle DiT blocks' work across denoising steps (DBCache), e.g. F8B0,threshold=0.12,warmup=8,taylor=1: "
    "F<n>B<m> = always run the first n and last m blocks; threshold = relative L1 change of the first blocks' "
    "residual below which a step reuses the cache; warmup = steps that always compute; taylor = extrapolation "
    "order of the reused residual; max-cached / max-consecutive = caps (-1: none); 'default' = "
    f"{StepCache().spec()}. F1B0 is First-Block Cache"
)


def cache_spec(text: str) -> StepCache:
    """argparse type of --cache: the text form -> a StepCache (a usage error, one line, if malformed)."""
    try:
        return StepCache.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cache_arguments(parser) -> None:
    parser.add_argument("--cache", type=cache_spec, default=None, metavar="SPEC", help=CACHE_HELP)


def check_cache_fits(cache: StepCache | None, folder) -> None:
    """Before loading: the cache's front + back blocks against the model's block count, as a `--cache` error."""
    if cache is None:
        return
    from fastdit.load import read_config

    try:
        cache.check_fits(read_config(folder).num_layers)
    except ConfigError as e:
        raise FastditError(f"--cache {cache.spec()}: {e}") from None
