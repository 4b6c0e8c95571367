"""FP8 attention: cuDNN's fused fp8 SDPA (Hopper and newer) with per-tensor e4m3 Q, K, V and output.

cuDNN runs both GEMMs of flash attention on fp8 tensor cores: S = Q.K^T from e4m3 Q and K, softmax in
float32, the unnormalised probabilities P in [0, 1] stored as P * 448 in e4m3, O = P.V accumulated in
float32 and written as e4m3: faster than cuDNN's bf16 kernel at the DiT's shapes (benchmarks/RESULTS.md).

Scales are per tensor and computed on the GPU inside the (compiled) graph, never on the host. e4m3 is a
float format: every value within 2^14 of the scale's largest keeps its 3-bit mantissa, so one scale per
tensor is enough, and a bound on |x| serves as well as the exact absmax:
- Q and K: the DiT passes a bound from its QK RMSNorm weights w (`rms_norm_bound`): after RMSNorm each
  head's vector has rms 1, so no element exceeds sqrt(D) max|w|, and RoPE rotates pairs without growing
  them. Then no reduction is needed, and the DiT's QK-norm + RoPE kernel writes e4m3 directly
  (fastdit.kernels.qk_norm_rope, half the bytes of bf16). Without a bound: absmax / 448, one reduction.
- V: absmax / 448 (one reduction; nothing bounds a linear layer's output).
- O: a convex combination of V's rows, so |O| <= max |V|: O is written in V's units (scale_o = 1 / V's
  scale), which cannot overflow. When the out-projections are fp8 too, O goes into their GEMMs as it is
  (`Fp8Linear.forward_e4m3`, V's scale as the row scale): no dequantize / requantize pass in between.
  Otherwise it is dequantized to bf16 right after the call.

`attention_fp8(q, k, v)` takes and returns (B, S, H, D) float tensors like fastdit.kernels.attention (or e4m3
ones with their `Fp8Scales`). The cuDNN call is the custom op `fastdit::sdpa_fp8`, opaque to
torch.compile (no graph break). Its CPU
implementation is `reference_sdpa_fp8`, the same arithmetic in float32 torch, for tests and error
estimates; users never reach it: the backend is refused off CUDA (`missing_fp8_attention`).

Needs NVIDIA's cuDNN Python frontend: `pip install "fastdit[fp8-attention]"`.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from fastdit.errors import FastditError
from fastdit.kernels.fp8_rows import FP8, FP8_MAX, MIN_AMAX, to_e4m3

P_SCALE = FP8_MAX  # P in [0, 1] is stored as P * 448 (cuDNN's scale_s)
INSTALL_HINT = 'pip install "fastdit[fp8-attention]" (NVIDIA\'s cuDNN frontend, nvidia-cudnn-frontend)'


def _frontend():
    """The `cudnn` module of nvidia-cudnn-frontend, imported on first use (it loads libcudnn)."""
    import cudnn

    return cudnn


def missing_fp8_attention(device: torch.device | str) -> str | None:
    """None when `device` can run fp8 attention, else a sentence saying what is missing."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"fp8 attention runs on CUDA GPUs through cuDNN, not on {device.type}"
    if not torch.cuda.is_available():
        return "fp8 attention needs CUDA, but torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return (
            f"fp8 attention needs a Hopper or newer GPU (compute capability >= 9.0); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}"
        )
    if not torch.backends.cudnn.is_available():
        return "fp8 attention needs cuDNN, but this torch build has none"
    try:
        _frontend()
    except (ImportError, OSError, RuntimeError) as e:
        return f"fp8 attention needs NVIDIA's cuDNN frontend ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return None


def check_fp8_attention_device(device: torch.device | str) -> None:
    why = missing_fp8_attention(device)
    if why is not None:
        raise FastditError(why)


# ---------------------------------------------------------------------------------------------------------
# Quantization (torch; fused by inductor when compiled)


def fp8_scale(amax: Tensor) -> Tensor:
    """The (1,) float32 e4m3 scale for values bounded by `amax`: amax / 448 (never zero)."""
    return (amax.float().clamp(min=MIN_AMAX) / FP8_MAX).reshape(1)


def _amax(xs) -> Tensor:
    return torch.stack([x.abs().amax().float() for x in xs]).amax()


