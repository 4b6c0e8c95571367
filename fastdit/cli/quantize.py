"""`fastdit quantize`: write an fp8 (e4m3) checkpoint that `fastdit generate` / `fastdit.load_transformer` load
directly (fastdit.quant.checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdit.cli.common import MODEL_HELP, number, resolve_model
from fastdit.errors import FastditError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="write an fp8 (e4m3) copy of a Qwen-Image transformer checkpoint",
        description=(
            "Quantize the DiT's block linears to fp8 e4m3 (per-output-channel weight scales; activations are "
            "quantized per token at run time) and save a checkpoint that `fastdit generate`/`load_transformer` "
            "load directly. Streams one tensor at a time. A pipeline folder gives a pipeline folder whose "
            "other parts are symlinks to the originals. The folder appears only once it is complete."
        ),
    )
    p.add_argument("--model", required=True, help=MODEL_HELP + "; or a transformer folder alone")
    p.add_argument("--output", required=True, help="new folder to write")
    p.add_argument(
        "--dtype", choices=["bf16"], default="bf16", help="dtype of the tensors that stay unquantized (default: bf16)"
    )
    p.add_argument(
        "--include-modulation", action="store_true", help="also quantize the modulation projections (1/3 of weights)"
    )
    p.add_argument("--device", default="cpu", help="where to compute the scales, e.g. cuda: faster (default: cpu)")
    p.add_argument("--shard-size-gb", type=number, default=5.0, help="largest output shard (default: 5)")
    p.set_defaults(func=quantize_main)
    return p


def quantize_main(args: argparse.Namespace) -> int:
    import torch

    from fastdit.checkpoint import resolve_transformer_dir
    from fastdit.load import quantized_keys, read_config
    from fastdit.quant.checkpoint import check_new_output, quantize_checkpoint
    from fastdit.quant.fp8 import BLOCK_LINEARS, MODULATION

    if not args.shard_size_gb > 0:
        raise FastditError(f"--shard-size-gb must be positive, got {args.shard_size_gb}")
    modules = BLOCK_LINEARS + (MODULATION if args.include_modulation else ())
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise FastditError(f"--device {args.device}: {e}") from None
    check_new_output(Path(args.output))  # before a download that may take an hour
    source = resolve_model(args.model)
    cfg = read_config(resolve_transformer_dir(source))
    out = quantize_checkpoint(
        source,
        args.output,
        quantized_keys=quantized_keys(cfg.num_layers, modules),
        modules=modules,
        dtype=torch.bfloat16,
        device=device,
        max_shard_bytes=int(args.shard_size_gb * 2**30),
    )
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({total / 2**30:.2f} GiB, fp8 e4m3: {', '.join(modules)})")
    return 0
