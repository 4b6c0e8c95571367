"""FP8 (e4m3) W8A8 inference for the DiT, applied from outside the model file.

Scheme (per GEMM y = x @ W.T + b):
- weights: e4m3 with one float32 scale per output channel (row of W), computed once at load
  (`quantize_rows`: scale = absmax / 448, the e4m3 maximum);
- activations: e4m3 with one float32 scale per token (row of x), computed on the fly in `forward`
  (torch.compile fuses this into the kernel that produces x);
- the GEMM is `torch._scaled_mm` with row-wise scales: scale_a (M, 1), scale_b (1, N), bf16 out, bias in
  the epilogue. K and N must be multiples of 16; b must be column-major, so we pass `weight.t()` of the
  (N, K) row-major fp8 weight. Needs CUDA compute capability >= 8.9 (Ada, Hopper).

What is quantized: the block linears (`BLOCK_LINEARS`: fused QKV, attention out-projections, MLPs): about
two thirds of the weights and almost all the FLOPs. Modulation (`MODULATION`, one third of the weights but
only B rows of activations), norms, attention, img_in / txt_in / final stay in bf16 unless asked.

Where fp8 cannot run (CPU, GPUs below 8.9) `FastditError` is raised; nothing falls back silently. Tests
use the explicit emulation mode (`emulate=True`, or the mode string "fp8-emulated"): the same fp8 rounding
of weights and activations, with float32 math for the product.

Tensor parallelism: quantize AFTER sharding, on each rank's local weights (`quantize_model` on a model that
`fastdit.parallel.parallelize` swapped and the loader filled). A column-parallel shard becomes a plain
`Fp8Linear` of the local shape (it had no collective); a row-parallel shard becomes `Fp8RowParallelLinear`:
the fp8 local GEMM (activation scales over the local K slice), then the same all-reduce, then the bias once.
Each rank's partial sum is dequantized before the reduction, so no scale crosses ranks.

Checkpoints: `fastdit quantize --model IN --output OUT` streams a bf16 checkpoint one tensor at a time into
safetensors shards: fp8 weights plus `<key>_scale` float32 (N,) tensors under diffusers' names, and a
`quantization` entry in config.json. `fastdit.load_transformer` sees that entry, builds the fp8 layers on
meta and streams the fp8 tensors in: no bf16 copy of the quantized weights ever exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import CheckpointError, ConfigError, FastditError
from fastdit.loader import (
    checkpoint_keys,
    load_state_dict_into,
    read_config,
    resolve_transformer_dir,
    weight_map,
)
from fastdit.model import QwenImageTransformer
from fastdit.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from fastdit.rowquant import FP8, gelu_quantize_rows, missing_fp8_tensor_cores, quantize_rows

# Block submodules (paths inside `Block`) that `quantize_model` swaps by default, and the opt-in extra.
BLOCK_LINEARS = (
    "attn.img_qkv",
    "attn.txt_qkv",
    "attn.img_out",
    "attn.txt_out",
    "img_mlp.fc1",
    "img_mlp.fc2",
    "txt_mlp.fc1",
    "txt_mlp.fc2",
)
MODULATION = ("img_mod.lin", "txt_mod.lin")

# `quantize=` values: mode -> emulate. "fp8-emulated" is for tests: float math, never a speed-up.
MODES = {"fp8": False, "fp8-emulated": True}


def parse_mode(quantize: str) -> bool:
    """A `quantize=` value -> whether it is the emulated variant; anything else is a FastditError."""
    if quantize not in MODES:
        raise FastditError(f"quantize must be one of {', '.join(repr(m) for m in MODES)} or None, got {quantize!r}")
    return MODES[quantize]


def check_fp8_device(device: str | torch.device) -> None:
    """Raise FastditError unless `device` can run e4m3 GEMMs (CUDA, compute capability >= 8.9)."""
    device = torch.device(device)
    hint = "run in bf16 instead (no --quantize); emulation (quantize='fp8-emulated') is for tests, not speed"
    if device.type != "cuda":
        raise FastditError(
            f"fp8 (e4m3) GEMMs need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer), "
            f"but the model is on {device}: {hint}"
        )
    if not torch.cuda.is_available():
        raise FastditError(f"fp8 asked for on {device}, but no CUDA GPU is visible")
    if problem := missing_fp8_tensor_cores(device):
        raise FastditError(f"fp8 (e4m3) GEMMs need Ada, Hopper or newer: {problem}; {hint}")


# ---------------------------------------------------------------------------------------------------------
# Layers


class Fp8Linear(nn.Module):
    """y = x @ W.T + b with W (out, in) in e4m3 + per-output-channel float32 scales, x quantized per token.

    Parameters: `weight` (out, in) float8_e4m3fn, `weight_scale` (out,) float32, `bias` (out,) in the
    compute dtype (bf16 on the GPU). `emulate=True` does the same rounding with float32 matmuls (any
    device, any float dtype): for tests only. `fast_accum` is `_scaled_mm`'s use_fast_accum (Hopper's
    faster fp8 accumulation; the usual choice for inference).
    """

    # The loader keeps these parameters in the dtype declared here instead of casting them to the model dtype.
    keep_dtype = ("weight", "weight_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.bfloat16,
        emulate: bool = False,
        fast_accum: bool = True,
    ):
        super().__init__()
        if in_features % 16 or out_features % 16:
            raise ConfigError(
                f"fp8 GEMMs need in and out features divisible by 16, got {in_features} -> {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.emulate, self.fast_accum = emulate, fast_accum
        self.out_dtype = dtype  # of an e4m3 input's output (forward_e4m3); float inputs keep their own dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else "e4m3"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"

    def load_float(self, weight: Tensor, bias: Tensor | None) -> None:
        """Quantize a float (out, in) weight into this layer (same device); the bias is kept as given."""
        w, scale = quantize_rows(weight.detach())
        self.weight = nn.Parameter(w, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.squeeze(1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._gemm(x, self.bias)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """GELU(tanh)(linear(x)), for an MLP's fc1 when fc2 is not fp8: the fp8 GEMM has no GELU epilogue."""
        return F.gelu(self._gemm(x, self.bias), approximate="tanh")

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        """linear(GELU(tanh)(h)), for an MLP's fc2 (model.MLP calls this when the layer has it): the GELU
        runs inside the per-row quantization of h, one pass over the MLP's widest activation (fastdit.rowquant)."""
        return self._gemm(h, self.bias, gelu_input=True)

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        """linear(x8 * scale) for an input that is already e4m3 with one (1,) float32 scale (the fp8 attention's
        output, fastdit.attention_fp8): no quantization pass. Returns the compute dtype (bf16 on the GPU)."""
        return self._gemm(x8, self.bias, x_scale=scale)

    def _gemm(self, x: Tensor, bias: Tensor | None, gelu_input: bool = False, x_scale: Tensor | None = None) -> Tensor:
        shape = x.shape
        if x_scale is None:
            quantize = gelu_quantize_rows if gelu_input else quantize_rows
            xq, x_scale = quantize(x.reshape(-1, shape[-1]))  # (M, K) e4m3, (M, 1) float32
            out_dtype = x.dtype
        else:  # x is e4m3 already, one scale for all rows
            xq = x.reshape(-1, shape[-1])
            x_scale = x_scale.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
            out_dtype = self.out_dtype if self.bias is None else self.bias.dtype
        if self.emulate:
            y = (xq.float() @ self.weight.float().t()) * x_scale * self.weight_scale  # (M, N) float32
            if bias is not None:
                y = y + bias.float()
            y = y.to(out_dtype)
        else:
            if not x.is_cuda or out_dtype != torch.bfloat16:
                raise FastditError(
                    f"Fp8Linear runs on CUDA in bfloat16, got a {out_dtype} input on {x.device} "
                    "(use quantize='fp8-emulated' for CPU tests)"
                )
            y = torch._scaled_mm(
                xq,
                self.weight.t(),  # (K, N) column-major view of the (N, K) row-major weight
                scale_a=x_scale,
                scale_b=self.weight_scale[None, :],  # (1, N)
                bias=bias,
                out_dtype=torch.bfloat16,
                use_fast_accum=self.fast_accum,
            )
        return y.reshape(*shape[:-1], y.shape[-1])


