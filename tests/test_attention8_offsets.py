"""The 8-bit attention kernel's addressing at the largest batch it serves: 64-bit batch offsets, and a clear refusal
of a sample too large for its 32-bit in-sample offsets."""

from __future__ import annotations

import json

import pytest

from fastdit.errors import FastditError
from fastdit.kernels.attention_int8 import MAX_SLAB, check_slab
from tests.triton_interpreter import run_interpreted

# The largest call: 64 images of 2048x2048 with CFG (a batch of 128 rows), 16384 image + 512 text tokens,
# Qwen-Image's 24 heads of 128.
BATCH, TOKENS, HEADS, HEAD_DIM = 128, 16384 + 512, 24, 128

_PROBE = r"""
import json, sys

import triton

from fastdit.kernels.attention_int8 import _bh_offset

@triton.jit
def probe(OUT, B, H, STRIDE_B, STRIDE_H):
    b = tl.program_id(0) + B  # int32, as the kernel's own b and h
    h = tl.program_id(0) + H
    tl.store(OUT, _bh_offset(b, h, STRIDE_B, STRIDE_H))

results = []
for b, h, stride_b, stride_h in json.loads(sys.argv[1]):
    out = torch.zeros(1, dtype=torch.int64)
    probe[(1,)](out, b, h, stride_b, stride_h)
    results.append(int(out.item()))
print(json.dumps(results))
"""


def test_batch_offsets_are_64_bit_at_the_largest_batch():
    """Under Triton's interpreter, `_bh_offset` (every tensor's (sample, head) base in the kernel) equals the exact
    offset of the last sample and head for the q / k / out layout (B, S, H, D) and the transposed V (B, H, D, S),
    well past 2**31 (32-bit arithmetic would wrap)."""
    pytest.importorskip("triton")
    s = TOKENS + (-TOKENS % 128)
    cases = [
        (BATCH - 1, HEADS - 1, s * HEADS * HEAD_DIM, HEAD_DIM),  # q8, k8, out: (B, S, H, D)
        (BATCH - 1, HEADS - 1, HEADS * HEAD_DIM * s, HEAD_DIM * s),  # vt8: (B, H, D, S)
    ]
    expected = [b * sb + h * sh for b, h, sb, sh in cases]
    assert min(expected) > 2**32
    run = run_interpreted(_PROBE, json.dumps(cases), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected


def test_sample_size_limit():
    """A 2048x2048 sample fits the 32-bit in-sample offsets; one of 2**31 elements or more is refused in one line."""
    check_slab(TOKENS, HEADS, HEAD_DIM)
    with pytest.raises(FastditError, match="fewer than 2"):
        check_slab(MAX_SLAB // (HEADS * HEAD_DIM) + 128, HEADS, HEAD_DIM)
