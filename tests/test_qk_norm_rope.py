"""fastdit.kernels.qk_norm_rope: the one-pass QK RMSNorm + RoPE (+ e4m3) kernel against its torch path.

- CPU: the Triton kernel under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess: it must be set
  before Triton is imported) in float32, where every rounding step of the kernel is exact: it must match
  the torch path to float32 rounding. This checks the indexing: which stream a token reads, q vs k, the
  head mask (3 heads in a block of 4), the pair partner for RoPE, the joint output layout. (The interpreter
  truncates float32 -> bf16 conversions instead of rounding them, so bf16 is checked on the GPU.)
- CUDA (`gpu` marker): bf16 and e4m3 output at the DiT's shape (24 heads) and a tensor-parallel shard's
  (3 heads), eager and compiled, against the torch path.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from fastdit.kernels.qk_norm_rope import qk_norm_rope
from fastdit.models.qwenimage import rope_tables
from tests.triton_interpreter import run_interpreted

triton = pytest.importorskip("triton")


def inputs(b, n_txt, n_img, heads, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    txt = torch.randn(b, n_txt, 3 * heads * d, generator=g) * 3
    img = torch.randn(b, n_img, 3 * heads * d, generator=g)
    norms = tuple(torch.rand(d, generator=g) + 0.5 for _ in range(4))
    side = int(n_img**0.5)
    axes = {16: (4, 6, 6), 32: (8, 12, 12), 128: (16, 56, 56)}[d]
    cos, sin = rope_tables((1, side, n_img // side), n_txt, axes, device=device)
    cast = lambda x: x.to(device, dtype)  # noqa: E731
    return cast(txt), cast(img), tuple(map(cast, norms)), cos, sin


INTERPRETED = """
import torch
from fastdit.kernels.qk_norm_rope import _launch, _qk_norm_rope_kernel, qk_norm_rope
from tests.test_qk_norm_rope import inputs

txt, img, norms, cos, sin = inputs(2, 5, 12, 3, 32, torch.float32, "cpu")
txt = torch.cat([txt, torch.ones(2, 5, 7)], dim=-1)[:, :, : 3 * 3 * 32]  # rows strided apart, as in a view
out = _launch(_qk_norm_rope_kernel, txt, img, norms, cos, sin, 1e-6, 32)
ref = qk_norm_rope(txt, img, norms, cos, sin, 1e-6, 32, reference=True)
assert out.shape == ref.shape == (2, 2, 17, 3, 32), out.shape
err = (out - ref).abs().max().item()
assert err < 1e-5, err
# Sanity of the check itself: a k computed with q's weights would not pass.
wrong = qk_norm_rope(txt, img, (norms[0], norms[0], norms[2], norms[2]), cos, sin, 1e-6, 32, reference=True)
assert (out[1] - wrong[1]).abs().max().item() > 1e-2
print("ok", err)
"""


def test_kernel_under_the_interpreter_matches_the_torch_path():
    run = run_interpreted(textwrap.dedent(INTERPRETED))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")


def test_cpu_runs_the_torch_path():
    txt, img, norms, cos, sin = inputs(1, 3, 4, 2, 16, torch.float32, "cpu")
    scales = (torch.full((1,), 0.02), torch.full((1,), 0.03))
    for s in (None, scales):
        got = qk_norm_rope(txt, img, norms, cos, sin, 1e-6, 16, s)
        assert torch.equal(
            got.view(torch.uint8),
            qk_norm_rope(txt, img, norms, cos, sin, 1e-6, 16, s, reference=True).view(torch.uint8),
        )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads", [24, 3])
def test_kernel_on_gpu(heads):
    """bf16 and e4m3 output at the DiT's shape: as close to the float32 answer as the torch path (the two
    differ only where float32 sums / rsqrt differ in the last bit and flip a rounding), eager and compiled."""
    txt, img, norms, cos, sin = inputs(2, 128, 4096, heads, 128, torch.bfloat16, "cuda")
    args = (cos, sin, 1e-6, 128)
    exact = qk_norm_rope(txt.float(), img.float(), tuple(w.float() for w in norms), *args, reference=True)
    ref = qk_norm_rope(txt, img, norms, *args, reference=True)
    out = qk_norm_rope(txt, img, norms, *args)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (2, 2, 4224, heads, 128)
    flipped = (out != ref).float().mean().item()
    assert flipped < 0.02, flipped
    assert rel(out, exact) < 1.05 * rel(ref, exact), (rel(out, exact), rel(ref, exact))
    assert rel(out, ref) < 4e-3, rel(out, ref)
    bound = exact.abs().amax(dim=(1, 2, 3, 4)) * 1.01  # q's and k's absmax: nothing saturates
    scales = tuple((bound[i] / 448).reshape(1) for i in range(2))
    ref8 = qk_norm_rope(txt, img, norms, *args, scales, reference=True)
    deq = lambda x8: torch.stack([x8[i].float() * scales[i] for i in range(2)])  # noqa: E731
    eager8 = qk_norm_rope(txt, img, norms, *args, scales)
    # Compiled, inductor builds the same kernel itself (it may contract multiply-adds differently). Dynamic
    # shapes, as a server gets after a few image sizes: the kernel's constants are specialized, not symbolic.
    compiled8 = torch.compile(qk_norm_rope, fullgraph=True, dynamic=True)(txt, img, norms, *args, scales)
    for out8 in (eager8, compiled8):
        assert out8.dtype == torch.float8_e4m3fn
        flipped8 = (out8.float() != ref8.float()).float().mean().item()
        assert flipped8 < 0.02, flipped8
        assert rel(deq(out8), exact) < 1.05 * rel(deq(ref8), exact), (rel(deq(out8), exact), rel(deq(ref8), exact))