class Fp8RowParallelLinear(Fp8Linear):
    """`fastdit.parallel.RowParallelLinear` with an fp8 local GEMM: (..., in / world) -> (..., out).

    Weights are this rank's (out, in / world) columns with scales over those columns; the partial sums
    (already dequantized, bf16) are all-reduced over `group`, then the bias is added once.
    """

    def __init__(self, in_features: int, out_features: int, world: int, group, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        if world > 1 and group is None:
            raise ConfigError(f"Fp8RowParallelLinear over {world} ranks needs a process group")
        self.world, self.group = world, group

    def forward(self, x: Tensor) -> Tensor:
        return self._reduce(self._gemm(x, None))

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        return self._reduce(self._gemm(h, None, gelu_input=True))

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        return self._reduce(self._gemm(x8, None, x_scale=scale))

    def _reduce(self, y: Tensor) -> Tensor:
        if self.world > 1:
            y = funcol.all_reduce(y, "sum", self.group)
        return y if self.bias is None else y + self.bias


def _fp8_layer(layer: nn.Module, emulate: bool, fast_accum: bool) -> Fp8Linear:
    """The fp8 replacement of a (possibly sharded) linear layer; on meta an empty one for the loader."""
    if isinstance(layer, Fp8Linear):
        return layer
    weight, bias = layer.weight, layer.bias
    n, k = weight.shape
    kwargs = dict(dtype=weight.dtype, emulate=emulate, fast_accum=fast_accum)
    if isinstance(layer, RowParallelLinear):
        make = lambda: Fp8RowParallelLinear(k, n, layer.world, layer.group, bias is not None, **kwargs)
    elif isinstance(layer, ColumnParallelLinear) and layer.gather_output and layer.world > 1:
        raise ConfigError("a column-parallel layer that all-gathers its output (sharded modulation) can't be fp8")
    elif isinstance(layer, nn.Linear | ColumnParallelLinear | ReplicatedLinear):
        make = lambda: Fp8Linear(k, n, bias is not None, **kwargs)
    else:
        raise ConfigError(f"cannot quantize a {type(layer).__name__} to fp8 (expected a linear layer)")
    with torch.device("meta"):
        out = make()
    if weight.device.type != "meta":
        out.load_float(weight, bias)
    return out


def quantize_model(
    model: nn.Module, *, emulate: bool = False, modules: tuple[str, ...] = BLOCK_LINEARS, fast_accum: bool = True
) -> nn.Module:
    """Swap each block's `modules` (paths inside a Block) for fp8 layers, in place; returns the model.

    Works on a loaded model (quantizes its weights, one layer at a time, freeing each float weight as it
    goes), on a model built on meta (empty fp8 layers for the loader to fill), and on a
    `fastdit.parallel.ParallelTransformer` or any model whose layers were swapped for parallel ones.
    Without `emulate`, raises FastditError unless the weights are on an fp8-capable GPU.
    """
    inner = getattr(model, "model", model)  # ParallelTransformer wraps the QwenImageTransformer
    device = next(inner.parameters()).device
    if not emulate and device.type != "meta":
        check_fp8_device(device)
    for block in inner.blocks:
        for path in modules:
            parent_name, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, leaf, _fp8_layer(getattr(parent, leaf), emulate, fast_accum))
    return model


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def folder_quantization(folder: Path) -> dict | None:
    """The `quantization` entry of a transformer folder's config.json (None: a float checkpoint)."""
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_file}: {e}") from None
    q = raw.get("quantization") if isinstance(raw, dict) else None
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("method") != "fp8" or not isinstance(q.get("modules"), list):
        raise CheckpointError(f"{cfg_file}: unsupported quantization entry {q!r} (fastdit writes method 'fp8')")
    return q


