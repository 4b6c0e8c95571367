"""`fastdit quantize`: write an fp8 (e4m3) or int4 checkpoint that `fastdit generate` / `fastdit.load_transformer`
load directly (fastdit.quant.checkpoint); `--format` names the recipe (fastdit.quant.recipes), whose modules go
into config.json."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastdit.cli.common import MODEL_HELP, number, resolve_model
from fastdit.errors import FastditError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="write an fp8 (e4m3) or int4 copy of a Qwen-Image transformer checkpoint",
        description=(
            "Quantize the DiT's block linears as a recipe says and save a checkpoint that `fastdit generate` / "
            "`load_transformer` load directly: fp8 e4m3 (per-output-channel weight scales; activations are "
            "quantized per token at run time; `fp8` keeps the MLPs' second linears in bf16, `fp8-fast` does not) "
            "or weight-only int4 (groups of 128, block linears and modulation: the DiT in under 11.5 GB). Streams "
            "one tensor at a time. A pipeline folder gives a pipeline folder whose other parts are symlinks to the "
            "originals. The folder appears only once it is complete."
        ),
    )
    p.add_argument("--model", required=True, help=MODEL_HELP + "; or a transformer folder alone")
    p.add_argument("--output", required=True, help="new folder to write")
    p.add_argument(
        "--dtype", choices=["bf16"], default="bf16", help="dtype of the tensors that stay unquantized (default: bf16)"
    )
    p.add_argument(
        "--format",
        choices=["fp8", "fp8-fast", "int4"],
        default="fp8",
        help="the recipe (fastdit.quant.recipes): fp8 (MLP second linears kept in bf16), fp8-fast (every block "
        "linear) or int4 (block linears and modulation, weight-only) (default: fp8)",
    )
    p.add_argument(
        "--include-modulation",
        action="store_true",
        help="fp8 formats: also quantize the modulation projections (1/3 of weights; int4 always does)",
    )
    p.add_argument("--device", default="cpu", help="where to compute the scales, e.g. cuda: faster (default: cpu)")
    p.add_argument("--shard-size-gb", type=number, default=5.0, help="largest output shard (default: 5)")
    p.set_defaults(func=quantize_main)
    return p


def quantize_main(args: argparse.Namespace) -> int:
    import torch

    from fastdit.checkpoint import resolve_transformer_dir
    from fastdit.load import quantized_keys, read_family
    from fastdit.quant.checkpoint import check_new_output, quantize_checkpoint
    from fastdit.quant.recipes import Recipe

    if not args.shard_size_gb > 0:
        raise FastditError(f"--shard-size-gb must be positive, got {args.shard_size_gb}")
    recipe = Recipe(args.format)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise FastditError(f"--device {args.device}: {e}") from None
    check_new_output(Path(args.output))  # before a download that may take an hour
    source = resolve_model(args.model)
    family, cfg = read_family(resolve_transformer_dir(source))
    modules = tuple(recipe.layers(family.roles))
    if args.include_modulation and recipe.method == "fp8":
        modules += tuple(m for m in family.modulation if m not in modules)
    out = quantize_checkpoint(
        source,
        args.output,
        quantized_keys=quantized_keys(cfg.num_layers, modules, family.checkpoint_keys),
        modules=modules,
        dtype=torch.bfloat16,
        device=device,
        max_shard_bytes=int(args.shard_size_gb * 2**30),
        method=recipe.method,
        recipe=recipe.name,
    )
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    kind = "fp8 e4m3" if recipe.method == "fp8" else "int4, groups of 128"
    print(f"wrote {out} ({total / 2**30:.2f} GiB, {args.format}: {kind} for {', '.join(modules)})")
    return 0
