"""Every attention backend available on this machine agrees with the float32 reference."""

import pytest
import torch

from fastdit.kernels.attention import attention, available_backends, resolve_backend

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backends_agree_with_math(device, masked, dtype):
    """Also float32 on CUDA: cuDNN's and flash's kernels take half types only, so those backends must hand
    float32 to SDPA's dispatcher (cuDNN's kernel called directly on float32 returned garbage)."""
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the CPU runs float32")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 77, 4, 64, generator=g).to(device, dtype) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(2, 77, dtype=torch.bool, device=device)
        mask[1, 5:20] = False
    ref = attention(q.double(), k.double(), v.double(), mask, "math")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for backend in available_backends(device):
        if backend in ("int8", "fp8"):  # approximate by design: tests/test_attention8.py and _fp8.py bound the error
            continue
        out = attention(q, k, v, mask, backend)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err <= tol, f"{backend} on {device}: rel err {err:.3g}"


def test_masked_keys_are_ignored():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 10, 2, 16, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 6 + [False] * 4])
    k2, v2 = k.clone(), v.clone()
    k2[:, 6:] += 50.0
    v2[:, 6:] -= 50.0
    for backend in available_backends("cpu"):
        assert torch.allclose(attention(q, k, v, mask, backend), attention(q, k2, v2, mask, backend), atol=1e-6)


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="not available"):
        resolve_backend("cudnn", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("fast", "cpu")


def test_text_lengths_equal_the_key_mask():
    """attention(..., txt_lens=...) (one unmasked call per sample) == the masked call, every backend here. The
    joint sequence is [image; text]: sample b's keys [S - num_txt + lens[b], S) are padding."""
    g = torch.Generator().manual_seed(2)
    num_txt, s = 9, 20 + 9
    q, k, v = (torch.randn(3, s, 2, 16, generator=g) for _ in range(3))
    lens = (9, 4, 1)
    mask = torch.ones(3, s, dtype=torch.bool)
    for b, n in enumerate(lens):
        mask[b, s - num_txt + n :] = False
    ref = attention(q, k, v, mask, "math")
    for backend in available_backends("cpu"):
        out = attention(q, k, v, None, backend, txt_lens=lens, num_txt=num_txt)
        assert torch.allclose(out, ref, atol=1e-5), backend