def quantize_tensor(x: Tensor, bound: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x -> (e4m3 values, (1,) float32 scale) with x ~= values * scale; one scale for the whole tensor:
    `bound` / 448 if given (a tensor >= max |x|: values beyond it would saturate at 448), else absmax / 448."""
    scale = fp8_scale(_amax([x]) if bound is None else bound)
    return to_e4m3(x, scale), scale


class Fp8Scales(NamedTuple):
    """The scales of e4m3 q, k, v (x = x8 * scale; (1,) float32 each) and the dtype attention returns; None:
    the e4m3 output itself, in units of `v` (for fp8 out-projections: `Fp8Linear.forward_e4m3`)."""

    q: Tensor
    k: Tensor
    v: Tensor
    out_dtype: torch.dtype | None


def quantize_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Fp8Scales]:
    """q, k, v -> the same in e4m3, one absmax scale each (`quantize_tensor`)."""
    (q8, q_scale), (k8, k_scale), (v8, v_scale) = (quantize_tensor(x) for x in (q, k, v))
    return q8, k8, v8, Fp8Scales(q_scale, k_scale, v_scale, q.dtype)


def dequantize(q8: Tensor, k8: Tensor, v8: Tensor, scales: Fp8Scales) -> tuple[Tensor, Tensor, Tensor]:
    dtype = scales.out_dtype or torch.bfloat16
    return tuple((x.float() * s).to(dtype) for x, s in zip((q8, k8, v8), scales[:3], strict=True))


def rms_norm_bound(*weights: Tensor) -> Tensor:
    """A bound on |x| for x = RoPE(RMSNorm(h) * w) with w any of `weights` (each (D,)): sqrt(D) max |w|, plus
    1 % for the bf16 roundings between the norm, the weight and the rotation. 0-d float32 tensor."""
    d = weights[0].shape[-1]
    return _amax([w.detach() for w in weights]) * (math.sqrt(d) * 1.01)


def reference_sdpa_fp8(
    q8: Tensor, k8: Tensor, v8: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor, o_scale: Tensor
) -> Tensor:
    """cuDNN's fp8 SDPA in float32 torch: (B, S, H, D) e4m3 operands with (1,) scales (x = x8 * scale)
    -> (B, S, H, D) e4m3 output O / o_scale. Softmax uses the row's final max (the kernel's running max
    only differs in which P values round where)."""
    d = q8.shape[-1]
    q, k, v = (x.float().transpose(1, 2) for x in (q8, k8, v8))  # (B, H, S, D)
    s = (q @ k.transpose(-1, -2)) * (q_scale * k_scale / math.sqrt(d))
    p = torch.exp(s - s.amax(-1, keepdim=True))  # unnormalised, in [0, 1]
    p8 = (p * P_SCALE).to(FP8).float()
    o = (p8 @ v) * (v_scale / P_SCALE) / p.sum(-1, keepdim=True)
    return to_e4m3(o, o_scale).transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------------------
# cuDNN graph (built once per shape and layout, cached)

_lock = threading.Lock()
_graphs: dict[tuple, tuple] = {}  # (shapes, strides, device) -> built graph; oldest dropped past _MAX_GRAPHS
_MAX_GRAPHS = 64  # one per distinct key length: the per-sample calls of a padded CFG batch vary it
_handles: dict[int, object] = {}
_constants: dict[int, dict[str, Tensor]] = {}


def _bhsd_stride(x: Tensor) -> list[int]:
    """Strides of a (B, S, H, D) tensor as cuDNN's (B, H, S, D) dims see them."""
    sb, ss, sh, sd = x.stride()
    return [sb, sh, ss, sd]


def _build(cudnn, handle, q_shape: tuple[int, ...], kv_len: int, strides: tuple[list[int], ...]):
    b, s, h, d = q_shape
    fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    g = cudnn.pygraph(handle=handle, io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32)
    q, k, v, o = (
        g.tensor(name=n, dim=[b, h, length, d], stride=st, data_type=fp8)
        for n, length, st in zip("qkvo", (s, kv_len, kv_len, s), strides, strict=True)
    )
    scalars = {n: g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32) for n in _SCALARS}
    out, _, amax_s, amax_o = g.sdpa_fp8(
        q=q,
        k=k,
        v=v,
        **{n: scalars[n] for n in _SCALARS},
        generate_stats=False,
        attn_scale=1.0 / math.sqrt(d),
        name="fastdit_sdpa_fp8",
    )
    out.set_output(True).set_dim([b, h, s, d]).set_stride(strides[3]).set_data_type(fp8)
    for amax in (amax_s, amax_o):  # amax outputs the op declares; written to a scratch buffer, unused
        amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, dict(q=q, k=k, v=v, o=out, amax_s=amax_s, amax_o=amax_o, **scalars), g.get_workspace_size()


_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")