def load_quantized(
    folder: Path, quantize: str | None, *, dtype: torch.dtype, device: torch.device
) -> QwenImageTransformer:
    """`fastdit.load_transformer` for fp8: a folder written by `fastdit quantize`, or quantize-at-load.

    A quantized folder: fp8 layers are built on meta and its fp8 tensors streamed in (quantize: None or
    an fp8 mode). A float folder with `quantize` set: loaded in `dtype` on `device`, then quantized layer
    by layer (peak memory: the float model; use `fastdit quantize` once to avoid even that).
    """
    cfg = read_config(folder)
    with torch.device("meta"):
        model = QwenImageTransformer(cfg)
    emulate = fp8_before_load(model, folder, quantize or "fp8", dtype=dtype, device=device)
    load_state_dict_into(model, folder, dtype=dtype, device=device)
    return quantize_model(model.eval().requires_grad_(False), emulate=emulate)  # a float folder's block linears


def fp8_before_load(
    model: nn.Module, folder: Path, quantize: str | None, *, dtype: torch.dtype, device: torch.device
) -> bool | None:
    """The fp8 part of loading `folder` into `model` (built on meta, parallel layers already swapped in),
    before any tensor is read: the device and dtype checks, and for a folder written by `fastdit quantize`
    empty fp8 layers for its e4m3 tensors (its dtypes checked in the headers). Returns whether fp8 is
    emulated, or None when neither the folder nor `quantize` asks for fp8. A float folder's layers are
    quantized after loading: `quantize_model(model, emulate=...)` (a no-op on layers already fp8)."""
    saved = folder_quantization(folder)
    if saved is None and quantize is None:
        return None
    emulate = parse_mode(quantize or "fp8")
    if not emulate:
        check_fp8_device(device)
        if dtype != torch.bfloat16:
            raise FastditError(f"fp8 layers compute in bfloat16; load with dtype=torch.bfloat16, not {dtype}")
    if saved is not None:
        modules = tuple(saved["modules"])
        check_fp8_checkpoint(folder, getattr(model, "model", model).cfg.num_layers, modules)
        quantize_model(model, emulate=emulate, modules=modules)
    return emulate