def _execute(cudnn, q8: Tensor, k8: Tensor, v8: Tensor, out: Tensor, scales: dict[str, Tensor]) -> None:
    """Run cuDNN's fp8 SDPA on (B, S, H, D) views q8, k8, v8 into `out`, an (S, B, H, D) view."""
    device = q8.device
    strides = tuple(_bhsd_stride(x) for x in (q8, k8, v8, out.transpose(0, 1)))
    key = (tuple(q8.shape), k8.shape[1], tuple(tuple(st) for st in strides), device.index)
    with _lock:
        if device.index not in _handles:
            with torch.cuda.device(device):
                _handles[device.index] = cudnn.create_handle()
            _constants[device.index] = {
                "descale_s": torch.full((1,), 1.0 / P_SCALE, device=device),
                "scale_s": torch.full((1,), P_SCALE, device=device),
                "amax": torch.empty(2, device=device),
            }
        handle = _handles[device.index]
        if key not in _graphs:
            try:
                _graphs[key] = _build(cudnn, handle, tuple(q8.shape), k8.shape[1], strides)
                while len(_graphs) > _MAX_GRAPHS:
                    _graphs.pop(next(iter(_graphs)))
            except Exception as e:  # cuDNN says which part of the graph it cannot run
                raise FastditError(
                    f"cuDNN cannot run fp8 attention for q {tuple(q8.shape)}, k/v {tuple(k8.shape)}: {e}"
                ) from None
    graph, t, ws_bytes = _graphs[key]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    const = _constants[device.index]
    buffers = {t["q"]: q8, t["k"]: k8, t["v"]: v8, t["o"]: out}
    buffers.update({t[n]: const[n] for n in ("descale_s", "scale_s")})
    buffers.update({t[n]: scales[n] for n in ("descale_q", "descale_k", "descale_v", "scale_o")})
    buffers.update({t["amax_s"]: const["amax"][:1], t["amax_o"]: const["amax"][1:]})
    workspace = torch.empty(max(ws_bytes, 1), device=device, dtype=torch.uint8)
    graph.execute(buffers, workspace, handle=handle)


def _empty_sequence_major(q: Tensor) -> Tensor:
    b, s, h, d = q.shape
    return torch.empty((s, b, h, d), device=q.device, dtype=FP8)


@torch.library.custom_op("fastdit::sdpa_fp8", mutates_args=())
def sdpa_fp8(
    q8: Tensor,
    k8: Tensor,
    v8: Tensor,
    q_scale: Tensor,
    k_scale: Tensor,
    v_scale: Tensor,
    kv_lens: list[int] | None = None,
) -> Tensor:
    """e4m3 q8 (B, S_q, H, D), k8 and v8 (B, S_kv, H, D) with (1,) float32 scales -> e4m3 O in units of v_scale,
    sequence-major: (S_q, B, H, D). Then the text and the image rows of the joint sequence are two contiguous
    (S_x * B, H * D) blocks that go into their out-projection GEMMs as they are (the image rows in batch-major
    order would need a copy).

    `kv_lens`: sample b attends to its first kv_lens[b] keys only (a padded CFG batch: the [image; text]
    sequence's padding is at its end). One cuDNN call per sample, each writing its part of the one output (no
    stacking copy afterwards).

    On CUDA: cuDNN. On CPU: `reference_sdpa_fp8` (tests only; the backend itself is refused off CUDA)."""
    o_scale = v_scale
    out = _empty_sequence_major(q8)
    if q8.is_cuda:
        cudnn = _frontend()
        # torch.reciprocal: one kernel (1.0 / o_scale launches a reciprocal and a multiply)
        scales = dict(descale_q=q_scale, descale_k=k_scale, descale_v=v_scale, scale_o=torch.reciprocal(o_scale))
        q8, k8, v8 = (x if x.stride(-1) == 1 else x.contiguous() for x in (q8, k8, v8))

        def run(q, k, v, o):
            _execute(cudnn, q, k, v, o, scales)
    else:

        def run(q, k, v, o):
            o.copy_(reference_sdpa_fp8(q, k, v, q_scale, k_scale, v_scale, o_scale).transpose(0, 1))

    if kv_lens is None:
        run(q8, k8, v8, out)
    else:  # each sample writes its column of the sequence-major output in place (cuDNN: one graph per key count)
        for b, n in enumerate(kv_lens):
            run(q8[b : b + 1], k8[b : b + 1, :n], v8[b : b + 1, :n], out[:, b : b + 1])
    return out


@sdpa_fp8.register_fake
def _(q8, k8, v8, q_scale, k_scale, v_scale, kv_lens=None):
    return _empty_sequence_major(q8)


def attention_fp8(
    q: Tensor, k: Tensor, v: Tensor, scales: Fp8Scales | None = None, kv_lens: list[int] | None = None
) -> Tensor:
    """q (B, S_q, H, D), k and v (B, S_kv, H, D) -> (B, S_q, H, D), through fp8: float q, k, v (quantized
    here, absmax scales), or e4m3 ones with their `scales` (from `quantize_qkv`). The result is a view of
    sequence-major memory ((S_q, B, H, D), see `sdpa_fp8`, also for `kv_lens`)."""
    b, _, h, d = q.shape
    if d % 16 or d > 256 or k.shape != v.shape or k.shape[::2] != (b, h) or k.shape[-1] != d:
        raise FastditError(
            f"fp8 attention needs q (B, S_q, H, D) and k, v (B, S_kv, H, D) with D a multiple of 16 up to 256, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if scales is None:
        q, k, v, scales = quantize_qkv(q, k, v)
    o8 = sdpa_fp8(q, k, v, scales.q, scales.k, scales.v, kv_lens).transpose(0, 1)
    if scales.out_dtype is None:
        return o8
    return (o8.float() * scales.v).to(scales.out_dtype)