def _quantized_keys(num_layers: int, modules: tuple[str, ...]) -> list[str]:
    """The checkpoint (diffusers) keys of the weights that are stored in fp8."""
    return [k for i in range(num_layers) for m in modules for k in checkpoint_keys(f"blocks.{i}.{m}.weight")]


def check_fp8_checkpoint(folder: Path, num_layers: int, modules: tuple[str, ...]) -> None:
    """Header reads only: each quantized weight is stored as e4m3 and each scale as float32."""
    from safetensors import safe_open

    where = weight_map(folder)
    for key in _quantized_keys(num_layers, modules):
        for name, want in ((key, "F8_E4M3"), (key + "_scale", "F32")):
            if name not in where:
                raise CheckpointError(f"missing key in quantized checkpoint {folder}: {name}")
            with safe_open(str(where[name]), framework="pt") as f:
                got = f.get_slice(name).get_dtype()
            if got != want:
                raise CheckpointError(f"{name} in {where[name]} is {got}, a quantized checkpoint stores {want}")


def _tensor_bytes(shape: list[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def check_new_output(out_root: Path) -> None:
    """`fastdit quantize` writes a new folder: an existing non-empty one is refused, never overwritten."""
    if out_root.exists() and any(out_root.iterdir()):
        raise FastditError(f"--output {out_root} exists and is not empty; give a new folder")


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    modules: tuple[str, ...] = BLOCK_LINEARS,
    device: str | torch.device = "cpu",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an fp8 copy of a float transformer checkpoint; returns the new transformer folder.

    Streams: one tensor at a time is read (cast to `dtype`, quantized on `device` when it is one of the
    block linears' weights) and at most one shard (`max_shard_bytes`) is held before it is written.
    Everything else is stored in `dtype`. `src` may be a pipeline root: then `dst` becomes one too, with
    `transformer/` quantized and the other parts symlinked to the originals.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src_root, out_root = Path(src), Path(dst)
    folder = resolve_transformer_dir(src_root)
    is_pipeline = folder != src_root
    out = out_root / "transformer" if is_pipeline else out_root
    check_new_output(out_root)
    if folder_quantization(folder) is not None:
        raise FastditError(f"{folder} is already quantized")
    cfg = read_config(folder)
    where = weight_map(folder)
    quantized = set(_quantized_keys(cfg.num_layers, modules))
    missing = sorted(quantized - where.keys())
    if missing:
        raise CheckpointError(f"missing keys in {folder}: {', '.join(missing[:5])}")

    # Plan shards from the headers (sizes after conversion), so names are known before any tensor is read.
    shapes = {}
    for f in sorted(set(where.values())):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                shapes[key] = h.get_slice(key).get_shape()
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(where):
        n = _tensor_bytes(shapes[key], FP8 if key in quantized else dtype)
        n += _tensor_bytes(shapes[key][:1], torch.float32) if key in quantized else 0
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    if len(shards) == 1:
        names = ["diffusion_pytorch_model.safetensors"]
    else:
        names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    for name, keys in zip(names, shards, strict=True):
        tensors: dict[str, Tensor] = {}
        for key in keys:
            with safe_open(str(where[key]), framework="pt", device=str(device)) as h:
                t = h.get_tensor(key).to(dtype)
            if key in quantized:
                w, scale = quantize_rows(t)
                tensors[key], tensors[key + "_scale"] = w.cpu(), scale.squeeze(1).cpu()
            else:
                tensors[key] = t.cpu().contiguous()
            del t
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index |= dict.fromkeys(tensors, name)
        del tensors
    if len(names) > 1:
        total = sum(_tensor_bytes(shapes[k], FP8 if k in quantized else dtype) for k in where)
        (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2)
        )

    raw = json.loads((folder / "config.json").read_text())
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    raw["quantization"] = {
        "method": "fp8",
        "format": "float8_e4m3fn",
        "weights": "per output channel, float32 scale in <key>_scale",
        "activations": "per token, dynamic",
        "modules": list(modules),
    }
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if is_pipeline:  # the other parts are unchanged: link them instead of copying gigabytes
        for entry in sorted(src_root.iterdir()):
            if entry.name == "transformer":
                continue
            if entry.is_file() and entry.suffix == ".json":
                shutil.copy2(entry, out_root / entry.name)
            else:
                os.symlink(entry.resolve(), out_root / entry.name, target_is_directory=entry.is_dir())
    return out


# ---------------------------------------------------------------------------------------------------------
# CLI: fastdit quantize


def add_parser(subparsers):
    p = subparsers.add_parser(
        "quantize",
        help="write an fp8 (e4m3) copy of a Qwen-Image transformer checkpoint",
        description=(
            "Quantize the DiT's block linears to fp8 e4m3 (per-output-channel weight scales; activations are "
            "quantized per token at run time) and save a checkpoint that `fastdit generate`/`load_transformer` "
            "load directly. Streams one tensor at a time. A pipeline folder gives a pipeline folder whose "
            "other parts are symlinks to the originals."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="diffusers-format transformer folder or pipeline root, or a Hugging Face repo id (downloaded first)",
    )
    p.add_argument("--output", required=True, help="new folder to write")
    p.add_argument("--dtype", choices=["bf16"], default="bf16", help="dtype of the tensors that stay unquantized")
    p.add_argument(
        "--include-modulation", action="store_true", help="also quantize the modulation projections (1/3 of weights)"
    )
    p.add_argument("--device", default="cpu", help="where to compute the scales (e.g. cuda: faster)")
    p.add_argument("--shard-size-gb", type=float, default=5.0, help="largest output shard")
    p.set_defaults(func=quantize_main)
    return p


def quantize_main(args: argparse.Namespace) -> int:
    from fastdit.cli import resolve_model  # the CLI module imports this one's parser

    if args.shard_size_gb <= 0:
        raise FastditError(f"--shard-size-gb must be positive, got {args.shard_size_gb}")
    modules = BLOCK_LINEARS + (MODULATION if args.include_modulation else ())
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise FastditError(f"--device {args.device}: {e}") from None
    check_new_output(Path(args.output))  # before a download that may take an hour
    out = quantize_checkpoint(
        resolve_model(args.model),
        args.output,
        dtype=torch.bfloat16,
        modules=modules,
        device=device,
        max_shard_bytes=int(args.shard_size_gb * 2**30),
    )
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({total / 2**30:.2f} GiB, fp8 e4m3: {', '.join(modules)})", file=sys.stdout)
    return 0
